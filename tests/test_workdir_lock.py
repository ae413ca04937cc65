"""The workdir lock: one run per workdir. A lock another process holds is refused whatever its record says
(pids mean nothing across PID namespaces); a free lock of this host is taken over; a free lock recorded by
another host only when asked; exactly one winner when processes race for it."""

import contextlib
import errno
import fcntl
import functools
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
from sft.trainer import lock

HOST = socket.gethostname()
ROOT = pathlib.Path(lock.__file__).resolve().parents[2]  # the checkout under test, for child processes
TAKEOVER = "--takeover_lock"

# A run holding a workdir's lock until its stdin closes.
_HOLD = """
import sys
from sft.trainer import lock
with lock.workdir_lock(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()
"""


def _write_lock(workdir: pathlib.Path, age_s: float = 0.0, **holder) -> pathlib.Path:
  path = workdir / lock.LOCK_FILE
  path.write_text(json.dumps({"started": "2024-01-01T00:00:00+00:00", "argv": ["train.py"], **holder}))
  if age_s:
    os.utime(path, (time.time() - age_s,) * 2)
  return path


def _holder(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / lock.LOCK_FILE).read_text())


def _exited_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@contextlib.contextmanager
def _held(workdir: pathlib.Path, prefix: tuple[str, ...] = ()):
  """A run in another process (started through `prefix`, e.g. unshare) holding the workdir's lock."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  proc = subprocess.Popen([*prefix, sys.executable, "-c", _HOLD, str(workdir)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert proc.stdout.readline() == "held\n"
    yield proc
  finally:
    proc.stdin.close()
    proc.wait(60)
    proc.stdout.close()


@functools.cache
def _new_pid_namespaces() -> bool:
  try:
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0
  except OSError:
    return False


def test_the_lock_records_its_holder_and_is_removed_after(tmp_path):
  with lock.workdir_lock(tmp_path) as path:
    holder = _holder(tmp_path)
    assert path == tmp_path / "run.lock"
    assert (holder["pid"], holder["host"], holder["argv"]) == (os.getpid(), HOST, sys.argv)
    assert holder["started"]
  assert not path.exists()


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with lock.workdir_lock(tmp_path) as path:
    record = path.read_bytes()
    for takeover in (False, True):  # taking over is for a lock nobody holds, never for a held one
      with pytest.raises(ConfigError) as e:
        with lock.workdir_lock(tmp_path, takeover=takeover):
          pytest.fail("a second run entered a locked workdir")
      assert f"{tmp_path} is in use by pid {os.getpid()} on host {HOST}" in str(e.value)
      assert f"fuser -v {path}" in str(e.value)
    assert path.read_bytes() == record  # the refused run leaves the holder's lock alone
  assert not path.exists()


# What a holder's record may say while it holds the lock: a run in another PID namespace records its pid
# there, which from here is a pid that has exited, or pid 1 (another process, started at another time).
@pytest.mark.parametrize(
    ("record", "takeover"),
    [
        ("dead_pid", False),
        ("pid_1", False),
        ("unreadable", False),
        ("other_host", False),
        ("dead_pid", True),
    ],
)
def test_a_held_lock_is_refused_whatever_its_record_says(tmp_path, record, takeover):
  with _held(tmp_path) as proc:
    path = tmp_path / lock.LOCK_FILE
    if record == "unreadable":
      path.write_bytes(b'{"pid": ')
      os.utime(path, (time.time() - 3600,) * 2)
    else:
      pid = {"dead_pid": _exited_pid(), "pid_1": 1, "other_host": proc.pid}[record]
      _write_lock(tmp_path, age_s=3600, pid=pid, host="elsewhere" if record == "other_host" else HOST, pid_start=1)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
      with lock.workdir_lock(tmp_path, **({"takeover": True} if takeover else {})):
        pytest.fail("a second run entered a workdir whose lock another process holds")
    message = str(e.value)
    assert f"{tmp_path} is in use by " in message
    named = "record is unreadable" if record == "unreadable" else "since 2024-01-01T00:00:00+00:00 (train.py)"
    assert named in message
    assert path.read_bytes() == before and proc.poll() is None


def test_a_holder_in_another_pid_namespace_keeps_its_lock(tmp_path):
  """A run in a container (its own PID namespace, the host's name) is pid 1 there: from here its record
  names this host's pid 1, started at another time. Without unshare here, the record is made to say so."""
  namespaced = _new_pid_namespaces()
  with _held(tmp_path, ("unshare", "--pid", "--fork", "--mount-proc") if namespaced else ()) as proc:
    if namespaced:
      assert _holder(tmp_path)["pid"] == 1
    else:
      _write_lock(tmp_path, pid=1, host=HOST, pid_start=1)
    with pytest.raises(ConfigError, match=f"is in use by pid 1 on host {HOST}"):
      with lock.workdir_lock(tmp_path):
        pytest.fail("a second run entered a workdir whose lock a run in another PID namespace holds")
    assert _holder(tmp_path)["pid"] == 1 and proc.poll() is None
  assert not (tmp_path / lock.LOCK_FILE).exists()  # the holder released it as it ended


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  with _held(tmp_path) as proc:
    holder = _holder(tmp_path)
    proc.kill()
    proc.wait(60)
  assert holder["pid"] == proc.pid and (tmp_path / lock.LOCK_FILE).exists()  # left behind
  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert f"taking over the lock of pid {proc.pid} on host {HOST}" in caplog.text and "ended" in caplog.text
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["dead_pid", "live_pid", b'{"pid": 12', b"[1, 2]", b'{"host": 3}'])
def test_a_free_lock_left_by_this_host_is_taken_over(tmp_path, caplog, content):
  """Whatever a free lock's record says (even a live pid, or a record a run was writing as it died, however
  recent): no process holds the lock, so no run uses the workdir."""
  path = tmp_path / lock.LOCK_FILE
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    _write_lock(tmp_path, pid=_exited_pid() if content == "dead_pid" else os.getppid(), host=HOST)
  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert "taking over the lock of " in caplog.text
  assert ("unreadable" if isinstance(content, bytes) else "since 2024-01-01T00:00:00+00:00 (train.py)") in caplog.text
  assert list(tmp_path.iterdir()) == []


