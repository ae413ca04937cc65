"""A non-finite step never reaches a checkpoint: `FiniteGuard` reads the step's finiteness flags where the
loop already waits for the device (a log line, an eval, a save) and ends the run, or counts the steps the
jitted step skipped (train.on_nonfinite; see step.train_step).

    guard = FiniteGuard(config, checkpointer)
    guard.add(step, metrics)   # every step: device scalars, no wait
    guard.check()              # before logging, evaluating or saving: TrainingDiverged if it must stop
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from sft.errors import TrainingDiverged
from sft.trainer.checkpoint import Checkpointer

FLAG_METRICS = ("nonfinite", "nonfinite_params")  # the step's finiteness flags: read by the guard, not logged


class FiniteGuard:
  """train.on_nonfinite, on the host. Each step's `nonfinite` and `nonfinite_params` flags stay on the device
  until the loop reads metrics anyway (a log line) or is about to evaluate or save; `check()` then reads
  them all at once. "stop": the first bad step is a TrainingDiverged. "skip": the step already dropped its
  update (see step.train_step); skipped steps are counted, and max_consecutive_skips of them in a row are
  a TrainingDiverged. Parameters that are not finite after an update end the run in either mode. So a
  checkpoint (or an evaluation) never sees a state that is not finite."""

  def __init__(self, config: ml_collections.ConfigDict, checkpointer: Checkpointer):
    self.skip = config.train.on_nonfinite == "skip"
    self.max_in_a_row = config.train.max_consecutive_skips
    self.lr = config.train.lr
    self.checkpointer = checkpointer
    self.pending = []  # (step, nonfinite, nonfinite_params): device scalars
    self.in_a_row = 0  # skipped steps in a row, up to the last one checked
    self.skipped = 0  # skipped steps of this run
    self.unreported = 0  # skipped steps not yet in a metrics row

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    self.pending.append((step, metrics["nonfinite"], metrics["nonfinite_params"]))

  def check(self) -> None:
    pending, self.pending = self.pending, []
    for (step, _, _), (bad, bad_params) in zip(pending, jax.device_get([flags for _, *flags in pending])):
      if bad and self.skip:
        self.in_a_row, self.skipped, self.unreported = self.in_a_row + 1, self.skipped + 1, self.unreported + 1
        if self.in_a_row >= self.max_in_a_row:
          raise self._diverged(
              f"the loss or gradient norm was not finite at {self.in_a_row} steps in a row (steps "
              f"{step - self.in_a_row + 1}-{step}, all skipped; train.max_consecutive_skips={self.max_in_a_row})",
              "raise train.max_consecutive_skips",
          )
      elif bad:
        raise self._diverged(
            f"the loss or gradient norm is not finite at step {step}", 'set train.on_nonfinite="skip" to skip such steps'
        )
      elif bad_params:
        raise self._diverged(f"the parameters are not finite after the update of step {step}")
      else:
        self.in_a_row = 0

  def take_unreported(self) -> int:
    n, self.unreported = self.unreported, 0
    return n

  def _diverged(self, what: str, alternative: str = "") -> TrainingDiverged:
    latest = self.checkpointer.latest_step()
    kept = "none was saved" if latest is None else f"the latest, step {latest} in {self.checkpointer.directory}, is from before"
    return TrainingDiverged(
        f"training diverged: {what}; no checkpoint holds it ({kept}). Lower train.lr (now {self.lr:g})"
        + (f", or {alternative}" if alternative else "")
    )
