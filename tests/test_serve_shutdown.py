"""`sft serve` as its own process: SIGTERM with a streamed answer in flight ends the process cleanly (the
answer completes or ends with an error event, new connections are refused meanwhile), and a wrong config
fails with one line."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2
import pytest
from serving_util import make_workdir

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHUTDOWN_S = 3.0
CONTEXT = 1024  # a long answer, so that one is still streaming when the signal comes


def _sft(*args, **kw) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "sft", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"sft serve exited with {proc.returncode} before listening: {proc.stderr.read()[-2000:]}")
    try:
      if httpx2.get(url, timeout=2).status_code == 200:
        return
    except httpx2.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  pytest.fail("sft serve did not answer /health in time")


@pytest.mark.slow
def test_sigterm_with_a_stream_in_flight_exits_cleanly_and_refuses_new_connections(tmp_path, tokenizer):
  folder = make_workdir(tmp_path / "model", tokenizer, seq_len=CONTEXT)
  port = _free_port()
  proc = _sft("serve", "--config=serve", f"--workdir={folder}", f"--config.port={port}", "--config.slots=2",
              "--config.decode_chunk=4", f"--config.max_tokens={CONTEXT}", f"--config.shutdown_timeout_s={SHUTDOWN_S}",
              "--config.name=tiny")
  root = f"http://127.0.0.1:{port}"
  try:
    _wait_healthy(proc, root + "/health")
    events, outcome, streaming = [], [], threading.Event()

    def stream():
      body = {"model": "tiny", "prompt": "import json", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
      try:
        with httpx2.stream("POST", root + "/v1/completions", json=body, timeout=60) as response:
          for line in response.iter_lines():
            if line.startswith("data: "):
              events.append(line.removeprefix("data: "))
              streaming.set()
        outcome.append("ended")
      except httpx2.TransportError as err:
        outcome.append(f"cut: {err!r}")
        streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    if proc.poll() is None:  # still draining: it listens no more
      with pytest.raises(httpx2.ConnectError):
        httpx2.get(root + "/health", timeout=2)
    proc.wait(SHUTDOWN_S + 30)
    reader.join(30)
    # uvicorn re-raises the signal once it has shut down, so the process ends as SIGTERM's default would.
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read()[-2000:]
    assert time.monotonic() - signalled < SHUTDOWN_S + 30
    # The answer in flight completed, or was told it was cut: never dropped without a word.
    assert outcome == ["ended"], outcome
    last = events[-1]
    assert last == "[DONE]" or "error" in json.loads(last), events[-3:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(10)


@pytest.mark.slow
def test_sft_serve_with_another_jobs_config_fails_with_one_line(tmp_path):
  proc = _sft("serve", "--config=quickstart", f"--workdir={tmp_path}")
  _, err = proc.communicate(timeout=120)
  lines = [line for line in err.splitlines() if line.strip()]
  assert proc.returncode != 0 and len(lines) == 1 and "serve" in lines[0], err


@pytest.mark.slow
def test_sft_serve_without_a_model_folder_fails_with_one_line(tmp_path):
  proc = _sft("serve", "--config=serve", f"--workdir={tmp_path / 'missing'}")
  _, err = proc.communicate(timeout=120)
  lines = [line for line in err.splitlines() if line.strip()]
  assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("FATAL ") and "--workdir" in lines[0], err
