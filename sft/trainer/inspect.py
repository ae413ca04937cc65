"""`inspect_training_rows(config, workdir)`: the first packed rows of the SFT stream, exactly as the train job
feeds them to the model, rendered with their segments and loss masks (see sft/pipeline/inspect.py).

It reads the run's data and tokenizer as training does (sources.load_splits, sources.prepare_tokenizer):
a workdir that has none gets what the train job would make first (the data build of data.source="build",
the SentencePiece tokenizer of a run from scratch), and nothing else. It trains nothing, takes no lock and
writes no other file into the workdir; the HTML page goes where `out` says (else a temporary file).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import tempfile
from typing import Any

import ml_collections
import numpy as np

from sft import pipeline
from sft.config_check import check_config
from sft.console import ensure_console_handler
from sft.databuilder.write import atomic_write_text
from sft.errors import ConfigError, cannot_write
from sft.pipeline import inspect as view
from sft.pipeline.dataset import BATCH_KEYS
from sft.tokenizer import ChatTokenizer
from sft.trainer import sources


@dataclasses.dataclass(frozen=True)
class InspectResult:
  """What `inspect_training_rows` found: the rows, their examples, what to print and the page written."""

  batch: dict[str, np.ndarray]  # the rows, as the model receives them
  examples: list[view.Example]
  text: str  # ANSI-coloured tokens with `color`, else the counts, the warnings and where the page is
  html_path: pathlib.Path | None

  @property
  def warnings(self) -> list[str]:
    return [f"row {e.row} example {e.segment} {e.warning}" for e in self.examples if e.warning]


def first_rows(
    records: Any, tokenizer: ChatTokenizer, *, seq_len: int, batch_size: int, seed: int, rows: int
) -> dict[str, np.ndarray]:
  """The first `rows` rows of the global train stream (the batches of the first steps, row after row)."""
  it = iter(pipeline.train_dataset(records, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed))
  batches = [next(it) for _ in range(math.ceil(rows / batch_size))]
  return {key: np.concatenate([b[key] for b in batches])[:rows] for key in BATCH_KEYS}


def wants_color() -> bool:
  """A terminal that shows colour: standard output is one, NO_COLOR unset, TERM not "dumb"."""
  return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def inspect_training_rows(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, rows: int = 8,
    out: str | pathlib.Path | None = None, color: bool | None = None, annotator: Any = None,
) -> InspectResult:
  """Renders the first `rows` packed rows of the SFT phase for `config` (the train job's keys) in `workdir`.

  With `color` (default: whether standard output is a colour terminal) `text` shows every token, trained
  ones highlighted; otherwise, or with `out`, an HTML page is written (to `out`, else a temporary file).
  `annotator` serves the data build's annotation model, as in `sft.jobs.train_and_evaluate`."""
  check_config(config)
  ensure_console_handler()  # the data build's and tokenizer's lines, as in the train job
  if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
    raise ConfigError(f"rows must be a whole number of at least 1, got {rows!r}")
  workdir = pathlib.Path(workdir)
  color = wants_color() if color is None else color
  tc = config.train
  try:
    splits, _ = sources.load_splits(config, workdir, annotator=annotator)
    tokenizer = sources.prepare_tokenizer(config, workdir, splits)
  except (OSError, ValueError) as err:
    failed = cannot_write(err, "the data build or tokenizer", workdir)
    if failed is None:
      raise
    raise failed from err
  batch = first_rows(
      splits["train"], tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=config.seed, rows=rows
  )
  examples = view.examples_of(batch)
  about = (
      f"the first {rows} rows of the SFT stream of {workdir} "
      f"(train.seq_len={tc.seq_len}, train.batch_size={tc.batch_size}, seed={config.seed})"
  )
  page = None
  if out is not None or not color:
    note = "Each row is packed from several examples; positions restart at 0 for each one."
    rendered = view.render_html(batch, tokenizer, examples, title=f"What training sees: {about}", notes=[note])
    page = _write_page(out, rendered)
  text = f"{about}\n" + view.render_text(batch, tokenizer, examples, color=color)
  if page is not None:
    text += f"\nthe rows with their tokens: {page}"
  return InspectResult(batch, examples, text, page)


def _write_page(out: str | pathlib.Path | None, text: str) -> pathlib.Path:
  if out is None:
    handle, name = tempfile.mkstemp(prefix="sft-inspect-", suffix=".html")
    os.close(handle)
    out = name
  path = pathlib.Path(out)
  if not path.parent.is_dir():
    raise ConfigError(f"out={str(path)!r}: its folder does not exist; create it or choose another file")
  try:
    atomic_write_text(path, text)
  except OSError as err:
    failed = cannot_write(err, "the inspect page", path)
    raise failed or ConfigError(f"cannot write {path}: {err}") from err
  return path
