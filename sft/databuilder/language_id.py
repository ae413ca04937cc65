"""Language identification with py3langid's model, many texts at once, bit for bit as py3langid scores one.

py3langid walks a byte automaton over each text in a Python loop (one step per byte: about a quarter of a
record's time in the build) and counts the features the states it passes through emit. The automaton is
Aho-Corasick's: the state after a byte is the longest suffix of the text so far that starts a feature, at
most `depth` bytes long (6 for the model shipped), so it depends on the last `depth` bytes alone. Every
position's state is therefore found by walking `depth` bytes from the start state, and all positions of
all texts of a batch walk together: `depth` vectorised steps instead of one Python step per byte.

Scoring is py3langid's own per text (log1p of the counts, in first-seen order, times the rows of the
feature table, plus the prior; then the softmax at temperature sqrt(bytes)), so every probability is the
number py3langid would give; the feature table is cast once to float32, as py3langid casts the rows it
touches on every call.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
from typing import NamedTuple, Sequence

import numpy as np


class _Model(NamedTuple):
  start_row: int  # the start state's row * 256
  next_row: np.ndarray  # int32 (rows * 256,): the row (state row * 256) reached from a row by a byte
  next_state: np.ndarray  # int32 (rows * 256,): the state reached (for its feature)
  feature_of_state: np.ndarray  # int32 (states,): the feature a state emits, or -1
  depth: int  # the longest byte string a state stands for
  table: np.ndarray  # float32 (features, classes): log P(feature | class)
  prior: np.ndarray  # float32 (classes,)
  classes: tuple[str, ...]
  alias_pairs: tuple[tuple[int, int], ...]  # (first, duplicate) columns of one language
  encode: object  # py3langid's text -> bytes (upper case lowered, NFC, UTF-8)


def _depth(next_state: np.ndarray, row_of_state: np.ndarray) -> int:
  """Breadth-first levels from the start state: the length of the longest string a state stands for.
  States that share a row of transitions are expanded once."""
  seen = np.zeros(len(row_of_state), dtype=bool)
  seen[0] = True
  frontier, depth = np.zeros(1, dtype=np.int64), 0
  while True:
    rows = np.unique(row_of_state[frontier]).astype(np.int64)
    reached = np.zeros_like(seen)
    reached[next_state[(rows[:, None] * 256 + np.arange(256)).ravel()]] = True
    frontier = np.flatnonzero(reached & ~seen)
    if not len(frontier):
      return depth
    seen[frontier] = True
    depth += 1


_ARRAYS = ("next_row", "next_state", "feature_of_state", "table", "prior")
_CACHE_FORMAT = 1  # bump when _Model's fields or their meaning change


def cache_root() -> pathlib.Path:
  """Where derived files are kept between runs: $SFT_CACHE_DIR, else $XDG_CACHE_HOME/sft, else ~/.cache/sft."""
  if os.environ.get("SFT_CACHE_DIR"):
    return pathlib.Path(os.environ["SFT_CACHE_DIR"])
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "sft"


def _cache_folder() -> pathlib.Path:
  """The model's arrays, keyed by the py3langid model file they come from (version, size, time)."""
  import py3langid.langid as langid  # noqa: PLC0415

  stat = (langid.MODEL_DIR / langid.MODEL_FILE).stat()
  key = f"{importlib.metadata.version('py3langid')}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_FORMAT}"
  return cache_root() / f"language_id-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _load_cached(folder: pathlib.Path) -> _Model | None:
  """The model from its cached arrays, memory-mapped (no decompression; the pages are shared by every
  process that maps them); None when they are missing or unreadable."""
  from py3langid.langid import LanguageIdentifier  # noqa: PLC0415

  try:
    meta = json.loads((folder / "meta.json").read_text())
    # Plain views of the maps: np.memmap's own indexing costs ~25 us a call in Python.
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r").view(np.ndarray) for name in _ARRAYS}
    return _Model(
        start_row=int(meta["start_row"]), depth=int(meta["depth"]), classes=tuple(meta["classes"]),
        alias_pairs=tuple(tuple(p) for p in meta["alias_pairs"]), encode=LanguageIdentifier._encode, **arrays,
    )
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _save_cached(m: _Model, folder: pathlib.Path) -> None:
  """Writes the arrays beside `folder` and renames them into place whole (a concurrent writer's copy, if
  it landed first, is kept); a folder that cannot be written is no error, only a slower next start."""
  tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
  try:
    tmp.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
      np.save(tmp / f"{name}.npy", getattr(m, name))
    meta = {"start_row": m.start_row, "depth": m.depth, "classes": list(m.classes), "alias_pairs": [list(p) for p in m.alias_pairs]}
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.rename(tmp, folder)
  except OSError:
    pass
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def model() -> _Model:
  """The model, once per process: from the cache folder when it is there (milliseconds), else derived from
  py3langid's compressed file (about a second) and cached."""
  folder = _cache_folder()
  cached = _load_cached(folder)
  if cached is not None:
    return cached
  broken = folder.exists()  # there but unreadable (a truncated file): replaced (a folder is renamed in whole)
  derived = _derive()
  if broken:
    shutil.rmtree(folder, ignore_errors=True)
  _save_cached(derived, folder)
  return derived


