"""LoRA bookkeeping: which parameters train, and merging adapters into the base weights.

Adapters are the parameters named `<projection>_lora_a` (input axes, r) and `<projection>_lora_b`
(r, output axes) beside each targeted projection; `sft.model.layers.project` applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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


def with_base(params: Any, base: Any) -> Any:
  """`params` with every non-adapter leaf taken from `base` (adapters kept)."""
  if isinstance(params, dict):
    return {k: (v if "_lora_" in k else with_base(v, base[k])) for k, v in params.items()}
  return base


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
