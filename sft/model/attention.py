"""Attention: the masks, and the three implementations `ModelConfig.attention` chooses between.

- "xla": plain XLA on any backend. Masks are bool (B, 1, T, S) arrays applied with `where`; no float
  mask or bias is built, and blocks of scores the causal mask hides entirely are skipped. Decoding with
  a KV cache always takes this path.
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA
  GPUs, bfloat16/float16). Causal and sliding windows are cuDNN's own mask types; packed examples are
  kept apart with the same-segment mask, which cuDNN adds as a bias.
- "splash": the Pallas Splash kernel on TPUs, with segment ids and causal or local masks computed inside
  the kernel (fully masked blocks are skipped). Off TPU it runs in Pallas' interpreter: slow, exact.

Einsum letters as in `sft.model.layers`; G query heads per kv head.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sft.errors import ConfigError
from sft.model import axes
from sft.model.config import ModelConfig


def _window(query_t1: jax.Array, key_1s: jax.Array, sliding_window: int) -> jax.Array:
  """key <= query, and within `sliding_window` tokens of it when that is set."""
  visible = key_1s <= query_t1
  if sliding_window:
    visible &= query_t1 - key_1s < sliding_window
  return visible


def attention_mask(segment_ids_bt: jax.Array, sliding_window: int = 0) -> jax.Array:
  """Causal and segment-aware: a token sees earlier tokens of its own packed example only.

  Returns a bool mask of shape (B, 1, T, T). Padding (segment 0) sees padding, so no row is empty.
  """
  index_t = jnp.arange(segment_ids_bt.shape[-1])
  same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  causal_tt = _window(index_t[:, None], index_t[None, :], sliding_window)
  return (same_segment_btt & causal_tt)[:, None, :, :]


def decode_mask(cache_index_b: jax.Array, num_new: int, cache_len: int, sliding_window: int = 0) -> jax.Array:
  """(B, 1, T, S): new token t of row b sits at cache_index_b + t and sees cache slots up to there."""
  query_bt = cache_index_b[:, None] + jnp.arange(num_new)[None, :]
  return _window(query_bt[:, :, None], jnp.arange(cache_len)[None, None, :], sliding_window)[:, None, :, :]


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): smooth clipping to (-cap, cap); identity when cap is 0."""
  return cap * jnp.tanh(x / cap) if cap else x


def _scale(cfg: ModelConfig) -> float:
  return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


def xla_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, cfg: ModelConfig) -> jax.Array:
  """Softmax attention of N query heads over K kv heads (N = K * G) under a bool mask."""
  if not cfg.attn_logit_softcap:
    # jax.nn.dot_product_attention groups the query heads over the kv heads itself.
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=_scale(cfg))
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
  scores_bkgts = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k_bskh).astype(jnp.float32) * _scale(cfg)
  scores_bkgts = softcap(scores_bkgts, cfg.attn_logit_softcap)
  scores_bkgts = jnp.where(mask_b1ts[:, :, None], scores_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs_bkgts, v_bskh).reshape(b, t, n, h)


def cached_attention(q_btnh, k_bkhs, v_bksh, mask_b1ts, cfg: ModelConfig) -> jax.Array:
  """Attention of T new queries over a KV cache of keys (B, K, H, S) and values (B, K, S, H): the
  (row, kv head) batch axes lead and each product reads its cache operand in place, as (H, S) and
  (S, H) matrices (keys stored (S, H) ran the score product 3x slower)."""
  b, t, n, h = q_btnh.shape
  k = k_bkhs.shape[1]
  q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)  # T new tokens: a small copy
  scores_bkgts = jnp.einsum("BKGTH,BKHS->BKGTS", q_bkgth, k_bkhs, preferred_element_type=jnp.float32) * _scale(cfg)
  scores_bkgts = softcap(scores_bkgts, cfg.attn_logit_softcap)
  scores_bkgts = jnp.where(mask_b1ts[:, :, None], scores_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bksh.dtype)
  out_bkgth = jnp.einsum("BKGTS,BKSH->BKGTH", probs_bkgts, v_bksh)
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# Self-attention runs in up to this many query blocks, block i over keys [0, end of block i] only: the
# causal mask's fully masked upper blocks are never computed ((n + 1) / 2n of the score work for n
# blocks: 62% at 4). Blocks are at least MIN_QUERY_BLOCK tokens, so short sequences stay one block.
MAX_QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 128


