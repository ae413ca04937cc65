"""The workdir lock: one run per workdir; locks of gone processes taken over, live or foreign ones refused,
and exactly one winner when processes race for it."""

import json
import logging
import multiprocessing
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.errors import ConfigError
from sft.trainer import rundir

HOST = socket.gethostname()
LINUX = os.path.exists("/proc/self/stat")


def _write_lock(workdir: pathlib.Path, age_s: float = 0.0, **holder) -> pathlib.Path:
  path = workdir / rundir.LOCK_FILE
  path.write_text(json.dumps({"started": "2024-01-01T00:00:00+00:00", "argv": ["train.py"], **holder}))
  if age_s:
    os.utime(path, (time.time() - age_s,) * 2)
  return path


def _holder(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / rundir.LOCK_FILE).read_text())


def _exited_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _start_time(pid: int) -> int:
  return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


@pytest.fixture
def sleeper():
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield proc
  proc.kill()
  proc.wait()



def test_the_lock_records_its_holder_and_is_removed_after(tmp_path):
  with rundir.workdir_lock(tmp_path) as path:
    holder = _holder(tmp_path)
    assert path == tmp_path / "run.lock"
    assert (holder["pid"], holder["host"], holder["argv"]) == (os.getpid(), HOST, sys.argv)
    assert holder["started"]
    if LINUX:
      assert holder["pid_start"] == _start_time(os.getpid())
  assert not path.exists()


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with rundir.workdir_lock(tmp_path) as path:
    with pytest.raises(ConfigError) as e:
      with rundir.workdir_lock(tmp_path):
        pytest.fail("a second run entered a locked workdir")
    message = str(e.value)
    assert f"{tmp_path} is in use by pid {os.getpid()} on host {HOST}" in message
    assert f"delete {path}" in message
    assert path.exists()  # the refused run leaves the holder's lock alone
  assert not path.exists()


def test_a_live_process_of_this_host_keeps_its_lock(tmp_path, sleeper):
  _write_lock(tmp_path, age_s=3600, pid=sleeper.pid, host=HOST, pid_start=_start_time(sleeper.pid) if LINUX else None)
  with pytest.raises(ConfigError, match=f"in use by pid {sleeper.pid} on host"):
    with rundir.workdir_lock(tmp_path):
      pass
  assert _holder(tmp_path)["pid"] == sleeper.pid


def test_the_lock_of_an_exited_process_is_taken_over(tmp_path, caplog):
  dead = _exited_pid()
  _write_lock(tmp_path, pid=dead, host=HOST)
  with caplog.at_level(logging.WARNING, logger="sft"):
    with rundir.workdir_lock(tmp_path):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert f"pid {dead} on host {HOST}" in caplog.text and "exited" in caplog.text
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left aside


@pytest.mark.skipif(not LINUX, reason="process start times come from /proc")
def test_a_reused_pid_does_not_keep_a_lock(tmp_path, sleeper, caplog):
  _write_lock(tmp_path, pid=sleeper.pid, host=HOST, pid_start=_start_time(sleeper.pid) - 1)
  with caplog.at_level(logging.WARNING, logger="sft"):
    with rundir.workdir_lock(tmp_path):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert "another process" in caplog.text


@pytest.mark.parametrize("content", [b"", b'{"pid": 12', b"[1, 2]", b'{"pid": 0, "host": "%s"}' % HOST.encode()])
def test_an_old_unreadable_lock_is_taken_over(tmp_path, caplog, content):
  path = tmp_path / rundir.LOCK_FILE
  path.write_bytes(content)
  os.utime(path, (time.time() - 2 * rundir.CORRUPT_GRACE_S,) * 2)
  with caplog.at_level(logging.WARNING, logger="sft"):
    with rundir.workdir_lock(tmp_path):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert "unreadable" in caplog.text


def test_a_young_unreadable_lock_is_refused(tmp_path):
  path = tmp_path / rundir.LOCK_FILE
  path.write_bytes(b'{"pid": 1')  # a run that is still writing it, as far as we can tell
  with pytest.raises(ConfigError, match="unreadable") as e:
    with rundir.workdir_lock(tmp_path):
      pass
  assert str(path) in str(e.value)
  assert path.read_bytes() == b'{"pid": 1'


@pytest.mark.parametrize("age_s", [0, 10**6])
def test_a_lock_of_another_host_is_never_taken_over(tmp_path, age_s):
  _write_lock(tmp_path, age_s=age_s, pid=_exited_pid(), host="other-host.example")
  with pytest.raises(ConfigError) as e:
    with rundir.workdir_lock(tmp_path):
      pass
  message = str(e.value)
  assert "on host other-host.example since 2024-01-01T00:00:00+00:00 (train.py)" in message
  assert "another host is never taken over" in message
  assert _holder(tmp_path)["host"] == "other-host.example"


def test_the_lock_is_released_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError):
    with rundir.workdir_lock(tmp_path):
      raise RuntimeError("training failed")
  assert not (tmp_path / rundir.LOCK_FILE).exists()
  with rundir.workdir_lock(tmp_path):  # and the next run gets it
    pass


