"""The workdir lock (one run per workdir, stale locks taken over) and the config check at resume."""

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

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.errors import ConfigError
from sft.trainer import rundir

# The keys the trainer lets a resumed run change, as the spec states them (not read from the module).
SAFE = ("train.sft_steps", "train.pretrain_steps", "train.log_every", "eval", "sample", "checkpoint", "mesh",
        "sharding_rules", "model.remat", "model.remat_policy", "model.scan_layers", "model.attention", "train.grad_accum_steps", "train.loss_chunk_size", "train.parallelism")
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


# --- the lock ------------------------------------------------------------------------------------


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


# --- the config at resume ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _base_json() -> str:
  from sft.config import base_config

  return base_config().to_json()


def _base() -> dict:
  """base_config() as config.json holds it; a fresh copy each call."""
  return json.loads(_base_json())


def _leaves(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}.{key}" if prefix else key
    if isinstance(value, dict) and value:
      yield from _leaves(value, path)
    else:
      yield path, value


def _set(tree: dict, path: str, value) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree[key]
  tree[last] = value


def _delete(tree: dict, path: str) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree[key]
  del tree[last]


def _is_safe(path: str) -> bool:
  return any(path == key or path.startswith(key + ".") for key in SAFE)


def _changed(old):
  """A strategy for a JSON value that differs from `old`."""
  if isinstance(old, bool):
    return st.just(not old)
  if isinstance(old, int):
    return st.integers(1, 10**6).map(lambda d: old + d)
  if isinstance(old, float):
    return st.floats(0.5, 1e3).map(lambda d: old + d)
  if isinstance(old, str):
    return st.text(min_size=1, max_size=8).map(lambda s: old + s)
  if isinstance(old, list):
    return st.lists(st.text(max_size=4), min_size=1, max_size=3).map(lambda extra: old + extra)
  if isinstance(old, dict):
    return st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
  return st.integers()


def test_the_base_config_has_safe_and_unsafe_keys():
  paths = [p for p, _ in _leaves(_base())]
  assert any(map(_is_safe, paths)) and not all(map(_is_safe, paths))
  assert all(any(p == k or p.startswith(k + ".") for p in paths) for k in SAFE)  # no key of SAFE is misspelt


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_changes_at_resume_are_listed_or_refused(data):
  saved, new = _base(), _base()
  leaves = dict(_leaves(saved))
  paths = data.draw(st.lists(st.sampled_from(sorted(leaves)), min_size=0, max_size=4, unique=True))
  lines = {}
  for path in paths:
    old, value = leaves[path], data.draw(_changed(leaves[path]))
    _set(new, path, value)
    if old == {}:  # a mapping that was empty: each key is a change of its own
      lines.update({f"{path}.{k}": f"{path}.{k}: (absent) -> {json.dumps(v)}" for k, v in value.items()})
    else:
      lines[path] = f"{path}: {json.dumps(old)} -> {json.dumps(value)}"
  refused = [p for p in lines if not _is_safe(p)]
  if refused:
    with pytest.raises(ConfigError) as e:
      rundir.resume_changes(saved, new, start_step=30)
    message = str(e.value)
    assert "new workdir" in message and "step 30" in message
    assert all(f"  {lines[p]}\n" in message for p in refused), message
    assert not any(f"  {lines[p]}\n" in message for p in lines if _is_safe(p)), message
  else:
    assert sorted(rundir.resume_changes(saved, new, start_step=30)) == sorted(lines.values())


def test_a_saved_config_read_back_from_json_is_no_change(tmp_path):
  from sft.config import finetune_config

  config = finetune_config("lora")  # tuples (lora_targets, sharding_rules) come back from JSON as lists
  rundir.write_run_config(tmp_path, config, 0)
  assert rundir.resume_changes(rundir.load_saved_config(tmp_path), config.to_dict(), 10) == []
  config.train.sft_steps = 3000
  assert rundir.resume_changes(rundir.load_saved_config(tmp_path), config.to_dict(), 10) == ["train.sft_steps: 1000 -> 3000"]


def test_a_key_the_saved_config_lacks_is_no_change_at_its_default():
  saved, new = _base(), _base()
  _delete(saved, "eval.answer_normalization")
  _delete(saved, "model.qk_norm")
  assert rundir.resume_changes(saved, new, 5) == []
  _set(new, "eval.answer_normalization", "whitespace")
  assert rundir.resume_changes(saved, new, 5) == ['eval.answer_normalization: (absent) -> "whitespace"']
  _set(new, "model.qk_norm", True)
  with pytest.raises(ConfigError, match=r"model\.qk_norm: \(absent\) -> true"):
    rundir.resume_changes(saved, new, 5)


def test_a_key_the_new_config_lacks_is_a_change():
  saved, new = _base(), _base()
  _set(saved, "model.retired_key", 3)
  _set(saved, "eval.retired_key", 4)
  with pytest.raises(ConfigError) as e:
    rundir.resume_changes(saved, new, 5)
  assert "model.retired_key: 3 -> (absent)" in str(e.value)
  assert "eval.retired_key" not in str(e.value).split("Keys that may change")[0]


def test_resuming_without_a_saved_config_checks_nothing(caplog):
  with caplog.at_level(logging.WARNING, logger="sft"):
    assert rundir.resume_changes(None, _base(), 5) == []
  assert "cannot be checked" in caplog.text


def test_load_saved_config(tmp_path):
  assert rundir.load_saved_config(tmp_path) is None
  path = tmp_path / "config.json"
  path.write_text('{"seed": 1}')
  assert rundir.load_saved_config(tmp_path) == {"seed": 1}
  for text in ('{"seed": ', "[1, 2]"):
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
      rundir.load_saved_config(tmp_path)


# --- writing the config --------------------------------------------------------------------------


def test_the_written_config_is_the_configs_json_and_serve_can_read_it(tmp_path):
  from sft.config import base_config

  config = base_config()
  rundir.write_run_config(tmp_path, config, 0)
  assert (tmp_path / "config.json").read_text() == config.to_json(indent=2) + "\n"
  rundir.write_run_config(tmp_path, config.to_dict(), 0)
  assert (tmp_path / "config.json").read_text() == ml_collections.ConfigDict(config.to_dict()).to_json(indent=2) + "\n"
  assert (tmp_path / "config-0.json").read_text() == (tmp_path / "config.json").read_text()
  read_back = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))  # as serve.py does
  assert read_back.model.d_model == config.model.d_model and read_back.train.lr == config.train.lr


def test_each_start_keeps_its_config_and_config_json_is_the_latest(tmp_path):
  rundir.write_run_config(tmp_path, {"train": {"sft_steps": 100}}, 0)
  rundir.write_run_config(tmp_path, {"train": {"sft_steps": 300}}, 100)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config-0.json", "config-100.json", "config.json"]
  assert json.loads((tmp_path / "config-0.json").read_text()) == {"train": {"sft_steps": 100}}
  assert json.loads((tmp_path / "config.json").read_text()) == {"train": {"sft_steps": 300}}


def test_a_failed_write_leaves_the_old_config_and_no_temporary_file(tmp_path, monkeypatch):
  rundir.write_run_config(tmp_path, {"seed": 1}, 0)
  before = sorted(p.name for p in tmp_path.iterdir())

  def broken_fsync(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", broken_fsync)
  with pytest.raises(OSError, match="disk full"):
    rundir.write_run_config(tmp_path, {"seed": 2}, 0)
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1}
