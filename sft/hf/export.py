"""sft parameter trees -> Hugging Face safetensors checkpoints, streamed: tensor by tensor in the
parameters' own dtype (bfloat16 stays bfloat16), each gathered alone, written by process 0 and dropped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from sft.console import bar
from sft.hf import safetensors_io
from sft.hf.config import to_hf_config
from sft.hf.weights import Layout, entry, fused_slot, hf_names, hf_shape, key_path_names, layer_shape
from sft.model import ModelConfig


@dataclasses.dataclass
class _Source:
  """Where one HF tensor's values are in a parameter tree: (leaf, layer or None, slot or None) per piece."""

  pieces: list[tuple[Any, int | None, tuple[int, int] | None]]
  layout: Layout
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _export_plan(params: Any, cfg: ModelConfig) -> dict[str, _Source]:
  """HF tensor name -> where its values are, with its shape and dtype (the parameter's): from shapes
  alone, so that files can be laid out before any value is gathered."""
  names = hf_names(cfg)
  plan = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = key_path_names(key_path)
    layout, slot = entry(path, cfg)[1], fused_slot(path, cfg)
    shape = hf_shape(path, layer_shape(path, leaf.shape), cfg)
    stacked = path[0] == "layers"
    for i, name in enumerate(names[path]):
      source = plan.setdefault(name, _Source([], layout, shape, np.dtype(leaf.dtype)))
      source.pieces.append((leaf, i if stacked else None, slot))
  return plan


def _gather(leaf: Any, layer: int | None) -> np.ndarray:
  """One layer of a parameter (or the whole of an unstacked one) on the host, in its own dtype: only
  that much is gathered. Every process must call this for a parameter sharded across processes."""
  x = leaf if layer is None else leaf[layer]
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _hf_tensor(source: _Source) -> np.ndarray:
  """One HF tensor on the host, in its parameter's dtype: possibly a strided view of the gathered
  values (the writer copies it out in bounded chunks), so the host holds about one tensor."""
  if len(source.pieces) == 1 and source.pieces[0][2] is None:
    leaf, layer, _ = source.pieces[0]
    return source.layout.to_hf(_gather(leaf, layer))
  out = np.empty(source.shape, source.dtype)  # GPT-2's fused q, k, v: filled one slot at a time
  for leaf, layer, (i, n) in source.pieces:
    width = source.shape[-1] // n
    out[..., i * width : (i + 1) * width] = source.layout.to_hf(_gather(leaf, layer))
  return out


def iter_hf_tensors(params: Any, cfg: ModelConfig, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF tensor name, numpy array) one at a time, in `names` order (default: sorted), each gathered
  only when asked for. Every process must iterate it alike (gathering a sharded parameter takes them all)."""
  plan = _export_plan(params, cfg)
  for name in sorted(plan) if names is None else names:
    yield name, _hf_tensor(plan[name])


def to_hf_tensors(params: Any, cfg: ModelConfig, *, desc: str | None = None) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array, for every parameter, all held at once (`export_model` streams
  instead); with a progress bar under `desc` if given (on process 0: every process must call this, as
  gathering a sharded parameter takes them all)."""
  plan = _export_plan(params, cfg)
  tensors = {}
  with bar(len(plan), desc or "", " tensors", enabled=desc is not None and jax.process_index() == 0) as progress:
    for name, tensor in iter_hf_tensors(params, cfg):
      tensors[name] = np.ascontiguousarray(tensor)
      progress.update(1)
  return tensors


def export_model(
    params: Any, cfg: ModelConfig, folder: str | pathlib.Path, family: str, *, max_shard_bytes: int = 5 * 2**30,
    base_config: dict[str, Any] | None = None, token_ids: dict[str, int | None] | None = None,
) -> pathlib.Path:
  """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`) that
  `transformers` loads as the same model, each tensor in its parameter's dtype (bfloat16 stays bfloat16).
  config.json keeps every field of `base_config`, the source checkpoint's (its token ids and
  max_position_embeddings included); a model trained from scratch gets its token ids from `token_ids`
  (see to_hf_config).

  Streamed: file layout and headers come from shapes alone, then tensors are gathered one at a time
  (only that tensor, on every process, as gathering takes them all), written by process 0 and
  dropped, so no host ever holds more than about one tensor. The files are byte for byte what the
  `safetensors` package writes for the same tensors."""
  folder = pathlib.Path(folder)
  torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[cfg.param_dtype]
  hf_config = to_hf_config(cfg, family, torch_dtype=torch_dtype, base=base_config, token_ids=token_ids)
  plan = _export_plan(params, cfg)
  groups = safetensors_io.plan_shards({name: source.nbytes for name, source in plan.items()}, max_shard_bytes)
  n = len(groups)
  files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
  writing = jax.process_index() == 0
  if writing:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  metadata = {"format": "pt"}  # what transformers expects of a PyTorch-loadable file
  with bar(len(plan), f"exporting {folder}", " tensors", enabled=writing) as progress:
    for file, group in zip(files, groups):
      specs = {name: (plan[name].dtype, plan[name].shape) for name in group}
      with safetensors_io.StreamWriter(folder / file, specs, metadata) if writing else contextlib.nullcontext() as writer:
        for name in safetensors_io.write_order(specs):
          tensor = _hf_tensor(plan[name])
          if writer is not None:
            writer.write(name, tensor)
          del tensor
          progress.update(1)
  if writing and n > 1:
    weight_map = {name: file for file, group in zip(files, groups) for name in group}
    index = {"metadata": {"total_size": sum(source.nbytes for source in plan.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return folder
