"""A decoder-only Transformer (Llama-style) as pure Flax modules.

Parameters are a plain pytree and `apply` is a pure function:

    model = Transformer(cfg)
    params = model.init(rng, tokens_bt, positions_bt, segment_ids_bt)["params"]
    logits_btv = model.apply({"params": params}, tokens_bt, positions_bt, segment_ids_bt)

Einsum letters: B batch, T query length, S key length, D model, N query heads, K kv heads,
H head dim, F feed-forward, V vocab, L layers. Every parameter and activation carries logical axis
names from `sft.model.axes`; the config maps those to mesh axes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft.config import ConfigError
from sft.model import axes

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of the model. Built from the `model` section of a run config."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"  # stored parameters (and optimizer moments)
  remat: bool = False  # recompute each layer's activations in the backward pass

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(f"model.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]


def _param(module: nn.Module, name: str, init, shape, logical_axes, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, logical_axes), shape, cfg.weight_dtype)


def _fan_in_init(in_axis, out_axis, scale: float = 1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """Causal and segment-aware: a token sees earlier tokens of its own packed example only.

  Returns a bool mask of shape (B, 1, T, T). Padding (segment 0) sees padding, so no row is empty.
  """
  length = segment_ids_bt.shape[-1]
  same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  causal_tt = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  return (same_segment_btt & causal_tt)[:, None, :, :]


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary embeddings, rotate-half layout (as in Hugging Face Llama), computed in float32."""
  head_dim = x_btnh.shape[-1]
  inv_freq_h = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq_h
  sin_bt1h, cos_bt1h = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], axis=-1)
  return rotated.astype(x_btnh.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd):
    scale_d = _param(self, "scale", nn.initializers.ones, (x_btd.shape[-1],), (axes.EMBED,), self.cfg)
    x32 = x_btd.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed * scale_d.astype(jnp.float32)).astype(self.cfg.compute_dtype)


class Attention(nn.Module):
  """Grouped-query attention with rotary embeddings on per-segment positions."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd, positions_bt, mask_b1ts, layer_cache=None, cache_index_b=None):
    """Without a cache, keys are the T inputs (mask (B, 1, T, T)). With `layer_cache` (k, v), each
    (B, S, K, H), the T new keys are written at `cache_index_b` per row, queries attend to all S
    cached keys (mask (B, 1, T, S)), and the updated cache is returned alongside the output."""
    c = self.cfg
    d, n, k, h = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    w_q = _param(self, "q", _fan_in_init(0, (1, 2)), (d, n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), c)
    w_k = _param(self, "k", _fan_in_init(0, (1, 2)), (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), c)
    w_v = _param(self, "v", _fan_in_init(0, (1, 2)), (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), c)
    w_o = _param(self, "o", _fan_in_init((0, 1), 2), (n, h, d), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), c)
    dt = c.compute_dtype
    q_btnh = jnp.einsum("BTD,DNH->BTNH", x_btd, w_q.astype(dt))
    k_btkh = jnp.einsum("BTD,DKH->BTKH", x_btd, w_k.astype(dt))
    v_btkh = jnp.einsum("BTD,DKH->BTKH", x_btd, w_v.astype(dt))
    q_btnh = nn.with_logical_constraint(q_btnh, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
    q_btnh = apply_rope(q_btnh, positions_bt, c.rope_theta)
    k_btkh = apply_rope(k_btkh, positions_bt, c.rope_theta)
    if layer_cache is not None:
      write = jax.vmap(lambda cache_skh, new_tkh, i: jax.lax.dynamic_update_slice(cache_skh, new_tkh, (i, 0, 0)))
      layer_cache = (write(layer_cache[0], k_btkh, cache_index_b), write(layer_cache[1], v_btkh, cache_index_b))
      k_btkh, v_btkh = layer_cache
    # jax.nn.dot_product_attention groups the N query heads over the K kv heads itself.
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1ts)
    return jnp.einsum("BTNH,NHD->BTD", out_btnh, w_o.astype(dt)), layer_cache


class Mlp(nn.Module):
  """SwiGLU feed-forward."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd):
    c = self.cfg
    w_gate = _param(self, "gate", _fan_in_init(0, 1), (c.d_model, c.mlp_dim), (axes.EMBED, axes.MLP), c)
    w_up = _param(self, "up", _fan_in_init(0, 1), (c.d_model, c.mlp_dim), (axes.EMBED, axes.MLP), c)
    w_down = _param(self, "down", _fan_in_init(0, 1), (c.mlp_dim, c.d_model), (axes.MLP, axes.EMBED), c)
    dt = c.compute_dtype
    gate_btf = jnp.einsum("BTD,DF->BTF", x_btd, w_gate.astype(dt))
    up_btf = jnp.einsum("BTD,DF->BTF", x_btd, w_up.astype(dt))
    hidden_btf = nn.with_logical_constraint(jax.nn.silu(gate_btf) * up_btf, (axes.BATCH, axes.LENGTH, axes.MLP))
    return jnp.einsum("BTF,FD->BTD", hidden_btf, w_down.astype(dt))


