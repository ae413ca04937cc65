"""Hugging Face safetensors checkpoints <-> sft parameter trees.

Each parameter's conversion is a `Layout`; loading creates each parameter already sharded: every
device's shard is read from the memory-mapped files on its own (`safetensors` `get_slice`), only the
box of each HF tensor it needs, so no host ever holds a whole parameter it does not keep. Exporting
(streamed, tensor by tensor) is in sft.hf.export. Only safetensors and JSON are read: never pickles,
never remote code.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft.console import bar
from sft.errors import ConfigError
from sft.hf import safetensors_io
from sft.hf.config import from_hf_config, read_hf_config
from sft.model import ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one layer's sft tensor is laid out from its HF tensor: a reshape, then a transpose. HF axis k
  splits into `groups[k]` consecutive axes (the sizes come from the sft shape); sft axis i is axis
  `perm[i]` of that split view. Empty `groups` and `perm`: the HF layout itself, any rank.

  Being a pure reshape and transpose, any box of the sft tensor (a device's shard) comes from one box
  of the HF tensor (`region`), so loading reads no more than the shard: exactly the shard whenever the
  sft slice of each split axis but the outermost of its group is whole (a head_dim never split).
  Otherwise whole rows of that group are read, and cut in memory."""

  groups: tuple[int, ...] = ()
  perm: tuple[int, ...] = ()

  def _perm(self, ndim: int) -> tuple[int, ...]:
    return self.perm or tuple(range(ndim))

  def split_shape(self, sft_shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = self._perm(len(sft_shape))
    return tuple(sft_shape[perm.index(j)] for j in range(len(perm)))

  def hf_shape(self, sft_shape: tuple[int, ...]) -> tuple[int, ...]:
    split, shape, a = self.split_shape(sft_shape), [], 0
    for g in self.groups or (1,) * len(split):
      shape.append(math.prod(split[a : a + g]))
      a += g
    return tuple(shape)

  def to_sft(self, w: np.ndarray, sft_shape: tuple[int, ...]) -> np.ndarray:
    return w.reshape(self.split_shape(sft_shape)).transpose(self._perm(len(sft_shape)))

  def to_hf(self, p: np.ndarray) -> np.ndarray:
    """A view where possible: no data is copied by the reshape of a transposed view's split axes."""
    return p.transpose(np.argsort(self._perm(p.ndim))).reshape(self.hf_shape(p.shape))

  def region(self, index: tuple[slice, ...], sft_shape: tuple[int, ...]) -> tuple[tuple[slice, ...], Callable[[np.ndarray], np.ndarray]]:
    """(the box of the HF tensor that holds the sft box `index` (slices with step 1), a function
    from that box's values to the sft box's)."""
    perm, split = self._perm(len(sft_shape)), self.split_shape(sft_shape)
    wanted = [slice(0, 0)] * len(split)
    for i, s in enumerate(index):
      wanted[perm[i]] = s
    hf_index, block_shape, cut, a = [], [], [], 0
    for g in self.groups or (1,) * len(split):
      outer, inner = wanted[a], split[a + 1 : a + g]
      rows = math.prod(inner)
      hf_index.append(slice(outer.start * rows, outer.stop * rows))
      block_shape += [outer.stop - outer.start, *inner]
      cut += [slice(None), *wanted[a + 1 : a + g]]
      a += g
    return tuple(hf_index), lambda block: block.reshape(block_shape)[tuple(cut)].transpose(perm)


_same = Layout()
_transpose = Layout((1, 1), (1, 0))
_heads = Layout((2, 1), (2, 0, 1))  # (n*H, D) projection weights <-> sft's (D, n, H)
_head_bias = Layout((2,), (0, 1))  # (n*H,) <-> (n, H)

# sft path under params["layers"] -> (HF name inside model.layers.{i}., layout)
LAYER_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("attn", "q"): ("self_attn.q_proj.weight", _heads),
    ("attn", "k"): ("self_attn.k_proj.weight", _heads),
    ("attn", "v"): ("self_attn.v_proj.weight", _heads),
    ("attn", "o"): ("self_attn.o_proj.weight", Layout((1, 2), (1, 2, 0))),  # (D, n*H) <-> (n, H, D)
    ("attn", "q_bias"): ("self_attn.q_proj.bias", _head_bias),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", _head_bias),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", _head_bias),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", _same),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", _same),
    ("attn_norm", "scale"): ("input_layernorm.weight", _same),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _same),
    ("mlp", "gate"): ("mlp.gate_proj.weight", _transpose),
    ("mlp", "up"): ("mlp.up_proj.weight", _transpose),
    ("mlp", "down"): ("mlp.down_proj.weight", _transpose),
}
TOP_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("embedding",): ("model.embed_tokens.weight", _same),
    ("final_norm", "scale"): ("model.norm.weight", _same),
    ("unembed",): ("lm_head.weight", _transpose),
}
# Gemma 2 names its four norms differently: post_attention_layernorm is on the attention output.
SANDWICH_NORMS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", _same),
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", _same),
    ("post_mlp_norm", "scale"): ("post_feedforward_layernorm.weight", _same),
}

