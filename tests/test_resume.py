"""Runs that are killed, stopped, damaged or resized resume exactly.

Each run is a real training process (tests/resume_worker.py). Bitwise claims compare every array of
the final train state (parameters, optimizer moments, step) and the metrics.jsonl rows (timings
aside) with an uninterrupted run of the same config.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "resume_worker.py"
STEPS = 24
TIMING_KEYS = ("train/tokens_per_s", "train/tflops_per_device", "train/mfu")  # from the wall clock
# The runs share compiled programs (the same ones, so results are unchanged): each run starts in seconds.
COMPILE_CACHE = pathlib.Path(tempfile.gettempdir()) / f"sft-test-resume-jit-cache-{os.getuid()}"

pytestmark = pytest.mark.slow  # training processes; tests/test_fast_tier.py resumes in-process




def start(workdir, data_dir, overrides=None, devices=1, stop_after=None):
  """A training process writing its log to <workdir>.log (a pipe could fill up and block it); with
  `stop_after`, it stops itself once that step's row is written (see wait_until_stopped)."""
  workdir = pathlib.Path(workdir)
  log = open(f"{workdir}.log", "a")  # noqa: SIM115  (closed by the process's end)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(COMPILE_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if stop_after is not None:
    env["RESUME_WORKER_STOP_AFTER_STEP"] = str(stop_after)
  cmd = [sys.executable, str(WORKER), str(workdir), str(data_dir), json.dumps(overrides or {}), str(devices)]
  return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def run(workdir, data_dir, overrides=None, devices=1):
  proc = start(workdir, data_dir, overrides, devices)
  proc.wait(timeout=600)
  return proc.returncode, pathlib.Path(f"{workdir}.log").read_text()


def rows(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def comparable(workdir):
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows(workdir)]


def final_state(workdir, step=STEPS):
  return ocp.PyTreeCheckpointer().restore(pathlib.Path(workdir, "checkpoints", str(step), "state").absolute())


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = _flat(a), _flat(b)
  assert leaves_a.keys() == leaves_b.keys()
  for key in leaves_a:
    np.testing.assert_array_equal(np.asarray(leaves_a[key]), np.asarray(leaves_b[key]), err_msg=key)


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}/{k}").items()}
  if isinstance(tree, (list, tuple)):
    return {k2: v2 for i, v in enumerate(tree) for k2, v2 in _flat(v, f"{prefix}/{i}").items()}
  return {prefix: tree}


