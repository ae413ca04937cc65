"""Progress on the console: log lines on stdout (also in a notebook that configured no logging), and
progress bars where a person waits. A bar is drawn only on a terminal; anywhere else (a log file, CI,
a notebook) the same progress comes as a few plain log lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

import tqdm

log = logging.getLogger("sft")
T = TypeVar("T")


def ensure_console_handler() -> None:
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def on_terminal() -> bool:
  return sys.stderr.isatty()


class LogLines:
  """The plain-text stand-in for a bar: a line at every `fraction` of the total (at most one per
  `min_interval_s`) and one at the end, with the elapsed time. Same `update` / `close` as tqdm."""

  def __init__(self, total: int | None, desc: str, unit: str, *, fraction: float = 0.25, min_interval_s: float = 5.0):
    self.total, self.desc, self.unit = total, desc, unit
    self.n, self._fraction, self._min_interval_s = 0, fraction, min_interval_s
    self._start = self._last = time.time()
    self._next = fraction
    self._closed = False

  def update(self, n: int = 1) -> None:
    self.n += n
    if not self.total:
      return
    now = time.time()
    if self.n / self.total >= self._next and self.n < self.total and now - self._last >= self._min_interval_s:
      log.info("%s: %d/%d%s (%.0f%%)", self.desc, self.n, self.total, self.unit, 100 * self.n / self.total)
      self._last = now
    while self._next <= self.n / self.total:
      self._next += self._fraction

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    elapsed = time.time() - self._start
    if elapsed >= self._min_interval_s:  # quick steps need no line of their own
      log.info("%s: %d%s in %.1f s", self.desc, self.n, self.unit, elapsed)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def bar(total: int | None, desc: str, unit: str = " it", *, enabled: bool = True):
  """A progress bar with `update(n)` and `close()` (also a context manager): tqdm on a terminal, else
  LogLines. `enabled=False` (e.g. on every process but the first) shows nothing."""
  if not enabled:
    return tqdm.tqdm(total=total, disable=True)
  if on_terminal():
    return tqdm.tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
  return LogLines(total, desc, unit)


def track(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = " it", enabled: bool = True) -> Iterator[T]:
  """Yields `items`, advancing a `bar` by one per item."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with bar(total, desc, unit, enabled=enabled) as b:
    for item in items:
      yield item
      b.update(1)
