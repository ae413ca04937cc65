"""Stopping on SIGTERM / SIGINT without losing work.

The first signal asks the training loop to stop after the step it is running: it saves the train
state and the data position, then raises `RunStopped`. A second signal exits at once, unsaved.

In a multi-process run every process must stop at the same step, or the checkpoint save (a
collective) hangs. SIGTERM is left to JAX's preemption service there (started by
`jax.distributed.initialize`; all processes agree on a step through the coordinator), and SIGINT
flags are gathered at the loop's sync points (its log lines).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("sft")


class StopRequests:
  """A context manager that turns SIGTERM / SIGINT into a request the loop polls (`requested`)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def signals(self) -> tuple[int, ...]:
    return (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
      for signum in self.signals():
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      log.error("%s again: exiting now, without saving", name)
      logging.shutdown()
      os._exit(128 + signum)
    self.signum = signum
    log.warning("%s: finishing this step, then saving a checkpoint and exiting (send it again to exit at once)", name)

  def requested(self, *, sync: bool) -> bool:
    """Whether to stop after this step. In a multi-process run the answer is gathered (the same on
    every process) only when `sync`; otherwise it stays False until the next sync point."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not sync:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    if self.signum is None and np.any(flags):
      self.signum = int(np.max(flags))
    return bool(np.any(flags))
