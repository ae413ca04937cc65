"""What a run keeps in its workdir besides checkpoints: a lock so that one run at a time trains there,
and the config it trained with, checked again when a later run resumes.

    with workdir_lock(workdir):
      if start_step:
        for line in resume_changes(load_saved_config(workdir), config.to_dict(), start_step):
          log.info("config changed at resume: %s", line)
      write_run_config(workdir, config.to_dict(), start_step)

Only the process that writes the workdir (process 0) calls these.

The lock is the kernel's: an exclusive flock(2) on `<workdir>/run.lock`, held on an open descriptor for
the whole run and released by the kernel when the process ends, however it ends and in whatever PID
namespace it runs (pids and /proc mean nothing across namespaces; the lock does). The file's JSON record
(pid, host, start, command) only names the holder in messages. A free lock whose record names this host
is a run that ended: taken over with a warning. A free lock whose record names another host is refused
unless the caller takes it over (`--takeover_lock`): over NFS, Linux (>= 2.6.12) emulates flock with
POSIX byte-range locks, which hosts share where the server supports locking, but some network and FUSE
file systems (NFS mounted with `nolock` or `local_lock=flock`, for one) lock for the local host only, so
a lock free here says nothing of a run on another host. Where the file system has no flock at all
(ENOLCK, EOPNOTSUPP), the record alone is the lock, with a warning: created exclusively and removed at
the end, and one a run left behind (it died) is refused until it is taken over explicitly.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
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
# Errors of flock(2) where the file system does not support it.
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
_REREAD_S = 1.0  # how long a refused run re-reads a holder's record it finds unreadable (being written)
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


def _holder_record() -> dict[str, Any]:
  return {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "argv": list(sys.argv),
  }


def _parse_holder(raw: bytes) -> dict[str, Any] | None:
  """The lock file's record, or None when it does not parse (a run that died writing it)."""
  try:
    holder = json.loads(raw)
  except ValueError:
    return None
  if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
    return None
  return holder


def _describe(holder: dict[str, Any]) -> str:
  argv = holder.get("argv")
  command = shlex.join(map(str, argv)) if isinstance(argv, list) else "command unknown"
  started = holder.get("started", "(time unknown)")
  return f"pid {holder.get('pid', '(unknown)')} on host {holder['host']} since {started} ({command})"


def _open(path: pathlib.Path) -> tuple[int, bool] | None:
  """A descriptor of the lock file and whether this call created it; None if it vanished meanwhile."""
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
  except FileExistsError:
    pass
  try:
    return os.open(path, os.O_RDWR), False
  except FileNotFoundError:
    return None
  except PermissionError as e:
    raise ConfigError(
        f"cannot open the workdir lock {path} ({e.strerror}); run as its owner, or use another workdir"
    ) from None


