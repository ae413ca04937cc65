"""Work that one process does for all: writing shared files, building shared data.

In a multi-process run the others wait for it, and learn whether it worked, so a failure on
process 0 stops every process with a message instead of leaving them blocked at the next collective.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from sft.errors import ConfigError, disk_error

T = TypeVar("T")


def on_process_0(fn: Callable[[], T], what: str) -> T | None:
  """Runs `fn` on process 0 (its result there, None elsewhere); every process returns once it is
  done and raises if it failed. A single process just runs it."""
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except BaseException as err:  # noqa: BLE001  (re-raised below, after the others were told; Ctrl-C too)
      error = err
  # A full disk on process 0 is the user's to fix, as a config error is: one line on every process.
  code = 0 if error is None else 1 if isinstance(error, ConfigError) or disk_error(error) else 2
  code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
  if error is not None:
    raise error
  if code:
    raise (ConfigError if code == 1 else RuntimeError)(f"process 0 failed while {what}; its log says why")
  return result