def test_an_empty_free_lock_is_taken_without_a_warning(tmp_path, caplog):
  (tmp_path / lock.LOCK_FILE).write_bytes(b"")  # a run that created it and died before writing it
  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert caplog.text == ""


@pytest.mark.parametrize("age_s", [0, 10**6])
def test_a_lock_of_another_host_is_refused_until_taken_over(tmp_path, caplog, age_s):
  """A preempted run requeued on a host of another name finds its old host's lock: free here, but a file
  system shared between hosts may lock for each host alone, so only an explicit takeover takes it."""
  path = _write_lock(tmp_path, age_s=age_s, pid=_exited_pid(), host="other-host.example")
  before = path.read_bytes()
  with pytest.raises(ConfigError) as e:
    with lock.workdir_lock(tmp_path):
      pytest.fail("a run took over another host's lock without being asked")
  message = str(e.value)
  assert f"{tmp_path} is locked by pid " in message
  assert "on host other-host.example since 2024-01-01T00:00:00+00:00 (train.py)" in message
  assert TAKEOVER in message and "takeover_lock=True" in message and "\n" not in message
  assert path.read_bytes() == before

  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path, takeover=True):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert "taking over the lock of " in caplog.text and "other-host.example" in caplog.text and "as asked" in caplog.text
  assert not path.exists()


def test_the_lock_is_released_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError):
    with lock.workdir_lock(tmp_path):
      raise RuntimeError("training failed")
  assert not (tmp_path / lock.LOCK_FILE).exists()
  with lock.workdir_lock(tmp_path):  # and the next run gets it
    pass


def test_only_our_own_lock_is_removed(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path) as path:
      path.unlink()
      _write_lock(tmp_path, pid=4242, host="someone-else")
  assert _holder(tmp_path)["host"] == "someone-else"
  assert "no longer this run's lock" in caplog.text
  path.unlink()
  with lock.workdir_lock(tmp_path) as path:
    path.unlink()  # deleted under us: released without an error
  assert not path.exists()


