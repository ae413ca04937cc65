"""A run with skipped tests fails, naming each and why: CI must not pass by not testing.

SFT_ALLOW_SKIPS=1 lets skips pass (a checkout without the test extras: torch, transformers, apache-beam).
Registered from tests/conftest.py; a pytest run elsewhere loads it with `-p skips_plugin`.
"""

import os

import pytest

ALLOW = "SFT_ALLOW_SKIPS"


class SkipGate:
  def __init__(self):
    self.skipped = []  # (node id, reason)

  def _note(self, report):
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail reports as skipped but is not one
      longrepr = report.longrepr
      reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")
      self.skipped.append((report.nodeid, reason))

  def pytest_runtest_logreport(self, report):
    self._note(report)

  def pytest_collectreport(self, report):  # a module-level pytest.importorskip skips the whole file
    self._note(report)

  def pytest_sessionfinish(self, session):
    # The status pytest returns is read after this hook, so a clean run with skips becomes a failed one.
    if self.skipped and not _allowed() and session.exitstatus == pytest.ExitCode.OK:
      session.exitstatus = pytest.ExitCode.TESTS_FAILED

  def pytest_terminal_summary(self, terminalreporter):
    if not self.skipped:
      return
    allowed = _allowed()
    title = f"{len(self.skipped)} skipped: " + (
        f"allowed by {ALLOW}=1" if allowed else f"this run FAILS (install the test extras, or set {ALLOW}=1)"
    )
    terminalreporter.write_sep("=", title, red=not allowed, yellow=allowed)
    for nodeid, reason in self.skipped:
      terminalreporter.write_line(f"SKIPPED {nodeid or '(collection)'}: {reason}")


def _allowed():
  return os.environ.get(ALLOW) == "1"


def pytest_configure(config):
  if not config.pluginmanager.has_plugin("sft-skip-gate"):
    config.pluginmanager.register(SkipGate(), "sft-skip-gate")