# GPT-2 stores Conv1D weights as (in, out), the transpose of nn.Linear's, and q, k, v fused in c_attn.
_gpt2_heads = Layout((1, 2), (0, 1, 2))  # (D, n*H) <-> (D, n, H)
GPT2_LAYER_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("attn", "q"): ("attn.c_attn.weight", _gpt2_heads),
    ("attn", "k"): ("attn.c_attn.weight", _gpt2_heads),
    ("attn", "v"): ("attn.c_attn.weight", _gpt2_heads),
    ("attn", "q_bias"): ("attn.c_attn.bias", _head_bias),
    ("attn", "k_bias"): ("attn.c_attn.bias", _head_bias),
    ("attn", "v_bias"): ("attn.c_attn.bias", _head_bias),
    ("attn", "o"): ("attn.c_proj.weight", Layout((2, 1), (0, 1, 2))),  # (n*H, D) <-> (n, H, D)
    ("attn", "o_bias"): ("attn.c_proj.bias", _same),
    ("attn_norm", "scale"): ("ln_1.weight", _same),
    ("attn_norm", "bias"): ("ln_1.bias", _same),
    ("mlp_norm", "scale"): ("ln_2.weight", _same),
    ("mlp_norm", "bias"): ("ln_2.bias", _same),
    ("mlp", "up"): ("mlp.c_fc.weight", _same),
    ("mlp", "up_bias"): ("mlp.c_fc.bias", _same),
    ("mlp", "down"): ("mlp.c_proj.weight", _same),
    ("mlp", "down_bias"): ("mlp.c_proj.bias", _same),
}
GPT2_TOP_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("embedding",): ("transformer.wte.weight", _same),
    ("position_embedding",): ("transformer.wpe.weight", _same),
    ("final_norm", "scale"): ("transformer.ln_f.weight", _same),
    ("final_norm", "bias"): ("transformer.ln_f.bias", _same),
    ("unembed",): ("lm_head.weight", _transpose),
}
# sft path under params["layers"] -> (i, n): the tensor is the i-th of n equal slices of its HF
# tensor's last axis. Still a box of the HF tensor, so fused q, k, v are read slice by slice too.
GPT2_FUSED: dict[tuple[str, ...], tuple[int, int]] = {
    ("attn", "q"): (0, 3), ("attn", "k"): (1, 3), ("attn", "v"): (2, 3),
    ("attn", "q_bias"): (0, 3), ("attn", "k_bias"): (1, 3), ("attn", "v_bias"): (2, 3),
}


def _is_gpt2(cfg: ModelConfig) -> bool:
  return cfg.position_embedding == "learned"  # the one family with a learned position table


def _layer_tensors(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, Layout]]:
  if _is_gpt2(cfg):
    return GPT2_LAYER_TENSORS
  return {**LAYER_TENSORS, **SANDWICH_NORMS} if cfg.sandwich_norms else LAYER_TENSORS


def entry(path: tuple[str, ...], cfg: ModelConfig) -> tuple[str, Layout]:
  if path[0] == "layers":
    return _layer_tensors(cfg)[path[1:]]
  return (GPT2_TOP_TENSORS if _is_gpt2(cfg) else TOP_TENSORS)[path]


def fused_slot(path: tuple[str, ...], cfg: ModelConfig) -> tuple[int, int] | None:
  return GPT2_FUSED.get(path[1:]) if _is_gpt2(cfg) and path[0] == "layers" else None


def _layer_name(cfg: ModelConfig, i: int, hf: str) -> str:
  return f"transformer.h.{i}.{hf}" if _is_gpt2(cfg) else f"model.layers.{i}.{hf}"


# Present in some checkpoints, never needed: rotary tables that older versions saved as buffers, and
# GPT-2's causal-mask buffers.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def key_path_names(key_path) -> tuple[str, ...]:
  return tuple(k.key for k in key_path)


def abstract_params(cfg: ModelConfig) -> Any:
  dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), dummy, dummy, dummy))["params"]


