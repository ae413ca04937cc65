"""The trainer: mesh and sharding, train state, the jitted step, checkpoints, the training loop."""

from sft.trainer.loop import train_and_evaluate
from sft.trainer.state import TrainState

__all__ = ["train_and_evaluate", "TrainState"]
