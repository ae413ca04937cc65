"""Running a check in a fresh Python process: the tests that need their own device count (8 fake CPU
devices, several hosts) or a clean JAX start them this way, and read a JSON result off stdout."""

import json
import os
import subprocess
import sys


def fresh_env(**extra: str) -> dict[str, str]:
  """This process's environment without XLA_FLAGS (the child picks its own device count), plus `extra`."""
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | extra


def run_json(args: list[str], *, env: dict[str, str] | None = None, timeout: int = 600, **kwargs) -> tuple[dict, subprocess.CompletedProcess]:
  """Runs `python *args`, asserts it succeeded (showing the end of its stderr if not), and returns the
  JSON object on its last stdout line with the finished process (for its other output)."""
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env or fresh_env(), timeout=timeout, **kwargs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc
