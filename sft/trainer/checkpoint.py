"""Checkpoints with orbax: the train state and the grain iterator states, saved and restored together."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import grain
import orbax.checkpoint as ocp

from sft.errors import ConfigError


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of `directory`.

  Each checkpoint holds the item `state` (the TrainState) and one item per data iterator, so that
  the batches after a restore are exactly the ones that would have come next.
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int, save_interval_steps: int):
    if max_to_keep < 1 or save_interval_steps < 1:
      raise ConfigError("checkpoint.max_to_keep and checkpoint.every_steps must be at least 1")
    self.manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterators: Mapping[str, grain.DatasetIterator], *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    args.update({name: grain.checkpoint.CheckpointSave(it) for name, it in iterators.items()})
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any, iterators: Mapping[str, grain.DatasetIterator]) -> Any:
    """Returns the state (placed as `abstract_state`'s shardings say); sets the iterators' positions."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    args.update({name: grain.checkpoint.CheckpointRestore(it) for name, it in iterators.items()})
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of the saved train state (no optimizer moments, no data iterators): what
    serving needs. `abstract_params` carry their target shardings."""
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract_params})
    args = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args=restore_args, partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
