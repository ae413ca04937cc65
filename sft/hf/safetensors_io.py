"""The files of a Hugging Face checkpoint: which ones hold which tensor, and atomic writes of new ones.

The bytes are read and written by the `safetensors` package (its numpy backend, bfloat16 included);
this module only adds what sft needs around it: one open handle per file however many tensors it
holds, refusal of index entries that point outside the folder, and ConfigErrors that name the file.

The package (0.8.0) validates the header itself: not a JSON object, a length past the end of the file,
negative, reversed, out-of-bounds, overlapping or gapped offsets, bytes left over, an unknown dtype,
shape x itemsize not the byte length, all fail in `safe_open` (tests/test_hf.py pins each). What it
accepts is a tensor name listed twice (the last entry wins, so two readers could disagree on which
bytes it holds): that is checked here.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import struct
import sys
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from sft.errors import ConfigError

# The dtypes sft reads and writes. The package knows more (float8, float4, ...), but its numpy backend
# fails on those with an AttributeError, and no model sft loads stores them.
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
_WRITABLE = {np.dtype(v) for v in _DTYPES.values()}


@contextlib.contextmanager
def _file_errors(path: pathlib.Path) -> Iterator[None]:
  """The package's errors as a ConfigError naming the file. Rust panics are BaseExceptions (pyo3's
  PanicException), so they are caught by name."""
  try:
    yield
  except safetensors.SafetensorError as err:
    raise ConfigError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
  except BaseException as err:
    if type(err).__name__ != "PanicException":
      raise
    raise ConfigError(f"{path}: the safetensors reader failed on this file ({err})") from None


def _check_unique_names(path: pathlib.Path) -> None:
  """Refuses a header that lists a tensor twice, which the package accepts (last entry wins). Called
  after `safe_open`, so the header is known to be a JSON object within the file."""

  def refuse_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen = set()
    for name, _ in pairs:
      if name in seen:
        raise ConfigError(f"{path}: tensor {name!r} is listed twice in the header")
      seen.add(name)
    return dict(pairs)

  with path.open("rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    json.loads(f.read(length), object_pairs_hook=refuse_repeats)


class SafetensorsFile:
  """One .safetensors file, opened (memory-mapped) once; tensors are read one at a time."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    with _file_errors(self.path):
      self._file = safetensors.safe_open(self.path, framework="numpy")
    _check_unique_names(self.path)

  def keys(self) -> list[str]:
    return sorted(self._file.keys())

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file.get_slice(name).get_shape())

  def check_dtype(self, name: str) -> None:
    dtype = self._file.get_slice(name).get_dtype()
    if dtype not in _DTYPES:
      raise ConfigError(f"{self.path}: tensor {name!r} has dtype {dtype}, which sft does not read")

  def get(self, name: str) -> np.ndarray:
    self.check_dtype(name)
    with _file_errors(self.path):
      return self._file.get_tensor(name)

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """The box `index` (one slice per axis) of a tensor: only those bytes are read from the file."""
    self.check_dtype(name)
    with _file_errors(self.path):
      return self._file.get_slice(name)[index]


