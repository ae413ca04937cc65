"""Metrics: one JSON object per logged step in `<workdir>/metrics.jsonl`, and readable log lines."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any


class MetricsLog:
  """Appends to metrics.jsonl. On resume, rows past the restored step are dropped: those steps rerun."""

  def __init__(self, path: pathlib.Path, *, resume_step: int, enabled: bool = True):
    self.path = path
    self.enabled = enabled
    self.history = self._read()
    if resume_step == 0:
      self.history = []
    else:
      self.history = [row for row in self.history if row["step"] <= resume_step]
    if enabled:
      self._rewrite()

  def _read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    rows = []
    for line in self.path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut short by a crash mid-write
    return rows

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

  def first(self, key: str) -> float | None:
    return next((r[key] for r in self.history if key in r), None)


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

  def exclude(self, start: float) -> None:
    """Time since `start` (an eval, a checkpoint) counts neither in tokens/s nor in the step rate."""
    self._interval_start += time.time() - start

  def interval(self, step: int, steps_in_interval: int, tokens: float) -> tuple[float, float | None]:
    now = time.time()
    elapsed = max(now - self._interval_start, 1e-9)
    self._interval_start = now
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


def train_line(step: int, total: int, phase: str, m: dict[str, float], tokens_per_s: float, eta_s: float | None) -> str:
  return (
      f"step {step:>{len(str(total))}}/{total} [{phase:>8}] loss {m['loss']:.3f} ppl {math.exp(min(m['loss'], 50)):.1f} "
      f"acc {m['accuracy']:.3f} | grad {m['grad_norm']:.2f} lr {m['learning_rate']:.2e} | "
      f"{tokens_per_s:,.0f} tok/s | ETA {'--' if eta_s is None else format_duration(eta_s)}"
  )


def eval_line(step: int, m: dict[str, float]) -> str:
  parts = [f"eval @ {step}: loss {m['eval/loss']:.3f} ppl {m['eval/perplexity']:.1f} acc {m['eval/accuracy']:.3f}"]
  if "eval/exact_match" in m:
    parts.append(f"exact match {m['eval/exact_match']:.3f} token F1 {m['eval/token_f1']:.3f}")
  return " | ".join(parts)
