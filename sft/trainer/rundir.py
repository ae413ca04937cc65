"""The config a run trained with, kept in its workdir and checked again when a later run resumes.

    with lock.workdir_lock(workdir):
      if start_step:
        for line in resume_changes(load_saved_config(workdir), config.to_dict(), start_step):
          log.info("config changed at resume: %s", line)
      write_run_config(workdir, config.to_dict(), start_step)

Only the process that writes the workdir (process 0) calls these. Which keys may change at resume is
declared with each key (`sft.config.AT_RESUME`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Iterator, Mapping

import ml_collections
from ml_collections import config_dict

from sft.errors import ConfigError
from sft.trainer.workdir import Workdir

log = logging.getLogger("sft")

CONFIG_FILE = Workdir(".").config.name  # config.json
_ABSENT = object()


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


def _safe_at_resume() -> tuple[str, ...]:
  from sft.config import AT_RESUME  # loads JAX (via the model config): only when a config is compared

  return AT_RESUME


def _is_safe(path: str) -> bool:
  return any(path == key or path.startswith(key + ".") for key in _safe_at_resume())


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
  config.json), all of them safe at resume (sft.config.AT_RESUME). Any other change is a ConfigError listing
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
        f"change at resume: {', '.join(_safe_at_resume())}"
    )
  return safe


def load_saved_config(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """The config the last run in `workdir` saved, or None if it saved none."""
  path = Workdir(workdir).config
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
  paths = Workdir(workdir)
  _write_atomic(paths.config_at(start_step), text)
  _write_atomic(paths.config, text)
  return paths.config
