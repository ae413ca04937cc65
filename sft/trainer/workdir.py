"""What a run writes in its workdir, by name: the one place the file names are spelled (docs/training.md
shows the same table).

    paths = Workdir(workdir)
    paths.checkpoints, paths.metrics, paths.eval / "report.md"
"""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: pathlib.Path

  def __post_init__(self):
    object.__setattr__(self, "root", pathlib.Path(self.root))

  @property
  def data(self) -> pathlib.Path:
    """The data build of a run with data.source "build"."""
    return self.root / "data"

  @property
  def tokenizer(self) -> pathlib.Path:
    """The SentencePiece model a run from scratch trains."""
    return self.root / "tokenizer.model"

  @property
  def checkpoints(self) -> pathlib.Path:
    """Orbax checkpoints by step: the train state and the data iterators' positions."""
    return self.root / "checkpoints"

  @property
  def metrics(self) -> pathlib.Path:
    """One JSON object per logged step."""
    return self.root / "metrics.jsonl"

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / "tensorboard"

  @property
  def curves(self) -> pathlib.Path:
    return self.root / "curves.png"

  @property
  def eval(self) -> pathlib.Path:
    """The final evaluation's report, results and comparisons."""
    return self.root / "eval"

  @property
  def hf_export(self) -> pathlib.Path:
    """A fine-tuned Hugging Face model, exported for `transformers`."""
    return self.root / "hf_export"

  @property
  def config(self) -> pathlib.Path:
    """The config of the latest run."""
    return self.root / "config.json"

  def config_at(self, start_step: int) -> pathlib.Path:
    """The config of the run that started at `start_step`."""
    return self.root / f"config-{start_step}.json"

  @property
  def lock(self) -> pathlib.Path:
    """Held while a run trains (sft.trainer.lock)."""
    return self.root / "run.lock"