def wait_until_stopped(proc, workdir, step, timeout=300):
  """Waits for a run started with `stop_after=step` to stop itself after that step: a signal sent now
  comes in at that step, however slow either process is."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
    if pid and os.WIFSTOPPED(status):
      assert rows(workdir)[-1]["step"] == step
      return
    if pid:  # it ended (reaped here: Popen is told)
      proc.returncode = os.waitstatus_to_exitcode(status)
      raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}: {pathlib.Path(f'{workdir}.log').read_text()[-3000:]}")
    time.sleep(0.01)
  raise AssertionError(f"no step {step} within {timeout} s")


def signal_at_step(proc, workdir, step, signum):
  """`signum` to a run started with `stop_after=step`, at that step; the run then goes on to handle it."""
  wait_until_stopped(proc, workdir, step)
  proc.send_signal(signum)
  proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run; its trained tokenizer is reused by the others (same ids everywhere)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  rc, out = run(workdir, data_dir)
  assert rc == 0, out[-3000:]
  assert [r["step"] for r in rows(workdir)] == list(range(STEPS + 1))
  return workdir


def fresh_workdir(tmp_path, reference, name="run"):
  workdir = tmp_path / name
  workdir.mkdir()
  shutil.copy(reference / "tokenizer.model", workdir / "tokenizer.model")
  return workdir


def test_sigkill_mid_run_then_resume_is_bitwise_equal(tmp_path, data_dir, reference):
  """Killed after step 6 with every thread stopped where it was (the background save of step 4 may be
  unfinished): the rerun resumes from the newest complete checkpoint and writes the rows after it again."""
  kill_at = 6
  workdir = fresh_workdir(tmp_path, reference)
  proc = start(workdir, data_dir, stop_after=kill_at)
  signal_at_step(proc, workdir, kill_at, signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert rows(workdir)[-1]["step"] == kill_at
  saved = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]  # complete saves only

  rc, out = run(workdir, data_dir)
  assert rc == 0, out[-3000:]
  assert (f"checkpoints at step {max(saved)}\n" in out) if saved else ("resumed from" not in out), (saved, out[-3000:])
  assert comparable(workdir) == comparable(reference)
  assert_bitwise_equal(final_state(workdir), final_state(reference))


def test_sigterm_saves_the_running_step_and_resume_is_bitwise_equal(tmp_path, data_dir, reference):
  step = 9  # not a checkpoint step of its own
  workdir = fresh_workdir(tmp_path, reference)
  proc = start(workdir, data_dir, stop_after=step)
  signal_at_step(proc, workdir, step, signal.SIGTERM)
  proc.wait(timeout=120)
  out = pathlib.Path(f"{workdir}.log").read_text()
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert f"stopped by SIGTERM after step {step};" in out, out[-3000:]
  assert (workdir / "checkpoints" / str(step)).is_dir(), "the step the signal came in is saved"
  assert rows(workdir)[-1]["step"] == step

  rc, out = run(workdir, data_dir)
  assert rc == 0, out[-3000:]
  assert f"at step {step}" in out
  assert comparable(workdir) == comparable(reference)
  assert_bitwise_equal(final_state(workdir), final_state(reference))


def test_a_second_signal_exits_at_once(tmp_path):
  script = (
      "import os, signal, sys, time\n"
      f"sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent.parent)!r})\n"
      "from sft.trainer.preemption import StopRequests\n"
      "with StopRequests() as stop:\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  assert stop.requested(sync=False) and stop.signum == signal.SIGINT\n"
      "  print('first signal: still running', flush=True)\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  time.sleep(5)\n"
      "print('not reached')\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
  assert result.returncode == 128 + signal.SIGINT, result.stderr
  assert "first signal: still running" in result.stdout and "not reached" not in result.stdout
  assert "exiting now, without saving" in result.stderr


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, data_dir, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  state_files = [p for p in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*") if p.is_file()]
  biggest = max(state_files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])

  rc, out = run(workdir, data_dir)
  assert rc == 0, out[-3000:]
  assert f"checkpoint step {STEPS} cannot be read" in out
  assert f"resuming from step {STEPS - 4}, the newest readable checkpoint" in out
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints.unreadable").iterdir()] == [str(STEPS)]
  assert comparable(workdir) == comparable(reference)
  assert_bitwise_equal(final_state(workdir), final_state(reference))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, data_dir, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for step_dir in (workdir / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
          f.write_bytes(b"")
  before = (workdir / "metrics.jsonl").read_bytes()
  rc, out = run(workdir, data_dir)
  assert rc != 0 and "Traceback" not in out, out[-3000:]
  assert "no checkpoint in" in out and "can be read" in out
  assert (workdir / "metrics.jsonl").read_bytes() == before
  assert not (workdir / "checkpoints.unreadable").exists()


def test_resume_on_another_device_count_continues_the_same_global_batches(tmp_path, data_dir, reference):
  workdir = fresh_workdir(tmp_path, reference)
  proc = start(workdir, data_dir, devices=8, stop_after=10)
  signal_at_step(proc, workdir, 10, signal.SIGTERM)
  proc.wait(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, pathlib.Path(f"{workdir}.log").read_text()[-3000:]
  rc, out = run(workdir, data_dir, devices=4)
  assert rc == 0, out[-3000:]
  assert "devices: 4" in out and "resumed from" in out
  got, want = rows(workdir), rows(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(got, want):
    if "train/loss" in b:  # the same global batches: the same tokens, losses equal to float rounding
      assert a["train/tokens"] == b["train/tokens"] and a["train/loss_tokens"] == b["train/loss_tokens"]
      assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4), a["step"]
  assert got[-1]["eval/loss"] == pytest.approx(want[-1]["eval/loss"], rel=1e-4)


def test_a_second_run_on_a_workdir_in_use_refuses_naming_the_holder(tmp_path, data_dir, reference):
  from sft.trainer import lock  # noqa: PLC0415

  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = {p.name: p.read_bytes() for p in workdir.glob("*.json*")}
  with lock.workdir_lock(workdir):
    rc, out = run(workdir, data_dir, {"train.sft_steps": STEPS + 4})
  assert rc != 0 and "Traceback" not in out, out[-3000:]
  assert f"is in use by pid {os.getpid()}" in out
  assert {p.name: p.read_bytes() for p in workdir.glob("*.json*")} == before, "nothing written"


def test_config_changes_at_resume_are_refused_or_logged_and_kept(tmp_path, data_dir, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  saved = (workdir / "config.json").read_bytes()
  rc, out = run(workdir, data_dir, {"train.lr": 0.5, "model.d_model": 64})
  assert rc != 0 and "Traceback" not in out, out[-3000:]
  assert "train.lr: 0.001 -> 0.5" in out and "model.d_model: 32 -> 64" in out
  assert (workdir / "config.json").read_bytes() == saved, "a refused run leaves the saved config alone"

  rc, out = run(workdir, data_dir, {"train.sft_steps": STEPS + 2, "eval.every_steps": 5})
  assert rc == 0, out[-3000:]
  assert "changed at resume: train.sft_steps: 24 -> 26" in out and "eval.every_steps: 8 -> 5" in out
  assert json.loads((workdir / f"config-{STEPS}.json").read_text())["train"]["sft_steps"] == STEPS + 2
  assert json.loads((workdir / "config-0.json").read_text())["train"]["sft_steps"] == STEPS
  assert json.loads((workdir / "config.json").read_text())["train"]["sft_steps"] == STEPS + 2
  assert rows(workdir)[-1]["step"] == STEPS + 2