def _derive() -> _Model:
  from py3langid.langid import MODEL_FILE, LanguageIdentifier  # noqa: PLC0415

  stock = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
  row_of_state = np.frombuffer(stock.tk_row, dtype=stock.tk_row.typecode).astype(np.int32)  # array.arrays
  next_state = np.frombuffer(stock.tk_nextmove, dtype=stock.tk_nextmove.typecode).astype(np.int32)
  return _Model(
      start_row=int(row_of_state[0]) * 256,
      next_row=row_of_state[next_state] * 256,
      next_state=next_state,
      feature_of_state=np.asarray(stock.tk_output, dtype=np.int32),
      depth=_depth(next_state, row_of_state),
      table=stock.nb_ptc.astype(np.float32),
      prior=stock.nb_pc,
      classes=tuple(stock.nb_classes),
      alias_pairs=tuple(stock._alias_pairs),
      encode=stock._encode,
  )


def feature_counts(texts: Sequence[bytes], m: _Model) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per text, (feature ids in the order first seen, their counts as float32): py3langid's visit counts."""
  lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
  data = np.frombuffer(b"".join(texts), dtype=np.uint8)
  n = len(data)
  text_of = np.repeat(np.arange(len(texts)), lengths)
  offset = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # position within its text
  # The row after the window's first `depth - 1` bytes, then the state after its last one. A position
  # nearer its text's start than the window's length starts later, from the start state.
  rows = np.full(n, m.start_row, dtype=np.int32)
  for back in range(min(m.depth, n) - 1, 0, -1):
    step = m.next_row[rows[back:] + data[:n - back]]
    rows[back:] = np.where(offset[back:] >= back, step, rows[back:])
  emitted = m.feature_of_state[m.next_state[rows + data]]  # (n,): the feature at each position, or -1
  positions = np.flatnonzero(emitted >= 0)
  # Each (text, feature) pair's count and first position: one sort of (pair << 32 | position); then
  # the pairs in the order of their first positions (a text's pairs in the order first seen).
  pairs = np.sort((text_of[positions] * np.int64(len(m.table)) + emitted[positions]) << 32 | positions)
  key = pairs >> 32
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(pairs) else positions
  counts = np.diff(np.r_[starts, len(pairs)]).astype(np.float32)
  first = pairs[starts] & 0xFFFFFFFF
  group_at = np.full(n, -1, dtype=np.int64)
  group_at[first] = np.arange(len(first))
  in_order = group_at[group_at >= 0]
  first, counts = first[in_order], counts[in_order]
  features, text_of = emitted[first], text_of[first]
  bounds = np.searchsorted(text_of, np.arange(len(texts) + 1))
  return [(features[a:b], counts[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def probabilities(counted: list[tuple[np.ndarray, np.ndarray]], num_bytes: Sequence[int], m: _Model) -> np.ndarray:
  """float32 (texts, classes): py3langid's `_decide` with norm_probs, from each text's visit counts."""
  scores = np.zeros((len(counted), len(m.classes)), dtype=np.float32)  # no feature: uniform
  for row, (ids, counts) in zip(scores, counted):
    if len(ids):
      row[:] = np.log1p(counts) @ m.table[ids] + m.prior
  # As py3langid: the temperature's reciprocal in float64, rounded to float32 before the product.
  scores *= (1.0 / np.sqrt(np.maximum(np.asarray(num_bytes, dtype=np.float64), 1))).astype(np.float32)[:, None]
  np.exp(scores - scores.max(axis=1, keepdims=True), out=scores)
  scores /= scores.sum(axis=1, keepdims=True)
  for i, j in m.alias_pairs:  # a language under two columns: one score
    scores[:, i] += scores[:, j]
    scores[:, j] = 0.0
  return scores


def identify(texts: Sequence[str], batch: int = 512) -> list[tuple[str, float]]:
  """[('en', 0.99), ...]: each text's most likely language and its probability; `batch` texts at a time
  (a (pair, position) key fits 64 bits: texts x features < 2**31, bytes < 2**32)."""
  m = model()
  out = []
  for i in range(0, len(texts), batch):
    encoded = [m.encode(t) for t in texts[i:i + batch]]
    scores = probabilities(feature_counts(encoded, m), [len(data) for data in encoded], m)
    best = scores.argmax(axis=1)
    out += [(m.classes[j], p) for j, p in zip(best.tolist(), scores[np.arange(len(encoded)), best].tolist())]
  return out
