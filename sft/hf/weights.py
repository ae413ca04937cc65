"""Hugging Face safetensors checkpoints <-> sft parameter trees.

Loading reads one tensor at a time and places each parameter straight into its `NamedSharding`
(every device receives only its own slice), so no device ever holds a full copy of the model.
Only safetensors and JSON are read: never pickles, never remote code.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sft.console import bar, track
from sft.hf import safetensors_io
from sft.hf.config import from_hf_config, read_hf_config, to_hf_config
from sft.model import ModelConfig, Transformer

Convert = Callable[[np.ndarray, ModelConfig], np.ndarray]
_same: Convert = lambda w, c: w


def _heads(n_attr: str) -> tuple[Convert, Convert]:
  """(D, n*H) projection weights stored by HF as (n*H, D) <-> sft's (D, n, H)."""
  return (
      lambda w, c: w.T.reshape(c.d_model, getattr(c, n_attr), c.head_dim),
      lambda p, c: p.reshape(c.d_model, -1).T,
  )


def _head_bias(n_attr: str) -> tuple[Convert, Convert]:
  return (lambda w, c: w.reshape(getattr(c, n_attr), c.head_dim), lambda p, c: p.reshape(-1))


_transpose: tuple[Convert, Convert] = (lambda w, c: w.T, lambda p, c: p.T)

# sft path under params["layers"] -> (HF name inside model.layers.{i}., to sft, to HF)
LAYER_TENSORS: dict[tuple[str, ...], tuple[str, Convert, Convert]] = {
    ("attn", "q"): ("self_attn.q_proj.weight", *_heads("num_heads")),
    ("attn", "k"): ("self_attn.k_proj.weight", *_heads("num_kv_heads")),
    ("attn", "v"): ("self_attn.v_proj.weight", *_heads("num_kv_heads")),
    ("attn", "o"): (
        "self_attn.o_proj.weight",
        lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.d_model),
        lambda p, c: p.reshape(-1, c.d_model).T,
    ),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", *_head_bias("num_heads")),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", *_head_bias("num_kv_heads")),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", *_head_bias("num_kv_heads")),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", _same, _same),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", _same, _same),
    ("attn_norm", "scale"): ("input_layernorm.weight", _same, _same),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _same, _same),
    ("mlp", "gate"): ("mlp.gate_proj.weight", *_transpose),
    ("mlp", "up"): ("mlp.up_proj.weight", *_transpose),
    ("mlp", "down"): ("mlp.down_proj.weight", *_transpose),
}
TOP_TENSORS: dict[tuple[str, ...], tuple[str, Convert, Convert]] = {
    ("embedding",): ("model.embed_tokens.weight", _same, _same),
    ("final_norm", "scale"): ("model.norm.weight", _same, _same),
    ("unembed",): ("lm_head.weight", *_transpose),
}
# Gemma 2 names its four norms differently: post_attention_layernorm is on the attention output.
SANDWICH_NORMS: dict[tuple[str, ...], tuple[str, Convert, Convert]] = {
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", _same, _same),
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", _same, _same),
    ("post_mlp_norm", "scale"): ("post_feedforward_layernorm.weight", _same, _same),
}


# GPT-2 stores Conv1D weights as (in, out), the transpose of nn.Linear's, and q, k, v fused in c_attn.
def _gpt2_heads(w, c):
  return w.reshape(c.d_model, c.num_heads, c.head_dim)


def _gpt2_head_bias(w, c):
  return w.reshape(c.num_heads, c.head_dim)


