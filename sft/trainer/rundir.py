"""What a run keeps in its workdir besides checkpoints: a lock so that one run at a time trains there,
and the config it trained with, checked again when a later run resumes.

    with workdir_lock(workdir):
      if start_step:
        for line in resume_changes(load_saved_config(workdir), config.to_dict(), start_step):
          log.info("config changed at resume: %s", line)
      write_run_config(workdir, config.to_dict(), start_step)

Only the process that writes the workdir (process 0) calls these.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import tempfile
import time
from typing import Any, Iterator, Mapping

import ml_collections
from ml_collections import config_dict

from sft.errors import ConfigError

log = logging.getLogger("sft")

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
# A lock file that does not parse is a run that died between creating and writing it, once it is this
# old; younger, it may be a run that is writing it right now.
CORRUPT_GRACE_S = 10.0
_REREAD_S = 0.5  # how long a young unreadable lock is re-read before refusing
_ATTEMPTS = 8

# Keys a resumed run may change: they steer evaluation, sampling, checkpointing, logging, the device
# layout (a checkpoint restores onto any mesh) and recomputation, not the weights being trained.
# The step counts are allowed too: the learning-rate schedule is recomputed from the new counts, and
# the restored optimizer goes on from its step in that schedule.
SAFE_AT_RESUME = (
    "train.sft_steps",
    "train.pretrain_steps",
    "train.log_every",
    "eval",
    "sample",
    "checkpoint",
    "mesh",
    "sharding_rules",
    # How the same maths is computed: what is kept for the backward pass, which attention kernel.
    "model.remat",
    "model.remat_policy",
    "model.scan_layers",
    "model.attention",
    # How the same global batch is cut for memory or devices: only float rounding of the same sums
    # changes (a checkpoint is the same in both parallelisms: the pmap mode saves one copy of its state).
    "train.grad_accum_steps",
    "train.loss_chunk_size",
    "train.parallelism",
)
_ABSENT = object()


# --- one run per workdir -------------------------------------------------------------------------


def _process_start(pid: int) -> int | None:
  """The start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the name before ")" may hold spaces
  except (OSError, ValueError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _holder_record() -> dict[str, Any]:
  pid = os.getpid()
  return {
      "pid": pid,
      "host": socket.gethostname(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "argv": list(sys.argv),
      "pid_start": _process_start(pid),
  }


def _parse_holder(raw: bytes) -> dict[str, Any] | None:
  """The lock file's record, or None when it does not parse (a crash mid-write)."""
  try:
    holder = json.loads(raw)
  except ValueError:
    return None
  if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
    return None
  pid = holder.get("pid")
  # os.kill(0 or -n, 0) would ask about process groups, not a process.
  if type(pid) is not int or not 0 < pid < 2**31:
    return None
  return holder


def _describe(holder: dict[str, Any]) -> str:
  argv = holder.get("argv")
  command = shlex.join(map(str, argv)) if isinstance(argv, list) else "command unknown"
  return f"pid {holder['pid']} on host {holder['host']} since {holder.get('started', '(time unknown)')} ({command})"


def _stale_reason(holder: dict[str, Any]) -> str | None:
  """Why a well-formed lock of this host is stale, or None if its process still runs."""
  pid = holder["pid"]
  if not _pid_alive(pid):
    return "that process has exited"
  recorded, now = holder.get("pid_start"), _process_start(pid)
  if isinstance(recorded, int) and now is not None and recorded != now:
    return "that pid now belongs to another process"
  return None


def _refusal(workdir: pathlib.Path, path: pathlib.Path, holder: dict[str, Any]) -> ConfigError:
  other_host = holder["host"] != socket.gethostname()
  note = (
      "; a lock from another host is never taken over automatically, as its processes cannot be checked from here"
      if other_host else ""
  )
  return ConfigError(
      f"{workdir} is in use by {_describe(holder)}; wait for it to finish, or delete {path} if that run is gone{note}"
  )


def _create(path: pathlib.Path, content: bytes) -> bool:
  """Creates the lock file holding `content`; False if it exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, content)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    path.unlink(missing_ok=True)
    raise
  os.close(fd)
  return True


def _put_back(aside: pathlib.Path, path: pathlib.Path) -> None:
  """Restores a live lock that a takeover moved aside by mistake, unless a new one took its name."""
  try:
    os.link(aside, path)
  except FileExistsError:
    pass
  except OSError:  # no hard links on this filesystem
    os.replace(aside, path)
    return
  aside.unlink(missing_ok=True)


def _take_over(path: pathlib.Path, fd: int) -> None:
  """Moves the stale lock file open as `fd` out of the way. A rename succeeds for one racer only; one
  that renamed a lock created since it read the stale one (another inode) puts it back."""
  aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # another process took it over first
  judged, moved = os.fstat(fd), os.stat(aside)
  if (judged.st_dev, judged.st_ino) != (moved.st_dev, moved.st_ino):
    _put_back(aside, path)
  else:
    aside.unlink(missing_ok=True)


def _try_acquire(workdir: pathlib.Path, path: pathlib.Path, content: bytes) -> bool:
  """One attempt: True if the lock is ours; False to try again; ConfigError if a live run holds it."""
  if _create(path, content):
    return True
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False  # released meanwhile
  try:  # the fd stays open until the takeover, so its inode cannot be reused meanwhile
    raw, age = os.read(fd, 1 << 20), time.time() - os.fstat(fd).st_mtime
    holder = _parse_holder(raw)
    if holder is None:
      if age < CORRUPT_GRACE_S:
        return _wait_for_writer(workdir, path, raw, age)
      log.warning("%s: taking over %s, unreadable and last written %.0f s ago (a run that crashed starting)", workdir, path, age)
    else:
      if holder["host"] != socket.gethostname():
        raise _refusal(workdir, path, holder)
      reason = _stale_reason(holder)
      if reason is None:
        raise _refusal(workdir, path, holder)
      log.warning("%s: taking over the lock of %s: %s", workdir, _describe(holder), reason)
    _take_over(path, fd)
  finally:
    os.close(fd)
  return False


def _wait_for_writer(workdir: pathlib.Path, path: pathlib.Path, raw: bytes, age: float) -> bool:
  """A young unreadable lock is most likely a run writing it right now: re-read it briefly."""
  deadline = time.monotonic() + _REREAD_S
  while time.monotonic() < deadline:
    time.sleep(0.02)
    try:
      if path.read_bytes() != raw:
        return False  # written (or replaced): judge it again
    except FileNotFoundError:
      return False
  raise ConfigError(
      f"{workdir} may be in use: its lock {path} is unreadable and was written {age:.0f} s ago, so another run may "
      f"be starting; try again, or delete {path} if no run uses {workdir} (after {CORRUPT_GRACE_S:.0f} s it is "
      "taken over)"
  )


@contextlib.contextmanager
def _one_acquirer_at_a_time(workdir: pathlib.Path) -> Iterator[None]:
  """Serialises acquisitions of a workdir's lock between processes with an advisory lock on the
  directory itself, held for the acquisition only. Without it, two processes taking over the same
  stale lock could interleave: the slower one moved the winner's fresh lock aside, and a third
  process created its own in the gap, so two runs believed they held the workdir. Where the file
  system has no flock, the rename-and-check takeover alone remains."""
  try:
    fd = os.open(workdir, os.O_RDONLY)
  except OSError:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def workdir_lock(workdir: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """Holds `<workdir>/run.lock` while the block runs: one run per workdir. A lock left by a process of
  this host that is gone (or whose pid was reused) is taken over with a warning; a live holder, or
  any holder on another host, is a ConfigError naming it. Yields the lock file's path."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  content = (json.dumps(_holder_record()) + "\n").encode()
  with _one_acquirer_at_a_time(workdir):
    for _ in range(_ATTEMPTS):
      if _try_acquire(workdir, path, content):
        break
    else:
      raise ConfigError(f"could not lock {workdir}: {path} kept changing under other processes; try again")
  try:
    yield path
  finally:
    _release(path, content)


def _release(path: pathlib.Path, content: bytes) -> None:
  try:
    if path.read_bytes() == content:
      path.unlink()
      return
  except FileNotFoundError:
    pass
  log.warning("%s is no longer this run's lock (deleted or taken over); left as it is", path)


# --- the config a run trained with ---------------------------------------------------------------


def _json_round_trip(value: Any) -> Any:
  """As config.json gives it back: tuples become lists, ConfigDicts plain dicts."""
  return json.loads(json.dumps(value, cls=config_dict.CustomJSONEncoder))


def _diff(old: Any, new: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
  """(dotted path, old, new) of every difference; a side without the key gives _ABSENT."""
  if isinstance(old, dict) and isinstance(new, dict):
    for key in [*old, *(k for k in new if k not in old)]:
      yield from _diff(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key))
  elif old != new:
    yield prefix, old, new


def _is_safe(path: str) -> bool:
  return any(path == key or path.startswith(key + ".") for key in SAFE_AT_RESUME)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
  from sft.config import base_config  # loads JAX (via the model config): only when a saved key is absent

  return _json_round_trip(base_config())


def _default_at(path: str) -> Any:
  value: Any = _defaults()
  for key in path.split("."):
    if not isinstance(value, dict) or key not in value:
      return _ABSENT
    value = value[key]
  return value


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def resume_changes(saved: Mapping[str, Any] | None, new: Mapping[str, Any], start_step: int) -> list[str]:
  """Lines "path: old -> new" for the keys that changed since the run that saved `saved` (its
  config.json), all of them safe at resume (SAFE_AT_RESUME). Any other change is a ConfigError listing
  every one: the checkpoint was trained for the old values. A key the saved config lacks (written
  before the key existed) is no change if the new value is its default. Compared as JSON gives them
  back, so a tuple and the list it was saved as are equal."""
  if saved is None:
    log.warning("resuming at step %d without the previous run's %s: config changes cannot be checked", start_step, CONFIG_FILE)
    return []
  safe, refused = [], []
  for path, old, value in _diff(_json_round_trip(saved), _json_round_trip(new)):
    if old is _ABSENT and value == _default_at(path):
      continue
    (safe if _is_safe(path) else refused).append(f"{path}: {_show(old)} -> {_show(value)}")
  if refused:
    lines = "\n".join(f"  {line}" for line in refused)
    raise ConfigError(
        f"resuming at step {start_step} with a config that changes keys the checkpoint was trained with:\n{lines}\n"
        "Train with this config in a new workdir, or set these keys back to their old values. Keys that may "
        f"change at resume: {', '.join(SAFE_AT_RESUME)}"
    )
  return safe


def load_saved_config(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """The config the last run in `workdir` saved, or None if it saved none."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    config = json.loads(text)
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); restore it, or use a new workdir") from None
  if not isinstance(config, dict):
    raise ConfigError(f"{path} holds a {type(config).__name__}, not a config object; restore it, or use a new workdir")
  return config


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Readers see the old file or the new one, never a partial one."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_run_config(workdir: str | pathlib.Path, config: Mapping[str, Any] | ml_collections.ConfigDict, start_step: int) -> pathlib.Path:
  """Writes the run's config to `<workdir>/config-<start_step>.json` (one per start, kept) and
  `<workdir>/config.json` (the latest: how serving rebuilds the model); returns config.json's path.
  The text is the config's to_json(indent=2): keys in the order given (a ConfigDict's own order; a
  to_dict() is sorted)."""
  workdir = pathlib.Path(workdir)
  text = json.dumps(config, indent=2, cls=config_dict.CustomJSONEncoder) + "\n"
  _write_atomic(workdir / f"config-{start_step}.json", text)
  _write_atomic(workdir / CONFIG_FILE, text)
  return workdir / CONFIG_FILE