class Block(nn.Module):
  """Pre-norm residual block; the (carry, per-layer output) signature lets `nn.scan` stack layers."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd, positions_bt, mask_b1ts, layer_cache, cache_index_b):
    attn_out, layer_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_btd), positions_bt, mask_b1ts, layer_cache, cache_index_b
    )
    x_btd = x_btd + attn_out
    x_btd = x_btd + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_btd))
    return nn.with_logical_constraint(x_btd, (axes.BATCH, axes.LENGTH, axes.EMBED)), layer_cache


def decode_mask(cache_index_b: jax.Array, num_new: int, cache_len: int) -> jax.Array:
  """(B, 1, T, S): new token t of row b sits at cache_index_b + t and sees cache slots up to there."""
  query_bt = cache_index_b[:, None] + jnp.arange(num_new)[None, :]
  return (jnp.arange(cache_len)[None, None, :] <= query_bt[:, :, None])[:, None, :, :]


def init_cache(cfg: ModelConfig, batch: int, cache_len: int) -> tuple[jax.Array, jax.Array]:
  """Empty (k, v) cache, each (L, B, S, K, H) in the compute dtype."""
  shape = (cfg.num_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
  return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)


class Transformer(nn.Module):
  """tokens (B, T), positions (B, T), segment ids (B, T) -> float32 logits (B, T, V).

  For decoding, pass `cache` (from `init_cache`) and `cache_index_b`, the slot of each row's first new
  token; segment ids are then unused, and (logits, updated cache) is returned.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_bt, positions_bt, segment_ids_bt=None, cache=None, cache_index_b=None):
    c = self.cfg
    embedding_vd = _param(
        self, "embedding", nn.initializers.normal(stddev=0.02), (c.vocab_size, c.d_model), (axes.VOCAB, axes.EMBED), c
    )
    x_btd = jnp.take(embedding_vd, tokens_bt, axis=0).astype(c.compute_dtype)
    x_btd = nn.with_logical_constraint(x_btd, (axes.BATCH, axes.LENGTH, axes.EMBED))
    if cache is None:
      mask_b1ts = attention_mask(segment_ids_bt)
    else:
      mask_b1ts = decode_mask(cache_index_b, tokens_bt.shape[1], cache[0].shape[2])

    block = nn.remat(Block, prevent_cse=False) if c.remat else Block
    # One traced layer scanned L times: compile time does not grow with depth.
    layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS},
    )(c, name="layers")
    x_btd, cache = layers(x_btd, positions_bt, mask_b1ts, cache, cache_index_b)
    x_btd = RMSNorm(c, name="final_norm")(x_btd)

    if c.tie_embeddings:
      logits_btv = jnp.einsum("BTD,VD->BTV", x_btd, embedding_vd.astype(c.compute_dtype))
    else:
      unembed_dv = _param(self, "unembed", _fan_in_init(0, 1), (c.d_model, c.vocab_size), (axes.EMBED, axes.VOCAB), c)
      logits_btv = jnp.einsum("BTD,DV->BTV", x_btd, unembed_dv.astype(c.compute_dtype))
    logits_btv = nn.with_logical_constraint(logits_btv, (axes.BATCH, axes.LENGTH, axes.VOCAB)).astype(jnp.float32)
    return logits_btv if cache is None else (logits_btv, cache)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
