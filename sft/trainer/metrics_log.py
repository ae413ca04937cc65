"""Metrics: one JSON object per logged step in `<workdir>/metrics.jsonl`, the same numbers as
TensorBoard scalars in `<workdir>/tensorboard/`, and readable log lines."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

from sft.evaluator.tasks import HEADLINE
from sft.trainer.workdir import Workdir


class MetricsLog:
  """Appends to metrics.jsonl, and every numeric value of a row to TensorBoard as a scalar at the
  row's step (strings such as `phase` are left out). On resume, rows past the restored step are
  dropped: those steps rerun. Their old TensorBoard points stay in the earlier event file, but the
  new file starts with a purge marker at `resume_step + 1` (0 for a fresh start), so TensorBoard
  hides them and shows the rerun's values; a reader that ignores purges sees both, the rerun's later.
  Writes nothing when not `enabled` (processes other than 0). `close()` at the end."""

  def __init__(self, path: pathlib.Path, *, resume_step: int, enabled: bool = True):
    self.path = path
    self.enabled = enabled
    self.tensorboard_dir = Workdir(path.parent).tensorboard
    self._resume_step = resume_step
    self._writer = None  # opened at the first row: a run that logs nothing leaves no empty event file
    self.history = read_rows(path)
    if resume_step == 0:
      self.history = []
    else:
      self.history = [row for row in self.history if row["step"] <= resume_step]
    if enabled:
      self._rewrite()

  def _rewrite(self) -> None:
    # Atomic: a crash here must not lose the rows of the steps that are kept.
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self.history.append(row)
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(row) + "\n")
      writer = self._tensorboard()
      for key, value in scalars(row).items():
        writer.add_scalar(key, value, global_step=step)
      writer.flush()  # rows are rare (log_every, evals): a live TensorBoard sees each at once

  def _tensorboard(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (only process 0 writes; `import sft` stays light)

      self._writer = SummaryWriter(
          str(self.tensorboard_dir),
          # TensorBoard hides the points of earlier files from this step on: the steps that rerun, or
          # all of them when the run starts over (a run stopped before its first checkpoint).
          purge_step=self._resume_step + 1 if self._resume_step else 0,
          # The file name has whole seconds only and is opened with "wb": a resume within the same
          # second would overwrite the first file. A fixed-width time suffix keeps names unique and
          # in write order, the order TensorBoard reads them (and applies purges) in.
          filename_suffix=f".{time.time_ns():020d}.{os.getpid()}",
      )
    return self._writer

  def close(self) -> None:
    """Flushes and closes the event file; safe to call twice, or when nothing was written."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def first(self, key: str) -> float | None:
    return next((r[key] for r in self.history if key in r), None)


def read_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl ([] when there is none)."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line cut short by a crash mid-write
  return rows


def scalars(row: dict[str, Any]) -> dict[str, float]:
  """The numeric values of a row but its step: strings (`phase`, a non-finite loss) and flags are left out."""
  return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class Progress:
  """Tokens/s over each log interval and the ETA, with compilation and evaluation time left out."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self._interval_start = time.time()
    self._timed_steps, self._timed_s = 0, 0.0
    self._first_interval = True
    self.last_interval_s = 0.0  # the seconds of the last interval (what its tokens/s divides by)

  def exclude(self, start: float) -> None:
    """Time since `start` (an eval, a checkpoint) counts neither in tokens/s nor in the step rate."""
    self._interval_start += time.time() - start

  def interval(self, step: int, steps_in_interval: int, tokens: float) -> tuple[float, float | None]:
    now = time.time()
    elapsed = max(now - self._interval_start, 1e-9)
    self._interval_start, self.last_interval_s = now, elapsed
    if self._first_interval:  # includes compiling the step: no rate from it
      self._first_interval = False
    else:
      self._timed_steps += steps_in_interval
      self._timed_s += elapsed
    eta = self._timed_s / self._timed_steps * (self.total_steps - step) if self._timed_steps else None
    return tokens / elapsed, eta


def config_summary(config) -> str:
  """One line per config section: `train: batch_size=16 lr=0.003 ...`."""
  lines = []
  for key, value in sorted(config.items()):
    if hasattr(value, "items"):
      # A nested section (data.build) is summarised by its name: the data build's manifest has it whole.
      lines.append(f"  {key}: " + " ".join(f"{k}=<{k} section>" if hasattr(v, "items") else f"{k}={v}" for k, v in sorted(value.items())))
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
      lines.append(f"  {key}: " + " ".join(f"{a}->{b}" for a, b in value))
    else:
      lines.append(f"  {key}: {value}")
  return "\n".join(lines)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def train_line(
    step: int, total: int, phase: str, m: dict[str, float], tokens_per_s: float, eta_s: float | None, *,
    skipped: int | None = None, speed: dict[str, float] | None = None,
) -> str:
  """A log line of train metrics; with `skipped` (train.on_nonfinite="skip"), the steps skipped since the last line;
  with `speed` (sft.trainer.flops.achieved), the model TFLOP/s per device and the MFU when the peak is known."""
  return (
      f"step {step:>{len(str(total))}}/{total} [{phase:>8}] loss {m['loss']:.3f} ppl {math.exp(min(m['loss'], 50)):.1f} "
      f"acc {m['accuracy']:.3f} | grad {m['grad_norm']:.2f} lr {m['learning_rate']:.2e} | "
      + (f"skipped {skipped} | " if skipped else "")
      + f"{tokens_per_s:,.0f} tok/s" + (_speed(speed) if speed else "")
      + f" | ETA {'--' if eta_s is None else format_duration(eta_s)}"
  )


def _speed(speed: dict[str, float]) -> str:
  mfu = f" MFU {speed['mfu']:.1%}" if "mfu" in speed else ""
  return f" {speed['tflops_per_device']:.3g} TFLOP/s/device{mfu}"


def eval_line(step: int, m: dict[str, float]) -> str:
  parts = [f"eval @ {step}: loss {m['eval/loss']:.3f} ppl {m['eval/perplexity']:.1f} acc {m['eval/accuracy']:.3f}"]
  if "eval/exact_match" in m:
    parts.append(f"exact match {m['eval/exact_match']:.3f} token F1 {m['eval/token_f1']:.3f}")
  if "eval/choice_accuracy" in m:
    parts.append(f"choices: accuracy {m['eval/choice_accuracy']:.3f} gold rank {m['eval/gold_rank']:.2f}")
  per_task = [f"{task} {key} {m[f'eval/{task}/{key}']:.3f}" for task, key in HEADLINE.items() if f"eval/{task}/{key}" in m]
  if per_task:
    parts.append(", ".join(per_task))
  return " | ".join(parts)
