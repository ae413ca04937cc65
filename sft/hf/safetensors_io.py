"""Reading and writing the safetensors format with numpy, bfloat16 included.

The `safetensors` package's numpy backend cannot represent bfloat16, the dtype most checkpoints use,
so this reads the format directly: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw data. Tensors are memory-mapped: reading one
tensor touches only its bytes, never the whole file.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy, read-only access to the tensors of one .safetensors file."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    with self.path.open("rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path}: too short to be a safetensors file")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > 100_000_000:
        raise ValueError(f"{self.path}: header length {header_len} is not plausible; not a safetensors file")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{self.path}: unreadable safetensors header ({err})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._data_start = 8 + header_len
    self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return sorted(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which sft does not read")
    start, end = entry["data_offsets"]
    dtype = np.dtype(_DTYPES[entry["dtype"]])
    data = self._mmap[self._data_start + start : self._data_start + end]
    expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
    if data.size != expected:
      raise ValueError(f"{self.path}: tensor {name!r} has {data.size} bytes, its shape and dtype need {expected}")
    return data.view(dtype).reshape(entry["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path, metadata: Mapping[str, str] | None = None):
  """Writes `tensors` (name -> array) as one .safetensors file, tensors in name order."""
  header, offset = {}, 0
  arrays = {}
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
    arrays[name] = array
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the reference writer does
  path = pathlib.Path(path)
  # Write beside, then rename: readers that memory-mapped the old file keep a valid file.
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays.values():
      f.write(array.tobytes())
  tmp.replace(path)


def open_checkpoint(folder: str | pathlib.Path) -> dict[str, SafetensorsFile]:
  """tensor name -> the file holding it, for `model.safetensors` or a sharded index."""
  folder = pathlib.Path(folder)
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: SafetensorsFile(folder / name) for name in sorted(set(weight_map.values()))}
    return {tensor: files[file] for tensor, file in weight_map.items()}
  single = folder / "model.safetensors"
  if single.exists():
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}
  found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  raise FileNotFoundError(
      f"{folder} has neither model.safetensors nor model.safetensors.index.json (found: {found}); "
      "only safetensors checkpoints are read, never pickles"
  )


def iter_shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  """Groups tensors (in name order) into shards of at most `max_shard_bytes` (a bigger tensor stands alone)."""
  shard, size = {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shard and size + nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[name] = tensors[name]
    size += nbytes
  if shard:
    yield shard
