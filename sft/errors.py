"""Errors the launcher reports without a traceback. Imports nothing of the project, so every layer can raise them."""

from __future__ import annotations

import errno
import os
import re

# What a full disk, a read-only filesystem or a missing permission raise: the run can do nothing about them.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# tensorstore (orbax's array writer) reports an OS error as ValueError text: "... [os_error_code='28']".
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


class ConfigError(ValueError):
  """A config value that cannot work, with the reason and the key to change."""


class TrainingDiverged(ConfigError):
  """Training reached a non-finite loss, gradient norm or parameters. No checkpoint of such a state is
  saved; the message names the step, the latest checkpoint, and what to change."""


class CannotWrite(ConfigError):
  """A file of the run could not be written: no space left, a read-only filesystem, no permission.
  What was written before (earlier checkpoints included) is left as it was."""


class RunStopped(Exception):
  """Training stopped on a signal after saving a checkpoint; running the same command resumes it."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # what a shell reports for a process ended by that signal


def disk_error(err: BaseException | None) -> tuple[int, str | None] | None:
  """(errno, path or None) of the full disk, read-only filesystem or permission error behind `err`
  (its causes included), None when it is none of them."""
  while err is not None and not isinstance(err, ConfigError):
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
      return err.errno, None if err.filename is None else os.fsdecode(err.filename)
    code = _OS_CODE.search(str(err)) if isinstance(err, ValueError) else None
    if code and int(code.group(1)) in DISK_ERRNOS:
      paths = _QUOTED_PATH.findall(str(err))
      return int(code.group(1)), paths[-1] if paths else None
    err = err.__cause__ or err.__context__
  return None


def cannot_write(
    err: BaseException, what: str, path: str | os.PathLike | None = None, note: str = ""
) -> CannotWrite | None:
  """A one-line CannotWrite for `err` when `disk_error` finds one: `what` could not be written, the failing
  path (else `path`), the cause by name, `note`, and what to do. None otherwise."""
  found = disk_error(err)
  if found is None:
    return None
  code, failed = found
  where = failed or (os.fspath(path) if path is not None else "the workdir")
  full = code in (errno.ENOSPC, errno.EDQUOT)
  remedy = "free some space" if full else "make it writable (or choose another --workdir)"
  cause = f"{os.strerror(code)} ({errno.errorcode[code]})" + (f"; {note}" if note else "")
  return CannotWrite(f"cannot write {what}: {where}: {cause}; {remedy}, then run the same command again")