@settings(max_examples=60, deadline=None)
@given(
    content=st.one_of(
        st.binary(max_size=64),
        st.fixed_dictionaries({
            "pid": st.one_of(st.integers(), st.booleans(), st.text(max_size=5), st.none()),
            "host": st.one_of(st.sampled_from([HOST, "elsewhere"]), st.integers()),
        }, optional={"started": st.one_of(st.text(), st.integers()),
                     "argv": st.one_of(st.text(), st.lists(st.integers()))}
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_any_free_lock_content_is_taken_over_or_refused_for_another_host(content):
  try:
    record = json.loads(content)
  except ValueError:
    record = None
  foreign = isinstance(record, dict) and record.get("host") == "elsewhere"
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / lock.LOCK_FILE
    path.write_bytes(content)
    try:
      with lock.workdir_lock(d):
        assert _holder(pathlib.Path(d))["pid"] == os.getpid()
      assert not foreign and not path.exists()
    except ConfigError as e:
      assert foreign and TAKEOVER in str(e) and path.read_bytes() == content


def test_a_lock_file_unlinked_before_it_is_locked_is_opened_again(tmp_path, monkeypatch):
  """A run that opened the file just as its holder released it (unlink, then unlock) must not lock that
  unlinked file: no later run would see the lock."""
  real_flock, calls = lock._flock, []

  def holder_releases_first(fd, path):
    if not calls:
      (tmp_path / lock.LOCK_FILE).unlink()
    calls.append(fd)
    return real_flock(fd, path)

  _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  monkeypatch.setattr(lock, "_flock", holder_releases_first)
  with lock.workdir_lock(tmp_path) as path:
    assert len(calls) == 2
    assert _holder(tmp_path)["pid"] == os.getpid()  # the record is in the file the path names
    monkeypatch.setattr(lock, "_flock", real_flock)
    with pytest.raises(ConfigError, match="is in use by"):
      with lock.workdir_lock(tmp_path):
        pytest.fail("a second run entered the workdir")
  assert not path.exists()


def test_a_lock_file_replaced_before_it_is_locked_is_refused(tmp_path, monkeypatch):
  """Between this run's open and its lock, the holder released and another run took a new file."""
  real_flock, winner = lock._flock, []

  def another_run_wins_first(fd, path):
    if not winner:
      path.unlink()
      winner.append(os.open(path, os.O_RDWR | os.O_CREAT))
      fcntl.flock(winner[0], fcntl.LOCK_EX)
      os.write(winner[0], json.dumps({"pid": 4242, "host": HOST}).encode())
    return real_flock(fd, path)

  _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  monkeypatch.setattr(lock, "_flock", another_run_wins_first)
  try:
    with pytest.raises(ConfigError, match=f"is in use by pid 4242 on host {HOST}"):
      with lock.workdir_lock(tmp_path):
        pytest.fail("two runs hold the workdir")
    assert _holder(tmp_path) == {"pid": 4242, "host": HOST}
  finally:
    os.close(winner[0])


def _contend(workdir, barrier, results, release):
  """One of several processes that try to lock the same workdir at once."""
  barrier.wait()
  try:
    with lock.workdir_lock(workdir):
      results.put("won")
      release.wait(60)
  except ConfigError as e:
    results.put(f"refused: {e}")


@pytest.mark.parametrize("before", ["free", "stale", "corrupt"])
def test_of_processes_racing_for_the_lock_exactly_one_wins(tmp_path, before):
  if before == "stale":
    _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  elif before == "corrupt":
    (tmp_path / lock.LOCK_FILE).write_bytes(b"{")
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


@pytest.fixture
def no_flock(monkeypatch):
  """A file system that supports no flock."""
  def unsupported(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, "flock", unsupported)


def test_without_flock_the_record_alone_is_the_lock(tmp_path, caplog, no_flock):
  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path) as path:
      assert _holder(tmp_path)["pid"] == os.getpid()
      with pytest.raises(ConfigError) as e:
        with lock.workdir_lock(tmp_path):
          pytest.fail("a second run entered a locked workdir")
      assert f"is locked by pid {os.getpid()} on host {HOST}" in str(e.value) and "no flock" in str(e.value)
      assert TAKEOVER in str(e.value)
  assert "no flock" in caplog.text and TAKEOVER in caplog.text
  assert not path.exists()


def test_without_flock_a_leftover_lock_is_refused_until_taken_over(tmp_path, caplog, no_flock):
  path = _write_lock(tmp_path, pid=_exited_pid(), host=HOST)
  with pytest.raises(ConfigError, match=TAKEOVER):
    with lock.workdir_lock(tmp_path):
      pytest.fail("without flock, a leftover lock was taken over without being asked")
  assert _holder(tmp_path)["host"] == HOST and _holder(tmp_path)["pid"] != os.getpid()
  with caplog.at_level(logging.WARNING, logger="sft"):
    with lock.workdir_lock(tmp_path, takeover=True):
      assert _holder(tmp_path)["pid"] == os.getpid()
  assert "as asked" in caplog.text and not path.exists()


def test_a_failing_flock_is_a_clear_error_not_a_lock(tmp_path, monkeypatch):
  def failing(fd, op):
    raise OSError(errno.EIO, os.strerror(errno.EIO))

  monkeypatch.setattr(fcntl, "flock", failing)
  with pytest.raises(ConfigError, match=f"cannot lock {tmp_path / lock.LOCK_FILE} .Input/output error"):
    with lock.workdir_lock(tmp_path):
      pytest.fail("a run went on without the lock")
  assert (tmp_path / lock.LOCK_FILE).read_bytes() == b""  # nothing recorded: a later run takes it quietly
