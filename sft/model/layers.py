"""The Transformer's parts: rotary embeddings, RMSNorm and LayerNorm, the attention layer and the MLP
(masks and attention implementations are in sft.model.attention).

Einsum letters: B batch, T query length, S key length, D model, N query heads, K kv heads,
H head dim, F feed-forward.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft.model import axes
from sft.model.attention import cached_attention, causal_xla_attention, kernel_attention
from sft.model.backend import use_cpu_kernels
from sft.model.config import ModelConfig


def param(module: nn.Module, name: str, init, shape, logical_axes, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, logical_axes), shape, cfg.weight_dtype)


def fan_in_init(in_axis, out_axis, scale: float = 1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _rows_matmul(x, w_io, n_in: int, out_shape):
  """x with its last `n_in` axes merged, as (tokens, in), times the 2-D `w_io` (in, out); the result
  with the out axis split into `out_shape`."""
  y_mo = x.reshape(-1, w_io.shape[0]) @ w_io
  return y_mo.reshape(*x.shape[: x.ndim - n_in], *out_shape)


def _contract(spec: str, x, w, n_in: int):
  """`einsum(spec, x, w)`: x's last `n_in` axes against w's first `n_in`.

  On CPU (sft.model.backend.use_cpu_kernels), one 2-D product (tokens, in) @ (in, out): with the einsum's
  3-D and 4-D operands, XLA:CPU's layout assignment wrote gradients as (features, tokens) from inside
  elementwise fusions (the SwiGLU backward's, at a tenth of memory speed). Elsewhere, the einsum, with a
  multi-axis contraction merged into one axis: a plain 2-D weight, which XLA otherwise copies into
  another axis order at every call (every decoding step, for the attention output)."""
  if use_cpu_kernels():
    return _rows_matmul(x, w.reshape(math.prod(w.shape[:n_in]), -1), n_in, w.shape[n_in:])
  if n_in == 1:
    return jnp.einsum(spec, x, w)
  (x_spec, w_spec), out_spec = spec.split("->")[0].split(","), spec.split("->")[1]
  x_flat = x.reshape(*x.shape[: x.ndim - n_in], -1)
  w_flat = w.reshape(-1, *w.shape[n_in:])
  return jnp.einsum(f"{x_spec[:-n_in]}X,X{w_spec[n_in:]}->{out_spec}", x_flat, w_flat)


# A variable collection of projection weights stored (out, in): `project` multiplies by that copy
# when it is given one (CPU decoding, see sft.model.transformer.weights_out_in), else by the weight.
OUT_IN = "weights_out_in"


def project(module: nn.Module, name: str, x, spec: str, shape, logical_axes, n_in: int, init, train: bool):
  """`einsum(spec, x, W)` for the weight `name` of shape `shape` whose first `n_in` axes contract
  with x; plus, when `name` is a LoRA target, (alpha / r) * (x A) B with B starting at zero."""
  c = module.cfg
  w = param(module, name, init, shape, logical_axes, c)
  if module.has_variable(OUT_IN, name):
    y = _rows_matmul(x, module.get_variable(OUT_IN, name).astype(c.compute_dtype).T, n_in, shape[n_in:])
  else:
    y = _contract(spec, x, w.astype(c.compute_dtype), n_in)
  if not c.lora_rank or name not in c.lora_targets:
    return y
  (x_spec, w_spec), out_spec = spec.split("->")[0].split(","), spec.split("->")[1]
  w_in, w_out = w_spec[:n_in], w_spec[n_in:]
  mid_spec = "".join(ch for ch in out_spec if ch not in w_out) + "R"
  r = c.lora_rank
  a = param(module, f"{name}_lora_a", fan_in_init(tuple(range(n_in)), n_in), (*shape[:n_in], r), (*logical_axes[:n_in], axes.LORA), c)
  b = param(module, f"{name}_lora_b", nn.initializers.zeros, (r, *shape[n_in:]), (axes.LORA, *logical_axes[n_in:]), c)
  if c.lora_dropout and train:
    x = nn.Dropout(c.lora_dropout, deterministic=False)(x)
  mid = jnp.einsum(f"{x_spec},{w_in}R->{mid_spec}", x, a.astype(c.compute_dtype))
  return y + (c.lora_alpha / r) * jnp.einsum(f"{mid_spec},R{w_out}->{out_spec}", mid, b.astype(c.compute_dtype))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """(H/2,) rotary frequencies, with Llama 3.1 scaling when `cfg.rope_type == "llama3"`."""
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
  if cfg.rope_type == "llama3":
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_freq_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq_h) -> jax.Array:
  """Rotary embeddings, rotate-half layout (as in Hugging Face Llama), computed in float32."""
  angle_bth = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h, jnp.float32)
  sin_bt1h, cos_bt1h = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], axis=-1)
  return rotated.astype(x_btnh.dtype)


class RMSNorm(nn.Module):
  """Normalises the last axis in float32; `axis_name` is that axis's logical name."""

  cfg: ModelConfig
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.cfg.norm_plus_one else nn.initializers.ones
    scale = param(self, "scale", init, (x.shape[-1],), (self.axis_name,), self.cfg).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed * (1.0 + scale if self.cfg.norm_plus_one else scale)).astype(self.cfg.compute_dtype)


class LayerNorm(nn.Module):
  """Mean-centred normalisation with a scale and a bias (GPT-2), in float32."""

  cfg: ModelConfig
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x):
    shape, logical_axes = (x.shape[-1],), (self.axis_name,)
    scale = param(self, "scale", nn.initializers.ones, shape, logical_axes, self.cfg).astype(jnp.float32)
    bias = param(self, "bias", nn.initializers.zeros, shape, logical_axes, self.cfg).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed * scale + bias).astype(self.cfg.compute_dtype)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """The block and final norm `cfg.norm_type` names (q/k norms are always RMSNorm)."""
  return LayerNorm(cfg, name=name) if cfg.norm_type == "layer" else RMSNorm(cfg, name=name)


