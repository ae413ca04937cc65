"""Training curves as one PNG, drawn from the rows of metrics.jsonl alone: so any workdir can be
plotted again, a finished run, a stopped one, or one still running.

    curves_from_workdir(workdir)       # -> <workdir>/curves.png
    plot_curves(rows, path)            # rows as MetricsLog.history holds them
"""

from __future__ import annotations

import pathlib
from typing import Any

from sft.trainer.metrics_log import read_rows, scalars
from sft.trainer.workdir import Workdir


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows with a number under `key`: a non-finite value is logged as a string."""
  points = [(row["step"], values[key]) for row in rows if key in (values := scalars(row))]
  return [s for s, _ in points], [v for _, v in points]


def phase_boundary(rows: list[dict[str, Any]]) -> int | None:
  """The last step logged in pretraining when SFT follows it, else None. It is the exact boundary when
  log_every divides pretrain_steps; otherwise the boundary lies before the first SFT row."""
  pretrain = [row["step"] for row in rows if row.get("phase") == "pretrain"]
  if not pretrain or not any(row.get("phase") == "sft" for row in rows):
    return None
  return max(pretrain)


def plot_curves(rows: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
  """Loss (train as a line, eval as markers), learning rate and tokens/s against step, one panel each,
  with the pretrain -> SFT boundary marked. An empty history draws a placeholder that says so."""
  # A Figure with no pyplot: the caller's backend (a notebook's inline plots) is left as it was.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  path = pathlib.Path(path)
  fig = Figure(figsize=(7, 8), dpi=100)
  FigureCanvasAgg(fig)
  panels = [
      ("loss", [("train/loss", "train", "-"), ("eval/loss", "eval", "o")]),
      ("learning rate", [("train/learning_rate", None, "-")]),
      ("tokens/s", [("train/tokens_per_s", None, "-")]),
  ]
  axes = fig.subplots(len(panels), 1, sharex=True)
  boundary = phase_boundary(rows)
  for ax, (title, lines) in zip(axes, panels):
    drawn = False
    for key, label, style in lines:
      steps, values = series(rows, key)
      if steps:
        ax.plot(steps, values, style, label=label, markersize=5)
        drawn = True
    if not drawn:
      ax.text(0.5, 0.5, "nothing logged yet" if not rows else "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if boundary is not None:
      ax.axvline(boundary, color="gray", linestyle="--", linewidth=1, label="pretrain | SFT" if ax is axes[0] else None)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="best", fontsize=8)
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
  axes[0].set_title(f"training curves ({len(rows)} logged rows)" if rows else "training curves: no metrics logged yet")
  axes[-1].set_xlabel("step")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, metadata={"Software": None})  # no timestamp: same rows, same bytes
  return path


def curves_from_workdir(workdir: pathlib.Path | str) -> pathlib.Path:
  """Draws `<workdir>/curves.png` from `<workdir>/metrics.jsonl` and returns its path."""
  workdir = pathlib.Path(workdir)
  paths = Workdir(workdir)
  metrics = paths.metrics
  if not metrics.exists():
    raise FileNotFoundError(f"no {metrics.name} in {workdir}: is it the workdir of a training run?")
  return plot_curves(read_rows(metrics), paths.curves)
