"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampler:
  """temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the
  `top_k` most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ConfigError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

  def __call__(self, logits_bv: jax.Array, rng: jax.Array) -> jax.Array:
    """(B, V) float logits -> (B,) int32 token ids."""
    if self.temperature == 0.0:
      return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / self.temperature
    if self.top_k:
      kth_b1 = jax.lax.top_k(logits_bv, min(self.top_k, logits_bv.shape[-1]))[0][:, -1:]
      logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if self.top_p < 1.0:
      sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
      probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
      # A token stays if the tokens more likely than it hold less than top_p: the first always stays.
      before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
      cutoff_b1 = jnp.min(jnp.where(before_bv < self.top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
      logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)

  def per_row(self, logits_bv: jax.Array, rngs_b: jax.Array) -> jax.Array:
    """As calling the sampler, each row drawing with its own key of `rngs_b` ((B,) keys): a row's token
    is the one it would draw alone, whatever the rows beside it."""
    return jax.vmap(lambda logits_v, rng: self(logits_v[None], rng)[0])(logits_bv, rngs_b)
