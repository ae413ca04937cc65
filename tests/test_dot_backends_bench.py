"""benchmarks/dot_backends.py runs end to end in --quick mode on the default and one flag this jaxlib
ignores: the default's programs hold library fusions, the ignored flag's compiled programs are recognised as
the default's (so it is not timed), and the table prints the default's figures."""

import os
import re
import subprocess
import sys

import pytest
from fresh_process import fresh_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_run_tells_an_ignored_flag_from_the_default():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "dot_backends.py"), "--quick", "--passes", "1",
       "--settings", "default", "no-xnnpack"],
      capture_output=True, text=True, timeout=900, cwd=ROOT, env=fresh_env(JAX_PLATFORMS="cpu"),
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert re.search(r"no-xnnpack: '--xla_cpu_use_xnnpack=false': same programs as default", out), out
  default = re.search(r"^\| default \| default \((.*?)\) \| (.*)$", out, re.M)
  assert default and re.fullmatch(r"(ynn|xnn|onednn) \d+.*", default[1]), out  # the dots went to a library's fusions
  cells = [c.strip() for c in default[2].split("|")]
  assert all(float(c) > 0 for c in cells[:6]), cells  # GFLOP/s of each shape
  assert float(cells[6]) > 0 and float(cells[7]) > 0  # train step seconds, decode tokens/s
  assert re.search(r"^\| no-xnnpack \| no \(", out, re.M), out
