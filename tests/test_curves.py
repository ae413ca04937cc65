"""TensorBoard scalars from MetricsLog and the PNG training curves: no training run, just rows."""

import json
import math
import struct
import subprocess
import sys

import pytest

from sft.trainer.curves import curves_from_workdir, phase_boundary, plot_curves
from sft.trainer.metrics_log import MetricsLog

PNG = b"\x89PNG\r\n\x1a\n"


def rows_of_a_run(steps=(2, 4, 6, 8), pretrain_until=4, eval_every=4):
  rows = [{"step": 0, "eval/loss": 3.0, "eval/exact_match": 0.0}]
  for step in steps:
    row = {"step": step, "phase": "pretrain" if step <= pretrain_until else "sft", "train/loss": 3.0 - step / 10,
           "train/learning_rate": 1e-3 * step, "train/tokens_per_s": 1000.0 + step}
    if step % eval_every == 0:
      row.update({"eval/loss": 2.9 - step / 10, "eval/exact_match": step / 10})
    rows.append(row)
  return rows


def read_scalars(logdir) -> dict[tuple[str, int], float]:
  """{(tag, step): value} as TensorBoard shows them: files in name order, a SessionLog START at step s
  hides the points at steps >= s written before it, and a later point for a step replaces an earlier one."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  shown = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at : at + 8])
      event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
      at += 12 + length + 4  # length, its crc, the record, its crc
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = {k: v for k, v in shown.items() if k[1] < event.step}
      for value in event.summary.value:
        shown[(value.tag, event.step)] = value.simple_value
  return shown


def expected_scalars(rows) -> dict[tuple[str, int], float]:
  return {(k, r["step"]): float(v) for r in rows for k, v in r.items() if k != "step" and not isinstance(v, str)}


def log_rows(workdir, rows, resume_step=0, enabled=True) -> MetricsLog:
  log = MetricsLog(workdir / "metrics.jsonl", resume_step=resume_step, enabled=enabled)
  for row in rows:
    log.write(row["step"], {k: v for k, v in row.items() if k != "step"})
  log.close()
  return log


def test_every_numeric_value_is_a_tensorboard_scalar_and_strings_are_not(tmp_path):
  rows = rows_of_a_run()
  log_rows(tmp_path, rows)
  shown = read_scalars(tmp_path / "tensorboard")
  assert shown.keys() == expected_scalars(rows).keys()
  assert all(math.isclose(shown[k], v, rel_tol=1e-6) for k, v in expected_scalars(rows).items())  # float32 in the event
  assert not any(tag == "phase" for tag, _ in shown)
  assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows


def test_a_non_finite_value_is_logged_as_a_string_and_left_out_of_tensorboard(tmp_path):
  log_rows(tmp_path, [{"step": 2, "train/loss": float("nan"), "train/learning_rate": 1e-3}])
  assert read_scalars(tmp_path / "tensorboard") == {("train/learning_rate", 2): pytest.approx(1e-3)}
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["train/loss"] == "nan"


def test_resume_drops_the_rows_past_the_restored_step_and_tensorboard_shows_the_rerun(tmp_path):
  first = rows_of_a_run(steps=(2, 4, 6, 8, 10, 12))  # 12 is not rerun: only the purge hides it
  log_rows(tmp_path, first)
  rerun = [{**row, "train/loss": 9.0} for row in rows_of_a_run(steps=(6, 8, 10))[1:]]
  log = log_rows(tmp_path, rerun, resume_step=4)

  kept = [r for r in first if r["step"] <= 4]
  assert [r["step"] for r in log.history] == [0, 2, 4, 6, 8, 10]
  assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == kept + rerun
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # a resume in the same second: no overwrite
  shown = read_scalars(tmp_path / "tensorboard")
  assert shown.keys() == expected_scalars(kept + rerun).keys()
  assert shown[("train/loss", 6)] == 9.0 and shown[("train/loss", 2)] == pytest.approx(2.8)


def test_a_fresh_start_hides_the_points_of_an_earlier_run(tmp_path):
  log_rows(tmp_path, rows_of_a_run(steps=(2, 4)))
  again = rows_of_a_run(steps=(2,))
  log_rows(tmp_path, again, resume_step=0)
  assert read_scalars(tmp_path / "tensorboard").keys() == expected_scalars(again).keys()


def test_a_disabled_log_writes_nothing(tmp_path):
  log = log_rows(tmp_path, rows_of_a_run(), enabled=False)
  assert len(log.history) == 5
  assert list(tmp_path.iterdir()) == []


def test_close_twice_or_with_nothing_written_is_fine(tmp_path):
  log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=0)
  log.close()
  log.close()
  assert not (tmp_path / "tensorboard").exists()


def assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG
  assert 5_000 < len(data) < 2_000_000
  width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
  assert (width, height) == (700, 800)


@pytest.mark.parametrize("rows", [
    rows_of_a_run(),
    [r for r in rows_of_a_run() if "train/loss" in r and "eval/loss" not in r],  # no eval rows
    [{**r, "phase": "sft"} for r in rows_of_a_run() if "phase" in r],  # no pretraining
    [],
], ids=["full", "no-eval", "no-pretrain", "empty"])
def test_plot_curves_writes_a_png(tmp_path, rows):
  path = plot_curves(rows, tmp_path / "sub" / "curves.png")
  assert path == tmp_path / "sub" / "curves.png"
  assert_png(path)


def test_the_phase_boundary_is_the_last_pretrain_row():
  assert phase_boundary(rows_of_a_run(pretrain_until=4)) == 4
  assert phase_boundary([{**r, "phase": "sft"} for r in rows_of_a_run()]) is None
  assert phase_boundary([{**r, "phase": "pretrain"} for r in rows_of_a_run()]) is None
  assert phase_boundary([]) is None


def test_curves_from_a_workdir(tmp_path):
  log_rows(tmp_path, rows_of_a_run())
  assert_png(curves_from_workdir(tmp_path))
  assert (tmp_path / "curves.png").exists()
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    curves_from_workdir(tmp_path / "elsewhere")


def test_plotting_leaves_pyplot_and_the_backend_alone(tmp_path):
  # A fresh interpreter: in this one another test may have imported pyplot already.
  code = (
      "import sys, matplotlib; from sft.trainer.curves import plot_curves; "
      f"plot_curves([], {str(tmp_path / 'c.png')!r}); "
      "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