def add_bias(module: nn.Module, name: str, y, shape, logical_axes):
  """y + a zero-initialised bias `name` of `shape` (y's trailing axes)."""
  c = module.cfg
  return y + param(module, name, nn.initializers.zeros, shape, logical_axes, c).astype(c.compute_dtype)


class Attention(nn.Module):
  """Grouped-query attention, with rotary embeddings on per-segment positions unless the model
  learns absolute position embeddings instead."""

  cfg: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, x_btd, positions_bt, mask_b1ts, layer_cache=None, cache_index_b=None, segment_ids_bt=None, is_sliding=False):
    """Without a cache, keys are the T inputs: under the bool mask (B, 1, T, T), or, when the mask is
    None, by the `cfg.attention` kernel from the segment ids (`is_sliding`: this layer's window). With
    `layer_cache` (keys (B, K, H, S), values (B, K, S, H)), the T new keys are written at `cache_index_b` per row,
    queries attend to all S cached keys (mask (B, 1, T, S)), and the updated cache is returned."""
    c = self.cfg
    d, n, k, h = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    def proj(name, x, spec, shape, logical_axes, n_in, init):
      return project(self, name, x, spec, shape, logical_axes, n_in, init, self.train)

    q_btnh = proj("q", x_btd, "BTD,DNH->BTNH", (d, n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), 1, fan_in_init(0, (1, 2)))
    k_btkh = proj("k", x_btd, "BTD,DKH->BTKH", (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 1, fan_in_init(0, (1, 2)))
    v_btkh = proj("v", x_btd, "BTD,DKH->BTKH", (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 1, fan_in_init(0, (1, 2)))
    if c.qkv_bias or c.linear_bias:
      q_btnh = add_bias(self, "q_bias", q_btnh, (n, h), (axes.HEADS, axes.HEAD_DIM))
      k_btkh = add_bias(self, "k_bias", k_btkh, (k, h), (axes.KV_HEADS, axes.HEAD_DIM))
      v_btkh = add_bias(self, "v_bias", v_btkh, (k, h), (axes.KV_HEADS, axes.HEAD_DIM))
    if c.qk_norm:
      q_btnh = RMSNorm(c, axes.HEAD_DIM, name="q_norm")(q_btnh)
      k_btkh = RMSNorm(c, axes.HEAD_DIM, name="k_norm")(k_btkh)
    q_btnh = nn.with_logical_constraint(q_btnh, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
    if c.position_embedding == "rope":
      inv_freq_h = rope_inv_freq(c)
      q_btnh = apply_rope(q_btnh, positions_bt, inv_freq_h)
      k_btkh = apply_rope(k_btkh, positions_bt, inv_freq_h)
    if layer_cache is not None:
      write_k = jax.vmap(lambda cache_khs, new_tkh, i: jax.lax.dynamic_update_slice(cache_khs, new_tkh.transpose(1, 2, 0), (0, 0, i)))
      write_v = jax.vmap(lambda cache_ksh, new_tkh, i: jax.lax.dynamic_update_slice(cache_ksh, new_tkh.transpose(1, 0, 2), (0, i, 0)))
      layer_cache = (write_k(layer_cache[0], k_btkh, cache_index_b), write_v(layer_cache[1], v_btkh, cache_index_b))
    if mask_b1ts is None:
      out_btnh = kernel_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_sliding, c)
    elif layer_cache is None:
      out_btnh = causal_xla_attention(q_btnh, k_btkh, v_btkh, mask_b1ts, c)
    else:
      out_btnh = cached_attention(q_btnh, *layer_cache, mask_b1ts, c)
    o_axes = (axes.HEADS, axes.HEAD_DIM, axes.EMBED)
    out_btd = proj("o", out_btnh, "BTNH,NHD->BTD", (n, h, d), o_axes, 2, fan_in_init((0, 1), 2))
    if c.linear_bias:
      out_btd = add_bias(self, "o_bias", out_btd, (d,), (axes.EMBED,))
    return out_btd, layer_cache


class Mlp(nn.Module):
  """Gated feed-forward (SwiGLU, or GeGLU with the tanh GELU), or act(up) then down without a gate
  (GPT-2: the tanh GELU, with biases)."""

  cfg: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, x_btd):
    c = self.cfg
    def proj(name, x, spec, shape, logical_axes):
      return project(self, name, x, spec, shape, logical_axes, 1, fan_in_init(0, 1), self.train)

    act = jax.nn.silu if c.mlp_activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
    # The gate is made first: parameter creation order fixes the init rngs of existing models.
    gate_btf = proj("gate", x_btd, "BTD,DF->BTF", (c.d_model, c.mlp_dim), (axes.EMBED, axes.MLP)) if c.mlp_gated else None
    up_btf = proj("up", x_btd, "BTD,DF->BTF", (c.d_model, c.mlp_dim), (axes.EMBED, axes.MLP))
    if c.linear_bias:
      up_btf = add_bias(self, "up_bias", up_btf, (c.mlp_dim,), (axes.MLP,))
    hidden_btf = act(gate_btf) * up_btf if c.mlp_gated else act(up_btf)
    hidden_btf = nn.with_logical_constraint(hidden_btf, (axes.BATCH, axes.LENGTH, axes.MLP))
    down_btd = proj("down", hidden_btf, "BTF,FD->BTD", (c.mlp_dim, c.d_model), (axes.MLP, axes.EMBED))
    return add_bias(self, "down_bias", down_btd, (c.d_model,), (axes.EMBED,)) if c.linear_bias else down_btd
