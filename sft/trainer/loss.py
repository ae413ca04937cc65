"""The cross-entropy sums of a batch: from full logits, or a chunk of the sequence at a time.

Every function returns sums over loss-masked tokens (never means), so sums over chunks, micro-batches
or eval batches add up to the sums of the whole, and the caller divides once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sft.model import Transformer

Batch = dict[str, jax.Array]


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """(B, T) -log softmax(logits)[target]. The target's logit is picked with a compare-and-select that
  fuses into the passes over the logits (its gradient too), where an indexed gather's gradient is a
  scatter into a zeroed (B, T, V) buffer."""
  is_target_btv = jnp.arange(logits_btv.shape[-1], dtype=targets_bt.dtype) == targets_bt[..., None]
  target_logit_bt = jnp.sum(jnp.where(is_target_btv, logits_btv, 0.0), axis=-1)
  return jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt


def token_sums(logits_btv: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """Sums over loss-masked tokens: cross-entropy, correct argmax predictions, and their count."""
  mask_bt = batch["loss_mask"].astype(jnp.float32)
  nll_bt = cross_entropy(logits_btv, batch["targets"])
  correct_bt = (jnp.argmax(logits_btv, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {
      "nll_sum": jnp.sum(nll_bt * mask_bt),
      "correct_sum": jnp.sum(correct_bt * mask_bt),
      "loss_tokens": jnp.sum(mask_bt),
  }


def _chunks(x_bt: jax.Array, chunk_size: int) -> jax.Array:
  """(B, T, ...) -> (C, B, N, ...): the sequence cut into C chunks of N tokens, the last one zero-padded."""
  b, t = x_bt.shape[:2]
  num_chunks = -(-t // chunk_size)
  pad = [(0, 0), (0, num_chunks * chunk_size - t)] + [(0, 0)] * (x_bt.ndim - 2)
  x_bcn = jnp.pad(x_bt, pad).reshape(b, num_chunks, chunk_size, *x_bt.shape[2:])
  return jnp.swapaxes(x_bcn, 0, 1)  # the batch axis stays whole (and sharded) inside every chunk


def chunked_token_sums(x_btd: jax.Array, batch: Batch, unembed: Callable, chunk_size: int) -> dict[str, jax.Array]:
  """`token_sums(unembed(x_btd), batch)` without the (B, T, V) logits: they exist one (B, N, V) chunk at
  a time, and the backward pass recomputes each chunk's instead of keeping them all. A chunk size that
  does not divide T pads the last chunk with masked-out tokens."""
  chunk_size = min(chunk_size, x_btd.shape[1])

  @jax.checkpoint
  def chunk_sums(chunk):
    x_bnd, targets_bn, mask_bn = chunk
    return token_sums(unembed(x_bnd), {"targets": targets_bn, "loss_mask": mask_bn})

  chunks = tuple(_chunks(x, chunk_size) for x in (x_btd, batch["targets"], batch["loss_mask"]))
  sums_c = jax.lax.map(chunk_sums, chunks)
  return jax.tree.map(lambda s_c: jnp.sum(s_c, axis=0), sums_c)


def loss_sums(params, batch: Batch, apply_fn: Callable, rngs=None, chunk_size: int = 0) -> dict[str, jax.Array]:
  """`token_sums` of the model's predictions; with `chunk_size` > 0, over chunks of that many tokens."""
  variables = {"params": params}
  kwargs = {"rngs": rngs} if rngs is not None else {}
  inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
  if not chunk_size:
    return token_sums(apply_fn(variables, *inputs, **kwargs), batch)
  x_btd = apply_fn(variables, *inputs, return_hidden=True, **kwargs)
  return chunked_token_sums(x_btd, batch, lambda x_bnd: apply_fn(variables, x_bnd, method=Transformer.unembed), chunk_size)


def loss_fn(params, batch: Batch, apply_fn: Callable, rngs=None, chunk_size: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean cross-entropy over the batch's loss-masked tokens, the sums it came from)."""
  sums = loss_sums(params, batch, apply_fn, rngs, chunk_size)
  return sums["nll_sum"] / jnp.maximum(sums["loss_tokens"], 1.0), sums