def query_blocks(seq_len: int) -> int:
  """How many equal query blocks causal self-attention over `seq_len` tokens is split into."""
  n = min(seq_len // MIN_QUERY_BLOCK, MAX_QUERY_BLOCKS)
  while n > 1 and seq_len % n:
    n -= 1
  return max(n, 1)


def causal_xla_attention(q_btnh, k_btkh, v_btkh, mask_b1tt, cfg: ModelConfig) -> jax.Array:
  """`xla_attention` of T queries over the same T keys under a causal mask, block by block (see
  MAX_QUERY_BLOCKS): the same result without the scores no query can see."""
  t = q_btnh.shape[1]
  n = query_blocks(t)
  if n == 1:
    return xla_attention(q_btnh, k_btkh, v_btkh, mask_b1tt, cfg)
  size = t // n
  outs = []
  for i in range(n):
    rows, keys = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
    outs.append(xla_attention(q_btnh[:, rows], k_btkh[:, keys], v_btkh[:, keys], mask_b1tt[:, :, rows, keys], cfg))
  return jnp.concatenate(outs, axis=1)


def cudnn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, cfg: ModelConfig, sliding: bool) -> jax.Array:
  if jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU; this is {jax.default_backend()} (use 'xla')")
  same_segment_b1tt = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
  window = (cfg.sliding_window - 1, 0) if sliding else None
  return jax.nn.dot_product_attention(
      q_btnh, k_btkh, v_btkh, mask=same_segment_b1tt, scale=_scale(cfg), is_causal=True, local_window_size=window,
      implementation="cudnn",
  )


def splash_problem(seq_len: int) -> str | None:
  """Splash runs in query blocks of at least MIN_QUERY_BLOCK tokens (checked with the config)."""
  if seq_len % MIN_QUERY_BLOCK:
    return f"model.attention 'splash' runs in blocks of 128 tokens: train.seq_len must be a multiple of 128, got {seq_len}"
  return None


def _splash_block(seq_len: int) -> int:
  problem = splash_problem(seq_len)
  if problem:  # a caller that bypassed the config check
    raise ConfigError(problem)
  return next(block for block in (512, 256, MIN_QUERY_BLOCK) if seq_len % block == 0)


def _splash_kernel(num_heads: int, seq_len: int, cfg: ModelConfig, sliding: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  shape = (seq_len, seq_len)
  head_mask = mask_lib.LocalMask(shape, (cfg.sliding_window - 1, 0), 0) if sliding else mask_lib.CausalMask(shape)
  block = _splash_block(seq_len)
  sizes = kernel_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
      block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
  )
  return kernel_lib.make_splash_mha(
      mask_lib.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
      attn_logits_soft_cap=cfg.attn_logit_softcap or None, interpret=jax.default_backend() != "tpu",
  ), kernel_lib.SegmentIds


def _splash_local(q_bnth, k_bkth, v_bkth, segment_ids_bt, cfg: ModelConfig, sliding: bool) -> jax.Array:
  """Splash on one device's share: a kernel over its (N', T, H) heads, vmapped over its rows."""
  kernel, segment_ids = _splash_kernel(q_bnth.shape[1], q_bnth.shape[2], cfg, sliding)
  one_row = lambda q, k, v, ids: kernel(q, k, v, segment_ids=segment_ids(ids, ids))  # noqa: E731
  return jax.vmap(one_row)(q_bnth, k_bkth, v_bkth, segment_ids_bt)


def splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, cfg: ModelConfig, sliding: bool) -> jax.Array:
  """Pallas kernels are not partitioned by XLA: under a mesh, each device runs the kernel on its own
  rows and heads (shard_map, laid out by the logical axis rules in force)."""
  q_bnth = jnp.swapaxes(q_btnh * jnp.asarray(_scale(cfg), q_btnh.dtype), 1, 2)  # the kernel does not scale
  k_bkth, v_bkth = jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2)
  local = functools.partial(_splash_local, cfg=cfg, sliding=sliding)
  mesh = jax.sharding.get_abstract_mesh()
  # No mesh, or no axis rules in force (inside pmap, each device runs its own rows): the kernel directly.
  if mesh.empty or mesh.size == 1 or not nn.get_logical_axis_rules():
    out_bnth = local(q_bnth, k_bkth, v_bkth, segment_ids_bt)
  else:
    q_spec = nn.logical_to_mesh_axes((axes.BATCH, axes.HEADS, None, None))
    kv_spec = nn.logical_to_mesh_axes((axes.BATCH, axes.KV_HEADS, None, None))
    ids_spec = PartitionSpec(q_spec[0], None)
    out_bnth = jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec, check_vma=False
    )(q_bnth, k_bkth, v_bkth, segment_ids_bt)
  return jnp.swapaxes(out_bnth, 1, 2)


KERNELS = {"cudnn": cudnn_attention, "splash": splash_attention}


def kernel_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_sliding, cfg: ModelConfig) -> jax.Array:
  """Self-attention over T tokens by `cfg.attention`'s kernel. A kernel's mask is static, so models that
  alternate sliding and full layers (Gemma 2) pick one of two kernels per layer with `lax.cond`."""
  kernel = functools.partial(KERNELS[cfg.attention], cfg=cfg)
  mixed = cfg.sliding_window and cfg.sliding_window_pattern > 1
  if not mixed:
    return kernel(q_btnh, k_btkh, v_btkh, segment_ids_bt, sliding=bool(cfg.sliding_window))
  return jax.lax.cond(
      is_sliding, functools.partial(kernel, sliding=True), functools.partial(kernel, sliding=False),
      q_btnh, k_btkh, v_btkh, segment_ids_bt,
  )