def _flock(fd: int, path: pathlib.Path) -> bool:
  """Takes the exclusive flock of `fd` (open on `path`) without waiting: True once taken, False where
  the file system has none. BlockingIOError when another open file of it holds the lock."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise
  except OSError as e:
    if e.errno in _NO_FLOCK:
      return False
    raise ConfigError(f"cannot lock {path} ({e.strerror}); check its file system, or use another workdir") from None
  return True


def _names(path: pathlib.Path, fd: int) -> bool:
  """Whether `path` still names the file open as `fd`. A run releasing its lock unlinks the file, so a
  flock taken on it after that locks a file no later run opens."""
  try:
    named, held = os.stat(path), os.fstat(fd)
  except FileNotFoundError:
    return False
  return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _record(fd: int) -> bytes:
  return os.pread(fd, 1 << 20, 0)


def _in_use(workdir: pathlib.Path, path: pathlib.Path, fd: int) -> ConfigError:
  """The refusal while another process holds the flock; it may be writing its record right now."""
  deadline = time.monotonic() + _REREAD_S
  while (holder := _parse_holder(_record(fd))) is None and time.monotonic() < deadline:
    time.sleep(0.02)
  who = _describe(holder) if holder else "a process whose record is unreadable"
  return ConfigError(
      f"{workdir} is in use by {who}; wait for it to finish, or stop it (`fuser -v {path}` lists the processes "
      "that have the lock open)"
  )


def _check_leftover(workdir: pathlib.Path, raw: bytes, *, flocked: bool, takeover: bool) -> None:
  """Returns if the record `raw` left in a lock that nobody holds may be taken over (warning which run
  it names); a ConfigError if it may belong to a run the lock cannot see."""
  holder = _parse_holder(raw)
  who = _describe(holder) if holder else "a run whose record is unreadable"
  if flocked and (holder is None or holder["host"] == socket.gethostname()):
    if raw.strip():  # empty: a file just created by a run that lost the race to lock it, or died first
      log.warning("%s: taking over the lock of %s: that run has ended (its lock is free)", workdir, who)
    return
  if takeover:
    log.warning("%s: taking over the lock of %s, as asked", workdir, who)
    return
  why = (
      ": a run of another host, which this host cannot check (a file system shared between hosts may not share locks)"
      if flocked else ", and its file system has no flock to tell whether that run still holds it"
  )
  raise ConfigError(
      f"{workdir} is locked by {who}{why}; wait for it to finish, or if that run is gone, run again with "
      "--takeover_lock (Python: sft.train_and_evaluate(config, workdir, takeover_lock=True))"
  )


def _acquire(workdir: pathlib.Path, path: pathlib.Path, takeover: bool) -> int:
  """The descriptor holding the workdir's lock, its record rewritten to name this process."""
  for _ in range(_ATTEMPTS):
    opened = _open(path)
    if opened is None:
      continue
    fd, created = opened
    try:
      try:
        flocked = _flock(fd, path)
      except BlockingIOError:
        raise _in_use(workdir, path, fd) from None
      if not _names(path, fd):  # unlinked by the run that held it before we locked it: open it again
        os.close(fd)
        continue
      if not flocked:
        log.warning("%s: its file system has no flock, so the workdir lock is only the record in %s: a run that "
                    "dies leaves it behind, to be taken over with --takeover_lock", workdir, path)
      if not created:
        _check_leftover(workdir, _record(fd), flocked=flocked, takeover=takeover)
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
      os.fsync(fd)
      return fd
    except BaseException:
      os.close(fd)
      raise
  raise ConfigError(f"could not lock {workdir}: {path} kept changing under other processes; try again")


def _release(path: pathlib.Path, fd: int) -> None:
  """Unlinks the lock file, then closes it (which frees the flock): a run that opened the file before
  the unlink finds it unlinked once it locks it, and opens the path again."""
  try:
    if _names(path, fd):
      path.unlink()
    else:
      log.warning("%s is no longer this run's lock (deleted or replaced); left as it is", path)
  finally:
    os.close(fd)


@contextlib.contextmanager
def workdir_lock(workdir: str | pathlib.Path, *, takeover: bool = False) -> Iterator[pathlib.Path]:
  """Holds `<workdir>/run.lock` while the block runs: one run per workdir. A lock that another process
  holds is a ConfigError naming it (whatever `takeover` says). A lock nobody holds whose record names
  this host (or nothing readable) is taken over with a warning; one whose record names another host is
  a ConfigError unless `takeover`. Yields the lock file's path."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  fd = _acquire(workdir, path, takeover)
  try:
    yield path
  finally:
    _release(path, fd)


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


def changed_keys(saved: Mapping[str, Any], new: Mapping[str, Any] | ml_collections.ConfigDict) -> Iterator[tuple[str, Any, Any]]:
  """(dotted path, saved value, new value) of each key both configs have whose value differs, compared as
  JSON gives them back; a key the saved config lacks (written before the key existed) has its default."""
  for path, old, value in _diff(_json_round_trip(saved), _json_round_trip(new)):
    old = _default_at(path) if old is _ABSENT else old
    if old is not _ABSENT and value is not _ABSENT and old != value:
      yield path, old, value


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