def test_only_our_own_lock_is_removed(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger="sft"):
    with rundir.workdir_lock(tmp_path) as path:
      path.unlink()
      _write_lock(tmp_path, pid=4242, host="someone-else")
  assert _holder(tmp_path)["host"] == "someone-else"
  assert "no longer this run's lock" in caplog.text
  path.unlink()
  with rundir.workdir_lock(tmp_path) as path:
    path.unlink()  # deleted under us: released without an error


@settings(max_examples=60, deadline=None)
@given(
    content=st.one_of(
        st.binary(max_size=64),
        st.fixed_dictionaries({
            "pid": st.one_of(st.integers(), st.booleans(), st.text(max_size=5), st.none()),
            "host": st.one_of(st.sampled_from([HOST, "elsewhere"]), st.integers()),
        }, optional={"pid_start": st.one_of(st.integers(), st.none()), "argv": st.one_of(st.text(), st.lists(st.integers()))}
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_any_old_lock_content_is_taken_over_or_refused(content):
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / rundir.LOCK_FILE
    path.write_bytes(content)
    os.utime(path, (time.time() - 2 * rundir.CORRUPT_GRACE_S,) * 2)
    try:
      with rundir.workdir_lock(d):
        assert _holder(pathlib.Path(d))["pid"] == os.getpid()
      assert not path.exists()
    except ConfigError as e:
      assert "in use by pid" in str(e) and path.read_bytes() == content


def test_a_takeover_that_lost_the_race_puts_the_winners_lock_back(tmp_path, monkeypatch):
  # B judged the stale lock; before B moves it aside, A takes it over: B must not remove A's lock.
  stale = _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  real_take_over, took = rundir._take_over, []

  def a_wins_first(path, fd):
    stale.unlink()
    _write_lock(tmp_path, pid=os.getpid(), host="winner")
    took.append(path)
    real_take_over(path, fd)
    raise RuntimeError("stop after B's takeover")

  monkeypatch.setattr(rundir, "_take_over", a_wins_first)
  with pytest.raises(RuntimeError, match="B's takeover"):
    with rundir.workdir_lock(tmp_path):
      pass
  assert took and _holder(tmp_path)["host"] == "winner"
  assert [p.name for p in tmp_path.iterdir()] == [rundir.LOCK_FILE]  # nothing left aside


def _contend(workdir, barrier, results, release):
  """One of several processes that try to lock the same workdir at once."""
  barrier.wait()
  try:
    with rundir.workdir_lock(workdir):
      results.put("won")
      release.wait(60)
  except ConfigError as e:
    results.put(f"refused: {e}")


@pytest.mark.parametrize("before", ["free", "stale", "corrupt"])
def test_of_processes_racing_for_the_lock_exactly_one_wins(tmp_path, before):
  if before == "stale":
    _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  elif before == "corrupt":
    (tmp_path / rundir.LOCK_FILE).write_bytes(b"{")
    os.utime(tmp_path / rundir.LOCK_FILE, (time.time() - 2 * rundir.CORRUPT_GRACE_S,) * 2)
  ctx, n = multiprocessing.get_context("spawn"), 6
  barrier, results, release = ctx.Barrier(n), ctx.Queue(), ctx.Event()
  procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, results, release)) for _ in range(n)]
  for p in procs:
    p.start()
  try:
    outcomes = [results.get(timeout=120) for _ in range(n)]
  finally:
    release.set()
    for p in procs:
      p.join(60)
  assert outcomes.count("won") == 1, outcomes
  assert all(o.startswith("refused: ") and "is in use by pid" in o for o in outcomes if o != "won"), outcomes
  assert [p.exitcode for p in procs] == [0] * n
  assert sorted(p.name for p in tmp_path.iterdir()) == []



def test_a_takeover_waits_while_another_process_is_acquiring(tmp_path):
  """Acquisitions of one workdir's lock take turns (an advisory lock on the directory): a process that
  finds a stale lock neither moves it nor creates its own while another process is mid-acquisition,
  and wins once that one is done. Interleaved takeovers once let two runs both hold a workdir."""
  import fcntl
  import queue

  _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  stale = (tmp_path / rundir.LOCK_FILE).read_bytes()
  ctx = multiprocessing.get_context("spawn")
  barrier, results, release = ctx.Barrier(1), ctx.Queue(), ctx.Event()
  fd = os.open(tmp_path, os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX)  # as if another process were taking the lock over right now
  proc = ctx.Process(target=_contend, args=(str(tmp_path), barrier, results, release))
  proc.start()
  try:
    with pytest.raises(queue.Empty):
      results.get(timeout=5)  # long enough for the child to import, start and reach the lock
    assert (tmp_path / rundir.LOCK_FILE).read_bytes() == stale  # untouched while it waits
    os.close(fd)  # the other acquisition is done
    fd = None
    assert results.get(timeout=60) == "won"
  finally:
    if fd is not None:
      os.close(fd)
    release.set()
    proc.join(60)
  assert proc.exitcode == 0
