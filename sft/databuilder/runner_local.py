"""The stages on one machine: collections are lists, record-wise stages run over worker processes with
progress bars, and deduplication is dedup.py's, all at once.

The worker processes are started once per build and kept until `close` (the runner is a context
manager): a large build starts them before its inputs are read (`start_workers`, with a `warm` function
that loads the language model and tokenizer), so that they get ready on the core the reading leaves
idle. Each stage's function reaches every worker once, as a pickled file (it may hold a large
decontamination index), and its chunks follow alone.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, Callable

from sft.console import bar
from sft.databuilder import dedup, records

_MIN_PARALLEL = 4000  # below this many items, sending them to workers costs more than it saves; 0: workers always
_CHUNK = 500
_stage: tuple[str, Callable] | None = None  # in a worker: (file, function) of the stage it last ran


def _init_worker(warm: Callable[[], Any] | None) -> None:
  if warm is not None:
    warm()


def _run_chunk(task: tuple[str, list]) -> tuple[list, float]:
  """In a worker: the stage's function (loaded from its file once) on one chunk, and the seconds it took."""
  global _stage
  path, chunk = task
  if _stage is None or _stage[0] != path:
    with open(path, "rb") as f:
      _stage = (path, pickle.load(f))
  start = time.perf_counter()
  out = _stage[1](chunk)
  return out, time.perf_counter() - start


def _each(fn: Callable[[Any], list], chunk: list) -> list:
  return [out for item in chunk for out in fn(item)]


def _workers_pay(seconds: float, transfer_seconds: float, num_items: int, remaining: int, num_workers: int) -> bool:
  """Whether `remaining` items run sooner over `num_workers` running workers than here, from the first
  `num_items`: `seconds` of work and `transfer_seconds` to pickle them and their results once (each crosses a
  pipe twice: pickled on one side, unpickled on the other). A cheap stage (format) costs less than sending
  its records to workers and back."""
  per_item, transfer = seconds / num_items, 2 * transfer_seconds / num_items
  return remaining * per_item * (1 - 1 / num_workers) > remaining * transfer


class _Workers:
  """A pool of spawned worker processes (spawn, not fork: the parent may hold JAX's threads, which a forked
  child would inherit broken) and the folder of the stage functions sent to them."""

  def __init__(self, num_workers: int, warm: Callable[[], Any] | None):
    self.folder = tempfile.mkdtemp(prefix="sft-stages-")
    self.files: dict[int, tuple[Callable, str]] = {}  # id(fn) -> (fn, its file); fn kept so its id stays its own
    self.pool = multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, (warm,))

  def file_of(self, fn: Callable) -> str:
    if id(fn) not in self.files:
      path = os.path.join(self.folder, f"stage-{len(self.files)}.pickle")
      with open(path, "wb") as f:
        pickle.dump(fn, f, pickle.HIGHEST_PROTOCOL)
      self.files[id(fn)] = (fn, path)
    return self.files[id(fn)][1]

  def run(self, fn: Callable, chunk: list) -> tuple[list, float]:
    return self.pool.apply(_run_chunk, ((self.file_of(fn), chunk),))

  def imap(self, fn: Callable, chunks: list[list]):
    path = self.file_of(fn)
    return (out for out, _ in self.pool.imap(_run_chunk, [(path, chunk) for chunk in chunks]))

  def close(self) -> None:
    self.pool.terminate()
    self.pool.join()
    shutil.rmtree(self.folder, ignore_errors=True)


class LocalRunner:
  """Collections are lists; `map_chunks` runs over `num_workers` processes for large inputs whose first
  chunk, timed in a worker, shows the work outweighs sending the records to workers and back."""

  def __init__(self, num_workers: int = 0, progress: bool = True):
    self.num_workers = num_workers or os.cpu_count() or 1
    self.progress = progress  # a bar on a terminal, else a few log lines
    self._workers: _Workers | None = None

  def __enter__(self) -> LocalRunner:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def start_workers(self, warm: Callable[[], Any] | None = None) -> None:
    """Starts the worker processes now (no-op with one worker, or when started); `warm` runs in each as it
    starts. Without this call, they start when a stage first has enough items for them."""
    if self.num_workers > 1 and self._workers is None:
      self._workers = _Workers(self.num_workers, warm)

  def close(self) -> None:
    if self._workers is not None:
      self._workers.close()
      self._workers = None

  def create(self, items: list, name: str) -> list:
    return list(items)

  def flat_map(self, coll: list, fn: Callable[[Any], list], name: str) -> list:
    return self.map_chunks(coll, functools.partial(_each, fn), name)

  def map_chunks(self, coll: list, fn: Callable[[list], list], name: str) -> list:
    chunks = [coll[i:i + _CHUNK] for i in range(0, len(coll), _CHUNK)]
    out = []
    with bar(len(coll), name, " inputs" if name == "read" else " records", enabled=self.progress) as progress:
      parallel = self.num_workers > 1 and len(coll) >= _MIN_PARALLEL
      if parallel:
        self.start_workers()
      if parallel and _MIN_PARALLEL:  # the first chunk in a worker, timed: whether workers pay for the rest
        first, seconds = self._workers.run(fn, chunks[0])
        start = time.perf_counter()
        pickle.dumps(chunks[0], pickle.HIGHEST_PROTOCOL), pickle.dumps(first, pickle.HIGHEST_PROTOCOL)
        transfer = time.perf_counter() - start
        out += first
        progress.update(len(chunks[0]))
        parallel = _workers_pay(seconds, transfer, len(chunks[0]), len(coll) - len(chunks[0]), self.num_workers)
        chunks = chunks[1:]
      results = self._workers.imap(fn, chunks) if parallel else map(fn, chunks)
      for chunk, result in zip(chunks, results):
        out += result
        progress.update(len(chunk))
    return out

  def map_batches(self, coll: list, fn: Callable[[list], list], batch_size: int, name: str) -> list:
    return [out for i in range(0, len(coll), batch_size) for out in fn(coll[i:i + batch_size])]

  def group_by(self, coll: list, key_fn: Callable, fn: Callable, name: str) -> list:
    groups: dict[Any, list] = {}
    out = []
    for item in coll:  # (exact dedup's keys were computed by the clean/filter/decontaminate stage's workers)
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
    live = sorted((r for r in coll if not records.is_dropped(r)), key=lambda r: r["id"])
    ready = [r.get(dedup.PREPARED, (None, None))[1] for r in live]
    # Computed by the clean/filter/decontaminate stage's workers; else (records that did not pass it) here.
    fingerprints = dedup.unpacked(ready, params["num_perm"]) if live and None not in ready else None
    pairs = dedup.near_duplicate_pairs(live, params, fingerprints)
    return dedup.mark_near_duplicates(coll, dedup.drops_from_pairs(pairs))

  def concat(self, colls: list[list], name: str) -> list:
    return [x for c in colls for x in c]

  def results(self, *colls: list) -> tuple[list, ...]:
    """The collections' contents in this process (for lists: themselves)."""
    return colls