def hf_names(cfg: ModelConfig) -> dict[tuple[str, ...], list[str]]:
  """sft parameter path -> the HF tensor names it is made of (one per layer for stacked layers)."""
  names = {}
  for key_path, _ in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
    path = key_path_names(key_path)
    hf = entry(path, cfg)[0]
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
    raise ConfigError(f"{folder}: tensors missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                      f"unexpected: {extra[:20]}{' ...' if len(extra) > 20 else ''}; the weights do not match config.json")


def load_params(folder: str | pathlib.Path, cfg: ModelConfig, shardings: Any = None) -> Any:
  """The parameters in `folder`, as the tree `Transformer(cfg)` uses, placed per `shardings`
  (a matching tree of NamedShardings) or on the default device.

  Every shape and dtype is checked from the headers before any tensor is read. With shardings, each
  distinct shard of this process's devices is read from the (memory-mapped) files on its own, the
  box of each HF tensor it needs (`Layout.region`) and nothing more, and converted to the parameter
  dtype there: no host ever holds more than its own devices' shards of one parameter."""
  folder = pathlib.Path(folder)
  files = safetensors_io.open_checkpoint(folder)
  sources = _sources(files, cfg)
  names = hf_names(cfg)
  _check_names(sources, {n for group in names.values() for n in group}, cfg, folder)
  abstract = abstract_params(cfg)
  flat_shardings = {}
  if shardings is not None:
    flat_shardings = {key_path_names(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    path = key_path_names(key_path)
    want = hf_shape(path, layer_shape(path, leaf.shape), cfg)
    for name in names[path]:
      source = sources[name]
      if files[source].shape(source) != want:
        raise ConfigError(f"{files[source].path}: tensor {name} has shape {files[source].shape(source)}, the config needs "
                          f"{want} ({folder / 'config.json'}); the weights do not match config.json")
      files[source].check_dtype(source)

  def load(key_path, leaf):
    path = key_path_names(key_path)
    read = lambda index: _read_box(files, [sources[n] for n in names[path]], path, leaf, index, cfg)  # noqa: E731
    sharding = flat_shardings.get(path)
    if sharding is None:
      value = jnp.asarray(read(tuple(slice(None) for _ in leaf.shape)))
    else:
      boxes = {}  # devices holding the same box (replicas) share one read

      def callback(index):
        key = tuple(s.indices(n) for s, n in zip(index, leaf.shape))
        if key not in boxes:
          boxes[key] = read(index)
        return boxes[key]

      value = jax.make_array_from_callback(leaf.shape, sharding, callback)
    progress.update(len(names[path]))
    return value

  total = sum(len(group) for group in names.values())
  with bar(total, f"loading {folder}", " tensors", enabled=jax.process_index() == 0) as progress:
    return jax.tree_util.tree_map_with_path(load, abstract)


def layer_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of one HF tensor's share of a parameter: stacked layers drop their leading L axis."""
  return tuple(shape[1:]) if path[0] == "layers" else tuple(shape)


def _read_box(files, sources: list[str], path: tuple[str, ...], leaf, index: tuple[slice, ...], cfg: ModelConfig) -> np.ndarray:
  """The box `index` of parameter `path` (one HF tensor per layer in `sources`), read from the files
  box by box and converted to the parameter's dtype."""
  layout, slot = entry(path, cfg)[1], fused_slot(path, cfg)
  bounds = [s.indices(n) for s, n in zip(index, leaf.shape)]
  if any(step != 1 for _, _, step in bounds):
    raise ValueError(f"{path}: a shard index with a step is not a box ({index})")
  index = tuple(slice(start, stop) for start, stop, _ in bounds)
  shape = layer_shape(path, leaf.shape)

  def read_one(source: str, box: tuple[slice, ...]) -> np.ndarray:
    hf_index, finish = layout.region(box, shape)
    if slot is not None:  # GPT-2's fused q, k, v: the slot's columns of the HF tensor
      offset = slot[0] * layout.hf_shape(shape)[-1]
      hf_index = (*hf_index[:-1], slice(hf_index[-1].start + offset, hf_index[-1].stop + offset))
    return finish(files[source].read(source, hf_index))

  if path[0] != "layers":
    return np.ascontiguousarray(read_one(sources[0], index), dtype=leaf.dtype)
  out = np.empty(tuple(s.stop - s.start for s in index), leaf.dtype)
  for j, layer in enumerate(range(index[0].start, index[0].stop)):
    out[j] = read_one(sources[layer], index[1:])  # converted to the parameter dtype layer by layer
  return out


def hf_shape(path: tuple[str, ...], sft_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
  layout, slot = entry(path, cfg)[1], fused_slot(path, cfg)
  shape = layout.hf_shape(sft_shape)
  return shape if slot is None else (*shape[:-1], shape[-1] * slot[1])


def load_model(folder: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32", shardings=None):
  """(ModelConfig, params) of a Hugging Face model folder."""
  folder = pathlib.Path(folder)
  config_path = folder / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{folder} has no config.json")
  cfg = from_hf_config(read_hf_config(config_path), dtype=dtype, param_dtype=param_dtype, source=str(config_path))
  return cfg, load_params(folder, cfg, shardings)
