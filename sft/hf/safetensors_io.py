"""The files of a Hugging Face checkpoint: which ones hold which tensor, and atomic writes of new ones.

The bytes are read and written by the `safetensors` package (its numpy backend, bfloat16 included);
this module only adds what sft needs around it: one open handle per file however many tensors it
holds, refusal of index entries that point outside the folder, and ValueErrors that name the file.

The package (0.8.0) validates the header itself: not a JSON object, a length past the end of the file,
negative, reversed, out-of-bounds, overlapping or gapped offsets, bytes left over, an unknown dtype,
shape x itemsize not the byte length, all fail in `safe_open` (tests/test_hf.py pins each). What it
accepts is a tensor name listed twice (the last entry wins, so two readers could disagree on which
bytes it holds): that is checked here.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import struct
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
  """The package's errors as a ValueError naming the file. Rust panics are BaseExceptions (pyo3's
  PanicException), so they are caught by name."""
  try:
    yield
  except safetensors.SafetensorError as err:
    raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
  except BaseException as err:
    if type(err).__name__ != "PanicException":
      raise
    raise ValueError(f"{path}: the safetensors reader failed on this file ({err})") from None


def _check_unique_names(path: pathlib.Path) -> None:
  """Refuses a header that lists a tensor twice, which the package accepts (last entry wins). Called
  after `safe_open`, so the header is known to be a JSON object within the file."""

  def refuse_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen = set()
    for name, _ in pairs:
      if name in seen:
        raise ValueError(f"{path}: tensor {name!r} is listed twice in the header")
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

  def get(self, name: str) -> np.ndarray:
    dtype = self._file.get_slice(name).get_dtype()
    if dtype not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}, which sft does not read")
    with _file_errors(self.path):
      return self._file.get_tensor(name)


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
