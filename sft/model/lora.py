"""LoRA bookkeeping: which parameters train, and merging adapters into the base weights.

Adapters are the parameters named `<projection>_lora_a` (input axes, r) and `<projection>_lora_b`
(r, output axes) beside each targeted projection; `sft.model.layers.project` applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft.model.config import ModelConfig


def _is_adapter(path) -> bool:
  return "_lora_" in str(getattr(path[-1], "key", ""))


def trainable_mask(params: Any, cfg: ModelConfig) -> Any:
  """True where a parameter trains: only the adapters when LoRA is on, everything otherwise."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_adapter(path) or not cfg.lora_rank, params)


def base_params(params: Any) -> Any:
  """The tree without its adapters (what a checkpoint without LoRA holds)."""
  if isinstance(params, dict):
    return {k: base_params(v) for k, v in params.items() if "_lora_" not in k}
  return params


def adapters(params: Any) -> Any:
  """The tree with only its adapters (subtrees without any left out): what `init_adapters` makes."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if "_lora_" in key:
      out[key] = value
    elif isinstance(value, dict) and (sub := adapters(value)):
      out[key] = sub
  return out


def with_adapters(base: Any, adapter_tree: Any) -> Any:
  """`base` (a tree without adapters) with the adapters of `adapter_tree` added beside their
  projections; the base leaves are the very same arrays, not copies."""
  out = dict(base)
  for key, value in adapter_tree.items():
    out[key] = with_adapters(base[key], value) if isinstance(value, dict) and "_lora_" not in key else value
  return out


def adapter_init(model: Any, dummy_inputs: tuple) -> Any:
  """rng -> fresh adapters of `model` (A as the model initialises it, B zero), the values of a whole
  `model.init(rng)`. Its outputs are the adapters alone, so under `jax.jit` the base weights'
  initialisation is dead code that XLA drops: no base-sized buffer is ever allocated."""

  def init(rng):
    return adapters(nn.unbox(model.init(rng, *dummy_inputs)["params"]))

  return init


def init_adapters(model: Any, dummy_inputs: tuple, shardings: Any, rng: jax.Array) -> Any:
  """Fresh adapters (`adapter_init`), each created directly in its shards (`shardings`: the whole
  parameter tree's, of which only the adapters' are used). Beside a loaded base (`with_adapters`),
  no second copy of the base is ever made."""
  return jax.jit(adapter_init(model, dummy_inputs), out_shardings=adapters(shardings))(rng)


def merge(params: Any, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  """(W + alpha / r * A B for every adapter, the config without LoRA): the same function, plain weights."""
  if not cfg.lora_rank:
    return params, cfg
  scale = cfg.lora_alpha / cfg.lora_rank

  def merge_dict(tree):
    out = {}
    for key, value in tree.items():
      if "_lora_" in key:
        continue
      if isinstance(value, dict):
        out[key] = merge_dict(value)
      elif f"{key}_lora_a" in tree:
        a, b = tree[f"{key}_lora_a"], tree[f"{key}_lora_b"]
        # Stacked layers: W (L, *in, *out), A (L, *in, r), B (L, r, *out).
        n_in = a.ndim - 2
        layers, rank = a.shape[0], a.shape[-1]
        a2 = a.reshape(layers, int(np.prod(a.shape[1 : 1 + n_in])), rank).astype(jnp.float32)
        b2 = b.reshape(layers, rank, -1).astype(jnp.float32)
        delta = jnp.einsum("LIR,LRO->LIO", a2, b2).reshape(value.shape)
        out[key] = (value.astype(jnp.float32) + scale * delta).astype(value.dtype)
      else:
        out[key] = value
    return out

  return merge_dict(params), dataclasses.replace(cfg, lora_rank=0)
