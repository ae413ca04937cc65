"""One run at a time per workdir: `workdir_lock(workdir)` holds `<workdir>/run.lock` for the whole run.

Only the process that writes the workdir (process 0) takes it.

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
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import time
from typing import Any, Iterator

from sft.errors import ConfigError
from sft.trainer.workdir import Workdir

log = logging.getLogger("sft")

LOCK_FILE = Workdir(".").lock.name  # run.lock
# Errors of flock(2) where the file system does not support it.
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
_REREAD_S = 1.0  # how long a refused run re-reads a holder's record it finds unreadable (being written)
_ATTEMPTS = 8


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
  path = Workdir(workdir).lock
  fd = _acquire(workdir, path, takeover)
  try:
    yield path
  finally:
    _release(path, fd)
