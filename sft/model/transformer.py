"""A decoder-only Transformer (Llama-style, or GPT-2-style per its config) as pure Flax modules.

Parameters are a plain pytree and `apply` is a pure function:

    model = Transformer(cfg)
    params = model.init(rng, tokens_bt, positions_bt, segment_ids_bt)["params"]
    logits_btv = model.apply({"params": params}, tokens_bt, positions_bt, segment_ids_bt)

Einsum letters as in `sft.model.layers`, plus V vocab and L layers. Every parameter and activation
carries logical axis names from `sft.model.axes`; the config maps those to mesh axes.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft.model import axes
from sft.model.attention import attention_mask, decode_mask, softcap
from sft.model.backend import use_cpu_kernels
from sft.model.config import ModelConfig
from sft.model.layers import OUT_IN, Attention, Mlp, RMSNorm, fan_in_init, norm, param


class Block(nn.Module):
  """Pre-norm residual block; the (carry, per-layer output) signature lets `nn.scan` stack layers."""

  cfg: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, x_btd, positions_bt, masks, segment_ids_bt, layer_cache, cache_index_b, is_sliding):
    c = self.cfg
    mask_b1ts = None  # masks None: the attention kernel masks from the segment ids
    if masks is not None:
      full_mask_b1ts, sliding_mask_b1ts = masks
      mixed = c.sliding_window and c.sliding_window_pattern > 1
      mask_b1ts = jnp.where(is_sliding, sliding_mask_b1ts, full_mask_b1ts) if mixed else sliding_mask_b1ts
    attn_out, layer_cache = Attention(c, self.train, name="attn")(
        norm(c, "attn_norm")(x_btd), positions_bt, mask_b1ts, layer_cache, cache_index_b, segment_ids_bt, is_sliding
    )
    if c.sandwich_norms:
      attn_out = RMSNorm(c, name="post_attn_norm")(attn_out)
    x_btd = x_btd + attn_out
    mlp_out = Mlp(c, self.train, name="mlp")(norm(c, "mlp_norm")(x_btd))
    if c.sandwich_norms:
      mlp_out = RMSNorm(c, name="post_mlp_norm")(mlp_out)
    x_btd = x_btd + mlp_out
    return nn.with_logical_constraint(x_btd, (axes.BATCH, axes.LENGTH, axes.EMBED)), layer_cache


# What a rematerialised layer keeps for the backward pass (model.remat_policy): "full" keeps only its
# input and recomputes the rest; "save_dots" also keeps the projections' and MLP's matmul outputs
# (not attention's batched score products), recomputing norms, activations and attention.
REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def init_cache(cfg: ModelConfig, batch: int, cache_len: int) -> tuple[jax.Array, jax.Array]:
  """Empty (k, v) cache in the compute dtype: keys (L, B, K, H, S), values (L, B, K, S, H). Both put
  the (row, kv head) batch axes first and each side of attention's two products reads its operand in
  place: scores = q (G, H) @ keys (H, S), output = probs (G, S) @ values (S, H). With (B, S, K, H)
  XLA transposed the whole cache at every decoding step."""
  k, h = cfg.num_kv_heads, cfg.head_dim
  keys = jnp.zeros((cfg.num_layers, batch, k, h, cache_len), cfg.compute_dtype)
  return keys, jnp.zeros((cfg.num_layers, batch, k, cache_len, h), cfg.compute_dtype)


def split_layers(params):
  """Parameters with the stacked (L, ...) `layers` tree as a tuple of L per-layer trees, for per-layer
  decoding (see Transformer); anything without `layers` is returned as it is."""
  if "layers" not in params:
    return params
  stacked = params["layers"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers))}


# The projections of a layer, and how many leading axes of each weight are its inputs.
_PROJECTION_INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def weights_out_in(params) -> dict:
  """For CPU decoding: every projection weight of per-layer parameters (`split_layers`), and an untied
  unembedding, as an (out, in) matrix, in the `OUT_IN` collection's tree layout. Passed to `apply`
  beside the parameters, they are what the projections multiply by. XLA:CPU multiplies a few rows
  (a decoding step's) by a weight stored (out, in) 1.2-1.8x faster than by one stored (in, out);
  the copy is made once per call, before the token loop, and held for the call (a second copy of
  those weights in memory)."""
  def out_in(w, n_in):
    return w.reshape(math.prod(w.shape[:n_in]), -1).T

  def layer(layer_params):
    return {
        module: {name: out_in(w, _PROJECTION_INPUT_AXES[name]) for name, w in weights.items() if name in _PROJECTION_INPUT_AXES}
        for module, weights in layer_params.items()
        if module in ("attn", "mlp")
    }

  params = nn.unbox(params)
  out = {"layers": tuple(layer(p) for p in params["layers"])} if "layers" in params else {}
  if "unembed" in params:
    out["unembed"] = params["unembed"].T
  return out


def split_cache(cache: tuple[jax.Array, jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """The stacked (k, v) cache as a list of L per-layer (k (B, K, H, S), v (B, K, S, H))."""
  k_lbkhs, v_lbksh = cache
  return [(k_lbkhs[i], v_lbksh[i]) for i in range(k_lbkhs.shape[0])]


class Transformer(nn.Module):
  """tokens (B, T), positions (B, T), segment ids (B, T) -> float32 logits (B, T, V).

  For decoding, pass `cache` (from `init_cache`) and `cache_index_b`, the slot of each row's first new
  token; segment ids are then unused, and (logits, updated cache) is returned. A decoding loop passes
  the cache as per-layer arrays (`split_cache`) with parameters from `split_layers`: its layers then
  run one by one on weights and cache slots of their own.
  With `train=True`, LoRA dropout is on and needs a "dropout" rng.
  With `return_hidden=True`, the final-norm hidden states (B, T, D) come back instead of logits (with the
  cache when decoding), for a loss that unembeds them a chunk at a time, or a prefill that unembeds only
  each row's last prompt token (`apply(..., method=Transformer.unembed)`).
  """

  cfg: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, tokens_bt, positions_bt, segment_ids_bt=None, cache=None, cache_index_b=None, return_hidden=False):
    c = self.cfg
    embedding_vd = param(
        self, "embedding", nn.initializers.normal(stddev=0.02), (c.vocab_size, c.d_model), (axes.VOCAB, axes.EMBED), c
    )
    x_btd = jnp.take(embedding_vd, tokens_bt, axis=0).astype(c.compute_dtype)
    if c.position_embedding == "learned":
      # Indexed by each token's own position (restarting per packed segment; the cache slot when decoding).
      position_embedding_pd = param(
          self, "position_embedding", nn.initializers.normal(stddev=0.01), (c.max_positions, c.d_model), (None, axes.EMBED), c
      )
      x_btd = x_btd + jnp.take(position_embedding_pd, positions_bt, axis=0).astype(c.compute_dtype)
    if c.embed_scale:
      x_btd = x_btd * jnp.asarray(c.d_model**0.5, c.compute_dtype)  # rounded to the compute dtype, as Gemma does
    x_btd = nn.with_logical_constraint(x_btd, (axes.BATCH, axes.LENGTH, axes.EMBED))
    # (full, sliding) bool masks for the XLA path and for decoding; the same array twice without a window.
    if cache is not None:
      num_new, cache_len = tokens_bt.shape[1], cache[0][0].shape[-1]  # layer 0's keys (B, K, H, S), stacked or not
      full = decode_mask(cache_index_b, num_new, cache_len)
      masks = (full, decode_mask(cache_index_b, num_new, cache_len, c.sliding_window) if c.sliding_window else full)
    elif c.attention == "xla":
      full = attention_mask(segment_ids_bt)
      masks = (full, attention_mask(segment_ids_bt, c.sliding_window) if c.sliding_window else full)
    else:
      masks = None
    is_sliding_l = jnp.asarray([c.layer_uses_sliding_window(i) for i in range(c.num_layers)])

    if isinstance(cache, list):
      # Per-layer decoding (split_layers, split_cache): layer i's weights and cache are arrays of their
      # own, so a decoding loop neither copies a layer's weights out of the stack nor rebuilds the
      # stacked cache at every token.
      layer_params, cache = self.variables["params"]["layers"], list(cache)
      layer_out_in = self.variables.get(OUT_IN, {}).get("layers")
      for i in range(c.num_layers):
        variables = {"params": layer_params[i], **({OUT_IN: layer_out_in[i]} if layer_out_in else {})}
        x_btd, cache[i] = Block(c, self.train).apply(
            variables, x_btd, positions_bt, masks, segment_ids_bt, cache[i], cache_index_b, is_sliding_l[i]
        )
    elif cache is None and not c.scan_layers and not self.is_initializing():
      x_btd = self._layers_one_by_one(x_btd, positions_bt, masks, segment_ids_bt, is_sliding_l)
    else:
      block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[c.remat_policy]) if c.remat else Block
      # One traced layer scanned L times: compile time does not grow with depth.
      layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
          length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS},
      )(c, self.train, name="layers")
      x_btd, cache = layers(x_btd, positions_bt, masks, segment_ids_bt, cache, cache_index_b, is_sliding_l)
    x_btd = norm(c, "final_norm")(x_btd)

    table_is_vd = c.tie_embeddings
    if c.tie_embeddings:
      table = embedding_vd
    else:
      table = param(self, "unembed", fan_in_init(0, 1), (c.d_model, c.vocab_size), (axes.EMBED, axes.VOCAB), c)
      if self.has_variable(OUT_IN, "unembed"):
        table, table_is_vd = self.get_variable(OUT_IN, "unembed"), True
    if return_hidden:
      return x_btd if cache is None else (x_btd, cache)
    logits_btv = unembed_logits(x_btd, table, c, table_is_vd)
    return logits_btv if cache is None else (logits_btv, cache)

  def _layers_one_by_one(self, x_btd, positions_bt, masks, segment_ids_bt, is_sliding_l):
    """The layers as L traced copies over slices of the same stacked (L, ...) parameters
    (`model.scan_layers=False`): no loop-carried stacks of activations for the backward pass, at the
    price of a compile time that grows with depth."""
    c = self.cfg
    stacked = nn.unbox(self.variables["params"]["layers"])
    dropout = self.train and c.lora_rank and c.lora_dropout

    def layer(params, x_btd, i, rng):
      rngs = {"dropout": rng} if dropout else {}
      return Block(c, self.train).apply(
          {"params": params}, x_btd, positions_bt, masks, segment_ids_bt, None, None, is_sliding_l[i], rngs=rngs
      )[0]

    if c.remat:
      layer = jax.checkpoint(layer, prevent_cse=False, policy=REMAT_POLICIES[c.remat_policy], static_argnums=(2,))
    rng = self.make_rng("dropout") if dropout else None
    for i in range(c.num_layers):
      layer_rng = jax.random.fold_in(rng, i) if dropout else None
      x_btd = layer(jax.tree.map(lambda x, i=i: x[i], stacked), x_btd, i, layer_rng)
    return x_btd

  def unembed(self, x_btd):
    """Hidden states (B, T, D) -> float32 logits (B, T, V) with the tied embedding or `unembed`."""
    c = self.cfg
    table = nn.unbox(self.get_variable("params", "embedding" if c.tie_embeddings else "unembed"))
    return unembed_logits(x_btd, table, c)


def unembed_logits(x_btd: jax.Array, table: jax.Array, cfg: ModelConfig, table_is_vd: bool | None = None) -> jax.Array:
  """The output projection, accumulated and returned in float32 (bf16 logits would round before the
  softmax); `table` is (V, D) (the tied embedding, or `weights_out_in`'s unembedding) when
  `table_is_vd` (default: when tied), else the unembedding (D, V)."""
  tied = cfg.tie_embeddings if table_is_vd is None else table_is_vd
  table = table.astype(cfg.compute_dtype)
  if use_cpu_kernels():  # see _unembed_product_bwd; GPUs and TPUs multiply transposed operands as they are
    logits_btv = _unembed_product(x_btd, table, tied)
  else:
    logits_btv = jnp.einsum(_spec(tied), x_btd, table, preferred_element_type=jnp.float32)
  logits_btv = nn.with_logical_constraint(logits_btv, (axes.BATCH, axes.LENGTH, axes.VOCAB))
  return softcap(logits_btv, cfg.final_logit_softcap)


def _spec(tied: bool) -> str:
  return "BTD,VD->BTV" if tied else "BTD,DV->BTV"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unembed_product(x_btd, table, tied: bool):
  return jnp.einsum(_spec(tied), x_btd, table, preferred_element_type=jnp.float32)


def _unembed_product_fwd(x_btd, table, tied):
  return _unembed_product(x_btd, table, tied), (x_btd, table)


def _unembed_product_bwd(tied, residuals, g_btv):
  """The table's gradient as (D, tokens) @ (tokens, V) from an explicitly transposed copy of the hidden
  states (D x tokens: small): left to itself, XLA:CPU transposed the (tokens, V) logits' gradient
  instead and ran the product at half its matmul speed. The barrier keeps the transpose from being
  folded back into the product."""
  x_btd, table = residuals
  dx_btd = jnp.einsum("BTV,VD->BTD" if tied else "BTV,DV->BTD", g_btv, table, preferred_element_type=jnp.float32)
  x_dn = jax.lax.optimization_barrier(x_btd.reshape(-1, x_btd.shape[-1]).T)
  dtable_dv = jnp.matmul(x_dn, g_btv.reshape(-1, g_btv.shape[-1]), preferred_element_type=jnp.float32)
  return dx_btd.astype(x_btd.dtype), (dtable_dv.T if tied else dtable_dv).astype(table.dtype)


_unembed_product.defvjp(_unembed_product_fwd, _unembed_product_bwd)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
