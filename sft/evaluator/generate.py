"""Generation with a KV cache (greedy or sampled), as one jitted loop (no host round-trip per token).

Prompts are right-padded to (B, P). Prefill runs the model once over the prompts and fills the cache;
each row's first answer token comes from the logits at its last real prompt token, the only position
unembedded (never (B, P, V) logits: at a vocabulary of 150k that alone is gigabytes). Every later step
feeds one token per row, written at cache slot `prompt_length + i`: slots a row has not written yet
(its padding included) are overwritten before any query can see them.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft.errors import ConfigError
from sft.evaluator.sampling import Sampler
from sft.model import Transformer, axes
from sft.model.backend import use_cpu_kernels
from sft.model.layers import OUT_IN
from sft.model.transformer import init_cache, split_cache, split_layers, weights_out_in

# Keys (L, B, K, H, S) and values (L, B, K, S, H): see sft.model.transformer.init_cache.
CACHE_AXES = (
    (axes.LAYERS, axes.BATCH, axes.KV_HEADS, axes.HEAD_DIM, axes.LENGTH),
    (axes.LAYERS, axes.BATCH, axes.KV_HEADS, axes.LENGTH, axes.HEAD_DIM),
)

GREEDY = Sampler()
log = logging.getLogger("sft")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists: ([[5, 6], [7]], pad 0) -> ([[5, 6], [7, 0]], [2, 1])."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, : len(prompt)] = prompt
  return tokens, lengths




def prompt_room(seq_len: int, max_new_tokens: int, key: str) -> int:
  """How many prompt tokens a generation keeps: the context (`seq_len`, what the model was trained on)
  less `max_new_tokens`, so that prompt and answer fit it. An answer allowed more than half the context
  leaves the prompt that half, and may run past the context (said in a warning); the cache is bounded
  by the config either way, never by the longest prompt. `key` names the max_new_tokens setting."""
  answer = min(max_new_tokens, seq_len // 2)
  if answer < max_new_tokens:
    log.warning(
        "%s=%d is more than half of train.seq_len=%d: prompts keep their last %d tokens, and an answer may run past "
        "the context the model was trained on", key, max_new_tokens, seq_len, seq_len - answer,
    )
  return seq_len - answer


def fit_prompts(prompts: Sequence[Sequence[int]], room: int) -> tuple[list[Sequence[int]], list[int]]:
  """(the prompts cut to their last `room` tokens, the indices of those that were cut). Cut from the left,
  so a prompt still ends with the assistant header the answer follows; then prompt + answer fit the
  context, and so does the KV cache, whatever the longest prompt:

      fit_prompts([[1, 2, 3, 4], [5]], 2) -> ([[3, 4], [5]], [0])
  """
  cut = [i for i, p in enumerate(prompts) if len(p) > room]
  return [p[-room:] if len(p) > room else p for p in prompts], cut


def constrain_cache(cache):
  """Pins the (k, v) cache, stacked or as its per-layer list of pairs, to the sharding the active
  logical axis rules give (rows over the batch's mesh axes, kv heads over "tensor"); without rules or
  a mesh, unchanged."""
  if isinstance(cache, list):
    return [tuple(nn.with_logical_constraint(x, names[1:]) for x, names in zip(layer, CACHE_AXES)) for layer in cache]
  return tuple(nn.with_logical_constraint(x, names) for x, names in zip(cache, CACHE_AXES))


def prefill(model: Transformer, params, prompt_tokens_bp: jax.Array, prompt_lengths_b: jax.Array, cache):
  """Runs the prompts through the model, filling `cache`; returns ((B, V) float32 logits at each row's
  last prompt token, cache). Only those B positions are unembedded: never (B, P, V) logits."""
  batch, prompt_len = prompt_tokens_bp.shape
  positions_bp = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
  hidden_bpd, cache = model.apply(
      {"params": params}, prompt_tokens_bp, positions_bp, cache=cache, cache_index_b=jnp.zeros((batch,), jnp.int32),
      return_hidden=True,
  )
  last_b1d = jnp.take_along_axis(hidden_bpd, (prompt_lengths_b - 1).astype(jnp.int32)[:, None, None], axis=1)
  return model.apply({"params": params}, last_b1d, method=Transformer.unembed)[:, 0], cache


def check_positions(cfg, length: int) -> None:
  """A model with learned positions has none past its table (they would read NaN): a ConfigError."""
  if cfg.position_embedding == "learned" and length > cfg.max_positions:
    raise ConfigError(f"a prompt and its new tokens take {length} positions, more than the model's {cfg.max_positions} positions")


def generate(
    params,
    prompt_tokens_bp: jax.Array,
    prompt_lengths_b: jax.Array,
    rng: jax.Array,
    copies: dict | None = None,
    *,
    model: Transformer,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sampler: Sampler = GREEDY,
) -> jax.Array:
  """Returns (B, max_new_tokens) generated ids: a stop token included, `pad_id` after it.

  `rng`: one key for the batch, or (B,) keys, one per row: then a sampled row depends on its own key
  and prompt only, never on the rows it shares the batch with (see Sampler.per_row).
  `copies`: `decode_copies(params)`, made once for many calls; without, a CPU trace makes them per call."""
  batch, prompt_len = prompt_tokens_bp.shape
  check_positions(model.cfg, prompt_len + max_new_tokens)
  cache = constrain_cache(init_cache(model.cfg, batch, prompt_len + max_new_tokens))
  logits_bv, cache = prefill(model, params, prompt_tokens_bp, prompt_lengths_b, cache)
  return decode(
      params, logits_bv, cache, prompt_lengths_b, rng, copies, model=model, max_new_tokens=max_new_tokens,
      stop_ids=stop_ids, pad_id=pad_id, sampler=sampler,
  )


def decode(
    params,
    logits_bv: jax.Array,
    cache,
    prompt_lengths_b: jax.Array,
    rng: jax.Array,
    copies: dict | None = None,
    live_b: jax.Array | None = None,
    *,
    model: Transformer,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sampler: Sampler = GREEDY,
) -> jax.Array:
  """`generate` after its prefill: (B, max_new_tokens) ids from the (B, V) logits at each row's last
  prompt token and the stacked cache holding its prompt (room for max_new_tokens after the longest).
  `live_b`: (B,) bool, the rows that count; the others are padding that never holds the loop."""
  batch = logits_bv.shape[0]
  stop_s = jnp.asarray(stop_ids or (-1,), jnp.int32)
  per_row = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1

  def draw(logits_bv, i):
    if per_row:
      return sampler.per_row(logits_bv, jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, i))
    return sampler(logits_bv, jax.random.fold_in(rng, i))

  first_b = draw(logits_bv, 0)
  out_bn = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_b)

  def is_stop(tokens_b):
    return jnp.any(tokens_b[:, None] == stop_s[None, :], axis=-1)

  def cond(carry):
    i, _, _, done_b, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_b)

  # Per-layer weights and cache for the loop: split once here, so no token step copies them out of stacks.
  variables = {"params": split_layers(params)}
  if copies:
    variables[OUT_IN] = copies  # an argument: nothing to cancel against
  elif copies is None and use_cpu_kernels():
    # Each projection reads an (out, in) copy (see weights_out_in); behind a barrier, or XLA cancels
    # the copy's transpose against the product's and multiplies by the (in, out) weight again.
    variables[OUT_IN] = jax.lax.optimization_barrier(weights_out_in(variables["params"]))

  def body(carry):
    i, last_b, out_bn, done_b, cache = carry
    slot_b = prompt_lengths_b + i - 1  # where `last_b`, the answer token i - 1, goes
    logits_b1v, cache = model.apply(variables, last_b[:, None], slot_b[:, None], cache=cache, cache_index_b=slot_b)
    next_b = jnp.where(done_b, pad_id, draw(logits_b1v[:, 0], i))
    return i + 1, next_b, out_bn.at[:, i].set(next_b), done_b | is_stop(next_b), constrain_cache(cache)

  done_b = is_stop(first_b) if live_b is None else is_stop(first_b) | ~live_b
  init = (jnp.int32(1), first_b, out_bn, done_b, constrain_cache(split_cache(cache)))
  return jax.lax.while_loop(cond, body, init)[2]


def prefill_into(params, cache, logits_bv, tokens_rw, lengths_r, rows_r, *, model: Transformer):
  """Prefills R right-padded prompts (R, W) and writes prompt i's keys and values (positions [0, W)) and
  its last token's logits into row rows_r[i] of a decoding batch's stacked `cache` (room S >= W) and
  (B, V) `logits_bv`; returns (cache, logits_bv). A row named twice gets the same values twice. A row's
  numbers depend on its own prompt and the (R, W) shape only."""
  r, w = tokens_rw.shape
  logits_rv, (k_rows, v_rows) = prefill(model, params, tokens_rw, lengths_r, constrain_cache(init_cache(model.cfg, r, w)))
  keys, values = cache  # (L, B, K, H, S), (L, B, K, S, H); the rows' (L, R, K, H, W), (L, R, K, W, H)
  for i in range(r):
    keys = jax.lax.dynamic_update_slice(keys, k_rows[:, i : i + 1].astype(keys.dtype), (0, rows_r[i], 0, 0, 0))
    values = jax.lax.dynamic_update_slice(values, v_rows[:, i : i + 1].astype(values.dtype), (0, rows_r[i], 0, 0, 0))
    logits_bv = jax.lax.dynamic_update_slice(logits_bv, logits_rv[i : i + 1].astype(logits_bv.dtype), (rows_r[i], 0))
  return constrain_cache((keys, values)), logits_bv


def decode_copies(params) -> dict:
  """The (out, in) weight copies decoding multiplies by on the CPU (see weights_out_in), made once: passed
  to every `generate` call, they spare each call the copy (a tenth of a 32-row, 64-token call). {} where
  the traced code is the accelerators' (see sft.model.backend). Held beside the parameters: a second copy
  of the projections in memory."""
  if not use_cpu_kernels():
    return {}
  return _out_in_copies(params)


@jax.jit
def _out_in_copies(params) -> dict:
  return weights_out_in(split_layers(params))


def make_generate(
    model: Transformer,
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sampler: Sampler = GREEDY,
    out_sharding: jax.sharding.Sharding | None = None,
) -> Callable:
  """`fn(params, prompt_tokens_bp, prompt_lengths_b, rng, copies=None) -> (B, max_new_tokens)`, compiled
  once per shape; `rng` one key, or (B,) keys (one per row: see `generate`); `copies` see `decode_copies`.

  `out_sharding`: where the generated ids go. Left to the compiler they follow the batch's sharding,
  which a multi-process run cannot `device_get`; a replicated sharding gives every process all rows.
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  fn = functools.partial(
      generate, model=model, max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), pad_id=pad_id, sampler=sampler
  )
  return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


def make_greedy_generate(model: Transformer, *, max_new_tokens: int, stop_id: int, pad_id: int) -> Callable:
  """`fn(params, prompt_tokens_bp, prompt_lengths_b) -> (B, max_new_tokens)`: greedy, one stop token."""
  fn = make_generate(model, max_new_tokens=max_new_tokens, stop_ids=(stop_id,), pad_id=pad_id)
  return lambda params, tokens_bp, lengths_b: fn(params, tokens_bp, lengths_b, jax.random.key(0))


def strip_generation(ids: Sequence[int], stop_ids: int | Sequence[int]) -> list[int]:
  """Generated ids up to (not including) the first stop token. Decoding writes its pad id only after a
  row's stop, so every id before it is the model's: one equal to the pad id (often a real token, "!" at
  id 0 of GPT-2-style vocabularies) is kept."""
  stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
  out = []
  for token in ids:
    if int(token) in stops:
      break
    out.append(int(token))
  return out
