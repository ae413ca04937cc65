"""Two real processes on CPU (a localhost coordinator, 2 fake devices each) run the shrunken quickstart
end to end: process 0 alone builds the data and trains the tokenizer, evals generate across processes,
checkpoints are saved and restored, and every loss equals that of one process with 4 devices."""

import importlib
import inspect
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from fresh_process import fresh_env

from sft.databuilder import api_records, pretrain_texts, read_module

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"
MODULES = ("json.decoder", "json.encoder", "shlex", "string", "textwrap", "csv", "argparse", "fractions")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  """The quickstart's kind of data from a few stdlib modules: API questions and their raw docs."""
  docs = [doc for name in MODULES for doc in read_module(inspect.getsource(importlib.import_module(name)), name)]
  raw = tmp_path_factory.mktemp("raw")
  chats, _ = api_records(docs)
  (raw / "chat.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in chats))
  (raw / "text.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in pretrain_texts(docs)))
  return raw


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir: pathlib.Path, num_processes: int, overrides: dict) -> list[subprocess.Popen]:
  port, env = free_port(), fresh_env()
  workdir.mkdir(parents=True, exist_ok=True)
  return [
      subprocess.Popen(
          [sys.executable, str(WORKER), str(i), str(num_processes), str(port), str(workdir), str(workdir / "summary.json"), json.dumps(overrides)],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(num_processes)
  ]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
  """(exit code, output) of each process; all are killed if one outlives the timeout."""
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


def run_ok(procs: list[subprocess.Popen]) -> list[str]:
  results = finish(procs)
  for i, (code, out) in enumerate(results):
    assert code == 0, f"process {i} exited {code}:\n{out[-4000:]}"
  return [out for _, out in results]


def rows(workdir: pathlib.Path) -> dict[int, dict]:
  return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


LOSSES = ("train/loss", "eval/loss", "eval/exact_match")


def assert_same_losses(got: dict[int, dict], want: dict[int, dict]) -> None:
  """Every step of `got` is a step of `want` with the same losses; a loss that one run logs at a step and
  the other does not is a difference too, and each loss must be logged somewhere."""
  assert got.keys() <= want.keys(), f"steps only in one run: {sorted(got.keys() - want.keys())}"
  for key in LOSSES:
    assert any(key in row for row in got.values()), f"no {key} logged"
  for step, row in got.items():
    for key in LOSSES:
      assert (key in row) == (key in want[step]), f"{key} at step {step} is logged by one run only"
      if key in row:
        np.testing.assert_allclose(row[key], want[step][key], rtol=1e-4, err_msg=f"{key} at step {step}")


def test_a_loss_logged_by_one_run_only_is_a_difference():
  want = {1: {"train/loss": 2.0}, 2: {"train/loss": 1.0, "eval/loss": 1.5, "eval/exact_match": 0.0}}
  assert_same_losses(want, want)
  for got in ({**want, 1: {}}, {**want, 2: {"train/loss": 1.0, "eval/loss": 1.5}}, {**want, 3: want[2]}, {1: want[1]}):
    with pytest.raises(AssertionError):
      assert_same_losses(got, want)
  with pytest.raises(AssertionError, match="eval/loss at step 2"):
    assert_same_losses(want, {**want, 2: {"train/loss": 1.0, "eval/loss": 1.6, "eval/exact_match": 0.0}})


@pytest.mark.slow
def test_two_processes_train_like_one_then_resume(tmp_path, raw_dir):
  data = {"data.build.stdlib": False, "data.build.input_dir": str(raw_dir)}
  two, one = tmp_path / "two", tmp_path / "one"
  # The reference runs all 11 steps at once (the learning rate is flat after warmup, so more steps
  # change no earlier step); the 2-process job runs 8, then resumes to 11.
  reference = start(one, 1, {**data, "train.sft_steps": 9})
  first = run_ok(start(two, 2, data))
  run_ok(reference)

  assert "data builder: read" in first[0] and "tokenizer: trained" in first[0]
  assert "data builder" not in first[1] and "tokenizer: loaded" in first[1]  # it waited for process 0
  assert (two / "tokenizer.model").read_bytes() == (one / "tokenizer.model").read_bytes()
  assert sorted(rows(two)) == list(range(9))
  assert_same_losses(rows(two), rows(one))
  assert json.loads((two / "summary.json").read_text())["eval/loss_last"] == pytest.approx(rows(two)[8]["eval/loss"])

  resumed = run_ok(start(two, 2, {**data, "train.sft_steps": 9}))
  assert all("resumed from" in out and "at step 8" in out for out in resumed)
  assert sorted(rows(two)) == list(range(12))
  assert_same_losses(rows(two), rows(one))
  summary = json.loads((two / "summary.json").read_text())
  np.testing.assert_allclose(summary["eval/loss_last"], rows(one)[11]["eval/loss"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["stale manifest", "annotation"])
def test_a_failure_on_process_0_stops_every_process(tmp_path, raw_dir, case):
  overrides, workdir = {"data.build.stdlib": False, "data.build.input_dir": str(raw_dir)}, tmp_path / "run"
  if case == "stale manifest":
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "manifest.json").write_text("{")  # process 0's data build refuses it
    expected = "manifest.json is not valid JSON"
  else:  # the annotation model's mesh would span both processes while one of them waits
    (tmp_path / "model" / "checkpoints" / "1").mkdir(parents=True)  # a workdir as the annotator's check sees one
    (tmp_path / "model" / "config.json").write_text('{"train": {}}')
    overrides["data.build.annotate.model"] = str(tmp_path / "model")
    expected = "data.build.annotate.model needs a single process"
  (code_0, out_0), (code_1, out_1) = finish(start(workdir, 2, overrides))
  assert code_0 != 0 and expected in out_0, out_0[-3000:]
  assert code_1 != 0 and "process 0 failed while building the data" in out_1, out_1[-3000:]
