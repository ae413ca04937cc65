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


def sample_rows(
    logits_bv: jax.Array, keys_b: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array
) -> jax.Array:
  """(B, V) logits -> (B,) int32 tokens, each row with its own settings (a server's batch mixes requests):
  greedy where temperature_b is 0, else a draw with that row's key as `Sampler(temperature, top_k,
  top_p).per_row` would draw it. The sort top-k/top-p need runs only when some row samples."""
  greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

  def sampled(_):
    sampling = temperature_b > 0
    scaled_bv = logits_bv.astype(jnp.float32) / jnp.where(sampling, temperature_b, 1.0)[:, None]
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    vocab = logits_bv.shape[-1]
    # top-k: the k-th largest value of the row (no limit where top_k is 0, or past the vocabulary).
    kth_b = jnp.take_along_axis(sorted_bv, (jnp.clip(top_k_b, 1, vocab) - 1)[:, None], axis=-1)[:, 0]
    kth_b = jnp.where(top_k_b > 0, kth_b, -jnp.inf)
    scaled_bv = jnp.where(scaled_bv < kth_b[:, None], -jnp.inf, scaled_bv)
    sorted_bv = jnp.where(sorted_bv < kth_b[:, None], -jnp.inf, sorted_bv)
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    cutoff_b = jnp.min(jnp.where(before_bv < top_p_b[:, None], sorted_bv, jnp.inf), axis=-1)
    cutoff_b = jnp.where(top_p_b < 1.0, cutoff_b, -jnp.inf)
    scaled_bv = jnp.where(scaled_bv < cutoff_b[:, None], -jnp.inf, scaled_bv)
    drawn_b = jax.vmap(lambda logits_v, key: jax.random.categorical(key, logits_v))(scaled_bv, keys_b)
    return jnp.where(sampling, drawn_b.astype(jnp.int32), greedy_b)

  return jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda _: greedy_b, None)