_flatten_in: Convert = lambda p, c: p.reshape(c.d_model, -1)
_flatten: Convert = lambda p, c: p.reshape(-1)
GPT2_LAYER_TENSORS: dict[tuple[str, ...], tuple[str, Convert, Convert]] = {
    ("attn", "q"): ("attn.c_attn.weight", _gpt2_heads, _flatten_in),
    ("attn", "k"): ("attn.c_attn.weight", _gpt2_heads, _flatten_in),
    ("attn", "v"): ("attn.c_attn.weight", _gpt2_heads, _flatten_in),
    ("attn", "q_bias"): ("attn.c_attn.bias", _gpt2_head_bias, _flatten),
    ("attn", "k_bias"): ("attn.c_attn.bias", _gpt2_head_bias, _flatten),
    ("attn", "v_bias"): ("attn.c_attn.bias", _gpt2_head_bias, _flatten),
    ("attn", "o"): (
        "attn.c_proj.weight",
        lambda w, c: w.reshape(c.num_heads, c.head_dim, c.d_model),
        lambda p, c: p.reshape(-1, c.d_model),
    ),
    ("attn", "o_bias"): ("attn.c_proj.bias", _same, _same),
    ("attn_norm", "scale"): ("ln_1.weight", _same, _same),
    ("attn_norm", "bias"): ("ln_1.bias", _same, _same),
    ("mlp_norm", "scale"): ("ln_2.weight", _same, _same),
    ("mlp_norm", "bias"): ("ln_2.bias", _same, _same),
    ("mlp", "up"): ("mlp.c_fc.weight", _same, _same),
    ("mlp", "up_bias"): ("mlp.c_fc.bias", _same, _same),
    ("mlp", "down"): ("mlp.c_proj.weight", _same, _same),
    ("mlp", "down_bias"): ("mlp.c_proj.bias", _same, _same),
}
GPT2_TOP_TENSORS: dict[tuple[str, ...], tuple[str, Convert, Convert]] = {
    ("embedding",): ("transformer.wte.weight", _same, _same),
    ("position_embedding",): ("transformer.wpe.weight", _same, _same),
    ("final_norm", "scale"): ("transformer.ln_f.weight", _same, _same),
    ("final_norm", "bias"): ("transformer.ln_f.bias", _same, _same),
    ("unembed",): ("lm_head.weight", *_transpose),
}
# sft path under params["layers"] -> (i, n): the tensor is the i-th of n equal slices of its HF
# tensor's last axis.
GPT2_FUSED: dict[tuple[str, ...], tuple[int, int]] = {
    ("attn", "q"): (0, 3), ("attn", "k"): (1, 3), ("attn", "v"): (2, 3),
    ("attn", "q_bias"): (0, 3), ("attn", "k_bias"): (1, 3), ("attn", "v_bias"): (2, 3),
}


def _is_gpt2(cfg: ModelConfig) -> bool:
  return cfg.position_embedding == "learned"  # the one family with a learned position table


def _layer_tensors(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, Convert, Convert]]:
  if _is_gpt2(cfg):
    return GPT2_LAYER_TENSORS
  return {**LAYER_TENSORS, **SANDWICH_NORMS} if cfg.sandwich_norms else LAYER_TENSORS


def _entry(path: tuple[str, ...], cfg: ModelConfig) -> tuple[str, Convert, Convert]:
  if path[0] == "layers":
    return _layer_tensors(cfg)[path[1:]]
  return (GPT2_TOP_TENSORS if _is_gpt2(cfg) else TOP_TENSORS)[path]


def _slot(path: tuple[str, ...], cfg: ModelConfig) -> tuple[int, int] | None:
  return GPT2_FUSED.get(path[1:]) if _is_gpt2(cfg) and path[0] == "layers" else None


def _layer_name(cfg: ModelConfig, i: int, hf: str) -> str:
  return f"transformer.h.{i}.{hf}" if _is_gpt2(cfg) else f"model.layers.{i}.{hf}"


# Present in some checkpoints, never needed: rotary tables that older versions saved as buffers, and
# GPT-2's causal-mask buffers.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _path(key_path) -> tuple[str, ...]:
  return tuple(k.key for k in key_path)


def abstract_params(cfg: ModelConfig) -> Any:
  dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), dummy, dummy, dummy))["params"]


def hf_names(cfg: ModelConfig) -> dict[tuple[str, ...], list[str]]:
  """sft parameter path -> the HF tensor names it is made of (one per layer for stacked layers)."""
  names = {}
  for key_path, _ in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
    path = _path(key_path)
    hf = _entry(path, cfg)[0]
    names[path] = [_layer_name(cfg, i, hf) for i in range(cfg.num_layers)] if path[0] == "layers" else [hf]
  return names


def _sources(files: Mapping[str, Any], cfg: ModelConfig) -> dict[str, str]:
  """HF name -> the name a checkpoint stores it under: GPT2Model checkpoints (no LM head) leave out
  the `transformer.` prefix."""
  if _is_gpt2(cfg) and not any(n.startswith("transformer.") for n in files):
    return {(n if n == "lm_head.weight" else f"transformer.{n}"): n for n in files}
  return {n: n for n in files}


