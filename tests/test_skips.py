"""The skip gate (tests/skips_plugin.py): a run with a skipped test fails and says why, unless SFT_ALLOW_SKIPS=1."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

SKIPPING = """
import pytest

def test_passes():
  pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
  assert False

def test_needs_a_missing_extra():
  pytest.skip("no frobnicator installed")
"""


def run_pytest(tmp_path, source, allow=None):
  (tmp_path / "test_tiny.py").write_text(textwrap.dedent(source))
  (tmp_path / "test_other.py").write_text("def test_other():\n  pass\n")
  ini = tmp_path / "pytest.ini"
  ini.write_text("[pytest]\n")  # not the checkout's ini, conftest or addopts
  env = {k: v for k, v in os.environ.items() if k != "SFT_ALLOW_SKIPS"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)  # skips_plugin importable
  if allow is not None:
    env["SFT_ALLOW_SKIPS"] = allow
  options = ["-p", "no:cacheprovider", "-p", "skips_plugin", "-c", str(ini), f"--rootdir={tmp_path}"]
  cmd = [sys.executable, "-m", "pytest", *options, str(tmp_path)]
  return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_run_and_names_the_reason(tmp_path):
  result = run_pytest(tmp_path, SKIPPING)
  assert result.returncode == 1, result.stdout[-2000:]
  assert "2 passed, 1 skipped, 1 xfailed" in result.stdout
  assert "test_tiny.py::test_needs_a_missing_extra: no frobnicator installed" in result.stdout
  assert "SFT_ALLOW_SKIPS=1" in result.stdout


def test_allowed_skips_pass(tmp_path):
  result = run_pytest(tmp_path, SKIPPING, allow="1")
  assert result.returncode == 0, result.stdout[-2000:]
  assert "no frobnicator installed" in result.stdout


def test_a_skipped_module_counts(tmp_path):  # as tests/test_hf.py without torch
  source = "import pytest\nfrobnicator = pytest.importorskip('frobnicator')\n\ndef test_x():\n  pass\n"
  result = run_pytest(tmp_path, source)
  assert result.returncode == 1, result.stdout[-2000:]
  assert "SKIPPED test_tiny.py: could not import 'frobnicator'" in result.stdout


def test_no_skips_no_change(tmp_path):
  result = run_pytest(tmp_path, "def test_x():\n  pass\n")
  assert result.returncode == 0, result.stdout[-2000:]
  failing = run_pytest(tmp_path, "def test_x():\n  assert False\n")
  assert failing.returncode == 1
