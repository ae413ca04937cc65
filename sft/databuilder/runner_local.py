"""The stages on one machine: collections are lists, record-wise stages run over worker processes with
progress bars, and deduplication is dedup.py's, all at once."""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import time
from typing import Any, Callable

from sft.console import bar
from sft.databuilder import dedup, records

_MIN_PARALLEL = 4000  # below this many items, starting workers costs more than it saves; 0: workers always
_CHUNK = 500
# What a pool of spawn workers costs before its first result: fresh interpreters importing the stage's modules.
_POOL_START_SECONDS = 0.5
_worker_fn = None


def _init_worker(fn):
  global _worker_fn
  _worker_fn = fn


def _apply_chunk(chunk: list) -> list:
  return _worker_fn(chunk)


def _each(fn: Callable[[Any], list], chunk: list) -> list:
  return [out for item in chunk for out in fn(item)]


def _workers_pay(seconds: float, transfer_seconds: float, num_items: int, remaining: int, num_workers: int) -> bool:
  """Whether `remaining` items run sooner over `num_workers` workers than here, from the first `num_items`:
  `seconds` to compute them here and `transfer_seconds` to pickle them and their results once (each crosses
  a pipe twice: pickled on one side, unpickled on the other). A cheap stage (format, measure) costs less
  than sending its records to workers and back."""
  per_item, transfer = seconds / num_items, 2 * transfer_seconds / num_items
  return remaining * per_item * (1 - 1 / num_workers) > _POOL_START_SECONDS + remaining * transfer


class LocalRunner:
  """Collections are lists; `flat_map` runs over `num_workers` processes for large inputs whose first chunk,
  timed here, shows the work outweighs sending the records to workers and back."""

  def __init__(self, num_workers: int = 0, progress: bool = True):
    self.num_workers = num_workers or os.cpu_count() or 1
    self.progress = progress  # a bar on a terminal, else a few log lines

  def create(self, items: list, name: str) -> list:
    return list(items)

  def flat_map(self, coll: list, fn: Callable[[Any], list], name: str) -> list:
    return self.map_chunks(coll, functools.partial(_each, fn), name)

  def map_chunks(self, coll: list, fn: Callable[[list], list], name: str) -> list:
    chunks = [coll[i:i + _CHUNK] for i in range(0, len(coll), _CHUNK)]
    out = []
    with bar(len(coll), name, " inputs" if name == "read" else " records", enabled=self.progress) as progress:
      parallel = self.num_workers > 1 and len(coll) >= _MIN_PARALLEL
      # Started before the first chunk's trial here, so that their start (a fresh interpreter, the stage's
      # imports and models) overlaps it; stopped at once if the trial says they do not pay. Spawn, not fork:
      # the parent may hold JAX's threads, which a forked child would inherit broken.
      pool = multiprocessing.get_context("spawn").Pool(self.num_workers, _init_worker, (fn,)) if parallel else None
      try:
        if parallel and _MIN_PARALLEL:  # the first chunk here, timed: it says whether workers pay for the rest
          start = time.perf_counter()
          first = fn(chunks[0])
          seconds = time.perf_counter() - start
          start = time.perf_counter()
          pickle.dumps(chunks[0], pickle.HIGHEST_PROTOCOL), pickle.dumps(first, pickle.HIGHEST_PROTOCOL)
          transfer = time.perf_counter() - start
          out += first
          progress.update(len(chunks[0]))
          parallel = _workers_pay(seconds, transfer, len(chunks[0]), len(coll) - len(chunks[0]), self.num_workers)
          chunks = chunks[1:]
          if not parallel:
            pool.terminate()
        if parallel:
          for chunk, result in zip(chunks, pool.imap(_apply_chunk, chunks)):
            out += result
            progress.update(len(chunk))
        else:
          for chunk in chunks:
            out += fn(chunk)
            progress.update(len(chunk))
      finally:
        if pool is not None:
          pool.terminate()
          pool.join()
    return out

  def map_batches(self, coll: list, fn: Callable[[list], list], batch_size: int, name: str) -> list:
    return [out for i in range(0, len(coll), batch_size) for out in fn(coll[i:i + batch_size])]

  def group_by(self, coll: list, key_fn: Callable, fn: Callable, name: str) -> list:
    groups: dict[Any, list] = {}
    out = []
    for item in coll:
      key = key_fn(item)
      if key is None:
        out.append(item)
      else:
        groups.setdefault(key, []).append(item)
    for key, group in groups.items():
      out += fn(key, sorted(group, key=lambda r: r["id"]))
    return out

  def global_apply(self, coll: list, select: Callable, fn: Callable, name: str) -> list:
    return fn(sorted((x for x in coll if select(x)), key=lambda r: r["id"]))

  def near_duplicates(self, coll: list, params: dict[str, Any], name: str) -> list:
    return dedup.mark_near_duplicates(coll, dedup.near_duplicate_drops([r for r in coll if not records.is_dropped(r)], params))

  def concat(self, colls: list[list], name: str) -> list:
    return [x for c in colls for x in c]

  def results(self, *colls: list) -> tuple[list, ...]:
    """The collections' contents in this process (for lists: themselves)."""
    return colls
