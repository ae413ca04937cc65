"""Checkpoints with orbax: the train state and the data iterators' positions, saved and restored together.

A step folder holds the item `state` (the TrainState) and the item `data`: one JSON object with each
iterator's state. The iterators run the global batch stream on every process (see
`sft.pipeline.train_dataset`), so that state is the same everywhere and one copy restores a run on
any number of processes or devices.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sft.config import check_value
from sft.errors import ConfigError, cannot_write, disk_error

log = logging.getLogger("sft")
DATA_ITEM = "data"


class _DiskErrorsOnOneLine(logging.Filter):
  """orbax logs a failed background save with its traceback, once per thread that met it, and asyncio
  once more per write task nobody awaited. For a full disk or a read-only filesystem the CannotWrite that
  save() or close() raises says all of it: orbax's records keep their message line, asyncio's go."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.exc_info or disk_error(record.exc_info[1]) is None:
      return True
    record.exc_info, record.exc_text = None, None
    return record.name != "asyncio"


def _quiet_disk_errors() -> None:
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DiskErrorsOnOneLine) for f in logger.filters):
      logger.addFilter(_DiskErrorsOnOneLine())


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of `directory`; the batches after a restore are exactly
  the ones that would have come next."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int, save_interval_steps: int):
    check_value("checkpoint.max_to_keep", max_to_keep)  # 0 would delete every checkpoint it saves
    check_value("checkpoint.every_steps", save_interval_steps)
    self.directory = pathlib.Path(directory).absolute()
    _quiet_disk_errors()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            # A step folder that cannot be made fails in save() itself: made in the background, its failure left
            # the save's other threads waiting minutes for it before the process could exit.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterators: Mapping[str, grain.DatasetIterator], *, force: bool = False) -> bool:
    """Starts saving `step` in the background (when due or `force`d). A full disk, a read-only filesystem or
    a missing permission, met by this save or by the one before it, is a CannotWrite naming the path and the
    cause; the checkpoints already saved stay (a step folder is only renamed into place once complete)."""
    data = {name: it.get_state() for name, it in iterators.items()}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), **{DATA_ITEM: ocp.args.JsonSave(data)})
    with self._write_errors(step):
      return self.manager.save(step, args=args, force=force)

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    try:
      yield
    except (OSError, ValueError) as err:
      # The error may be the previous save's, met when this one waits for it.
      what = "a checkpoint" if step is None else f"the checkpoint of step {step} or the one before"
      failed = cannot_write(err, what, self.directory, self._kept())
      if failed is None:
        raise
      raise failed from err

  def _kept(self) -> str:
    steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.is_dir() else []
    return f"the checkpoints saved before are intact (latest: step {max(steps)})" if steps else "none was saved before"

  def restore(self, step: int, abstract_state: Any, iterators: Mapping[str, grain.DatasetIterator]) -> Any:
    """Returns the state (placed as `abstract_state`'s shardings say); sets the iterators' positions
    only once everything was read."""
    step_dir = self.directory / str(step)
    if not (step_dir / DATA_ITEM).exists() and any(step_dir.glob("*/process_*-of-*.json")):
      return self._restore_per_process(step, abstract_state, iterators)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), **{DATA_ITEM: ocp.args.JsonRestore()})
    restored = self.manager.restore(step, args=args)
    data = restored[DATA_ITEM]
    missing = set(iterators) - set(data or {})
    if missing:
      raise ValueError(f"the checkpoint has no data position for {sorted(missing)}")
    for name, it in iterators.items():
      it.set_state(data[name])
    return restored["state"]

  def _restore_per_process(self, step, abstract_state, iterators):
    """Checkpoints of earlier versions: one grain state file per process (same process count only)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    args.update({name: grain.checkpoint.CheckpointRestore(it) for name, it in iterators.items()})
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def restore_latest(self, abstract_state: Any, iterators: Mapping[str, grain.DatasetIterator]) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, None when there is none. A step that cannot
    be read (cut short, a damaged file) is named, moved aside to `<directory>.unreadable/` (never
    deleted) and the next older one is tried; when none can be read the run stops with every reason."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, iterators)
      except Exception as err:  # noqa: BLE001  (orbax and tensorstore raise many kinds for a damaged file)
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
        log.warning("checkpoint step %d cannot be read (%s); trying the one before", step, reason)
        failures.append((step, reason))
        continue
      if failures:
        self._move_aside([s for s, _ in failures])
        log.warning(
            "resuming from step %d, the newest readable checkpoint; unreadable step(s) %s moved to %s",
            step, ", ".join(str(s) for s, _ in failures), self.unreadable_dir,
        )
      return state, step
    if failures:
      listed = "; ".join(f"step {s}: {r}" for s, r in failures)
      raise ConfigError(
          f"no checkpoint in {self.directory} can be read ({listed}). A shape or dtype change of the model "
          "would do this; otherwise move the folder away to start afresh"
      )
    return None

  @property
  def unreadable_dir(self) -> pathlib.Path:
    return self.directory.with_name(self.directory.name + ".unreadable")

  def _move_aside(self, steps: list[int]) -> None:
    # Later saves need the step numbers free: orbax never saves at or below its latest step.
    if jax.process_index() == 0:
      self.unreadable_dir.mkdir(exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        (self.directory / str(step)).rename(self.unreadable_dir / f"{step}-{stamp}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("sft: unreadable checkpoints moved aside")
    self.manager.reload()

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of the saved train state (no optimizer moments, no data iterators): what
    serving needs. `abstract_params` carry their target shardings."""
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract_params})
    args = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args=restore_args, partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any of them was told to stop (JAX's preemption
    sync in multi-process runs; always False in a single process)."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the last save (a disk error in it is a CannotWrite, as in `save`), then closes."""
    with self._write_errors(None):  # close() waits again, and meets the same error
      try:
        self.manager.wait_until_finished()
      finally:
        self.manager.close()