def _check_names(files: Mapping[str, Any], expected: set[str], cfg: ModelConfig, folder) -> None:
  present = set(files)
  missing = sorted(expected - present)
  extra = sorted(n for n in present - expected if not _IGNORED.fullmatch(n))
  if cfg.tie_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # tied checkpoints may store a copy; the embedding is used
  if missing or extra:
    raise ValueError(f"{folder}: tensors missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                     f"unexpected: {extra[:20]}{' ...' if len(extra) > 20 else ''}")


def load_params(folder: str | pathlib.Path, cfg: ModelConfig, shardings: Any = None) -> Any:
  """The parameters in `folder`, as the tree `Transformer(cfg)` uses, placed per `shardings`
  (a matching tree of NamedShardings) or on the default device."""
  folder = pathlib.Path(folder)
  files = safetensors_io.open_checkpoint(folder)
  sources = _sources(files, cfg)
  names = hf_names(cfg)
  _check_names(sources, {n for group in names.values() for n in group}, cfg, folder)
  abstract = abstract_params(cfg)
  flat_shardings = {}
  if shardings is not None:
    flat_shardings = {_path(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}

  def load(key_path, leaf):
    path = _path(key_path)
    to_sft, slot = _entry(path, cfg)[1], _slot(path, cfg)
    host = np.empty(leaf.shape, leaf.dtype)
    parts = [host[i] for i in range(cfg.num_layers)] if path[0] == "layers" else [host]
    for name, part in zip(names[path], parts):
      want, source = _hf_shape(path, part.shape, cfg), sources[name]
      if files[source].shape(source) != want:
        raise ValueError(f"{folder}: tensor {name} has shape {files[source].shape(source)}, the config needs {want}")
      tensor = files[source].get(source)
      if slot is not None:
        tensor = np.split(tensor, slot[1], axis=-1)[slot[0]]
      part[...] = to_sft(tensor, cfg).astype(leaf.dtype)
      progress.update(1)
    sharding = flat_shardings.get(path)
    if sharding is None:
      return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  total = sum(len(group) for group in names.values())
  with bar(total, f"loading {folder}", " tensors", enabled=jax.process_index() == 0) as progress:
    return jax.tree_util.tree_map_with_path(load, abstract)


def _hf_shape(path: tuple[str, ...], sft_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
  to_hf, slot = _entry(path, cfg)[2], _slot(path, cfg)
  shape = to_hf(np.empty(sft_shape, np.uint8), cfg).shape  # views only: no data is touched
  return shape if slot is None else (*shape[:-1], shape[-1] * slot[1])


def load_model(folder: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32", shardings=None):
  """(ModelConfig, params) of a Hugging Face model folder."""
  folder = pathlib.Path(folder)
  config_path = folder / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{folder} has no config.json")
  cfg = from_hf_config(read_hf_config(config_path), dtype=dtype, param_dtype=param_dtype, source=str(config_path))
  return cfg, load_params(folder, cfg, shardings)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def to_hf_tensors(params: Any, cfg: ModelConfig, *, desc: str | None = None) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array, for every parameter; with a progress bar under `desc` if given
  (on process 0: every process must call this, as gathering a sharded parameter takes them all)."""
  names = hf_names(cfg)
  tensors, slices = {}, {}
  total = sum(len(group) for group in names.values())
  with bar(total, desc or "", " tensors", enabled=desc is not None and jax.process_index() == 0) as progress:
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      path = _path(key_path)
      to_hf, slot = _entry(path, cfg)[2], _slot(path, cfg)
      value = _host(leaf)
      parts = [value[i] for i in range(cfg.num_layers)] if path[0] == "layers" else [value]
      for name, part in zip(names[path], parts):
        if slot is None:
          tensors[name] = np.ascontiguousarray(to_hf(part, cfg))
        else:
          slices.setdefault(name, [None] * slot[1])[slot[0]] = to_hf(part, cfg)
        progress.update(1)
  tensors.update({name: np.concatenate(parts, axis=-1) for name, parts in slices.items()})
  return tensors


def export_model(
    params: Any, cfg: ModelConfig, folder: str | pathlib.Path, family: str, *, max_shard_bytes: int = 5 * 2**30
) -> pathlib.Path:
  """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`) that
  `transformers` loads as the same model. Only process 0 writes."""
  folder = pathlib.Path(folder)
  torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[cfg.param_dtype]
  hf_config = to_hf_config(cfg, family, torch_dtype=torch_dtype)
  tensors = to_hf_tensors(params, cfg, desc=f"exporting {folder}")
  if jax.process_index() != 0:
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  shards = list(safetensors_io.iter_shards(tensors, max_shard_bytes))
  metadata = {"format": "pt"}  # what transformers expects of a PyTorch-loadable file
  n = len(shards)
  names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
  weight_map = {}
  for name, shard in track(list(zip(names, shards)), f"exporting {folder}", unit=" files"):
    safetensors_io.save_file(shard, folder / name, metadata)
    weight_map.update({tensor: name for tensor in shard})
  if n == 1:
    return folder
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return folder