def save_file(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path, metadata: Mapping[str, str] | None = None):
  """Writes `tensors` (name -> array) as one .safetensors file."""
  arrays = {}
  for name, array in tensors.items():
    # The package writes `nbytes` from the array's data pointer: a strided view would be written scrambled.
    arrays[name] = np.ascontiguousarray(array)
    if arrays[name].dtype not in _WRITABLE:
      raise ValueError(f"tensor {name!r} has dtype {arrays[name].dtype}, which sft does not write to safetensors")
  path = pathlib.Path(path)
  # Write beside, then rename: readers that memory-mapped the old file keep a valid file.
  tmp = path.with_name(path.name + ".tmp")
  try:
    safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def _shard_names(index: pathlib.Path) -> dict[str, str]:
  """tensor name -> file name, from a sharded checkpoint's index: a ConfigError naming the index and the
  key when it is malformed or names a file outside its folder."""
  try:
    content = json.loads(index.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
    raise ConfigError(f"{index} is not valid JSON ({err})") from None
  if not isinstance(content, dict) or "weight_map" not in content:
    raise ConfigError(f"{index} has no weight_map: not a safetensors index")
  weight_map = content["weight_map"]
  if not isinstance(weight_map, dict):
    raise ConfigError(f"{index}: weight_map is a {type(weight_map).__name__}, not an object of tensor name -> file name")
  for tensor, file in weight_map.items():
    # Checked on the name, not the resolved path: the Hub's cache links every file to a blob elsewhere.
    # Without links the two agree: a relative name with no ".." (nor a Windows "\\") cannot leave the folder.
    name = pathlib.PurePosixPath(file) if isinstance(file, str) else None
    if name is None or not name.parts or name.is_absolute() or ".." in name.parts or "\\" in file:
      raise ConfigError(f"{index}: weight_map[{tensor!r}] is {file!r}, which is not a file inside {index.parent}")
  return weight_map


def open_checkpoint(folder: str | pathlib.Path) -> dict[str, SafetensorsFile]:
  """tensor name -> the file holding it, for `model.safetensors` or a sharded index. Each file is
  opened once and shared by all its tensors."""
  folder = pathlib.Path(folder)
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = _shard_names(index)
    files = {}
    for name in sorted(set(weight_map.values())):
      if not (folder / name).is_file():
        raise FileNotFoundError(f"{index} names {name}, which {folder} does not hold")
      files[name] = SafetensorsFile(folder / name)
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


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
  """Tensor names (in name order) grouped into shards of at most `max_shard_bytes` (a bigger tensor
  stands alone), from their sizes in bytes alone."""
  shards, shard, size = [], [], 0
  for name in sorted(sizes):
    if shard and size + sizes[name] > max_shard_bytes:
      shards.append(shard)
      shard, size = [], 0
    shard.append(name)
    size += sizes[name]
  return shards + [shard] if shard else shards


def iter_shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  """Groups tensors (in name order) into shards of at most `max_shard_bytes` (a bigger tensor stands alone)."""
  for names in plan_shards({name: t.nbytes for name, t in tensors.items()}, max_shard_bytes):
    yield {name: tensors[name] for name in names}


# The package's writer lays tensors out by dtype in this order, then by name; StreamWriter does the
# same, so that its files are byte for byte the package's.
_WRITE_RANK = {np.dtype(_DTYPES[k]): i for i, k in enumerate(["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"])}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_CHUNK_BYTES = 64 * 2**20  # a strided (transposed) tensor is copied out in pieces of about this size


def write_order(specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> list[str]:
  """The order `StreamWriter` takes the tensors of `specs` (name -> (dtype, shape)) in."""
  for name, (dtype, _) in specs.items():
    if np.dtype(dtype) not in _WRITABLE:
      raise ValueError(f"tensor {name!r} has dtype {np.dtype(dtype)}, which sft does not write to safetensors")
  return sorted(specs, key=lambda name: (_WRITE_RANK[np.dtype(specs[name][0])], name))


class StreamWriter:
  """Writes one .safetensors file a tensor at a time, holding none of them: the header (dtypes,
  shapes, offsets) is computed from `specs` (name -> (dtype, shape)) up front, then `write` takes
  each tensor in `write_order(specs)` and copies its bytes to the file. Written beside the target and
  renamed into place when every tensor is in (a context manager: on an error, nothing is left)."""

  def __init__(self, path: str | pathlib.Path, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
    if sys.byteorder != "little":
      raise ValueError("safetensors files are little-endian; this host is not")
    self.path = pathlib.Path(path)
    self._order = write_order(specs)
    self._specs = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in specs.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in self._order:
      dtype, shape = self._specs[name]
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # as the package pads it: the data starts 8-byte aligned
    self._tmp = self.path.with_name(self.path.name + ".tmp")
    self._file = self._tmp.open("wb")
    self._file.write(struct.pack("<Q", len(raw)) + raw)
    self._next = 0

  def write(self, name: str, array: np.ndarray) -> None:
    if self._next >= len(self._order) or name != self._order[self._next]:
      expected = self._order[self._next] if self._next < len(self._order) else "nothing more"
      raise ValueError(f"{self.path}: tensor {name!r} written out of order (expected {expected!r})")
    dtype, shape = self._specs[name]
    if array.dtype != dtype or array.shape != shape:
      raise ValueError(f"{self.path}: tensor {name!r} is {array.dtype} {array.shape}, its header says {dtype} {shape}")
    if array.flags.c_contiguous:
      self._file.write(array.reshape(-1).view(np.uint8).data)
    else:  # a strided view (a transpose): copied out a bounded chunk of rows at a time
      rows = max(1, _CHUNK_BYTES // max(1, array[0].nbytes))
      for start in range(0, array.shape[0], rows):
        self._file.write(np.ascontiguousarray(array[start : start + rows]).reshape(-1).view(np.uint8).data)
    self._next += 1

  def close(self) -> None:
    """Finishes the file: every tensor of `specs` must have been written."""
    try:
      if self._next != len(self._order):
        raise ValueError(f"{self.path}: closed with {len(self._order) - self._next} tensors unwritten ({self._order[self._next]!r} next)")
      self._file.close()
      self._tmp.replace(self.path)
    finally:
      self.abort()

  def abort(self) -> None:
    self._file.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self) -> "StreamWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
