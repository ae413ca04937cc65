"""How a config key is declared: a field of a frozen dataclass section, its default and its check side by side.

    @dataclasses.dataclass(frozen=True)
    class Train:
      seq_len: int = key(256, AT_LEAST_1)  # tokens per packed row

A section is the one place its keys are declared: `to_config_dict` makes the ConfigDict a config file
edits (locked, so `c.train.seq_len_ = 5` fails on its own line), `constraints` gives `check_config`
each key's check, `at_resume` the keys a resumed run may change. No key is listed twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Callable

import ml_collections

from sft.errors import ConfigError

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None


def key(default: Any, check: Check | None = None, *, at_resume: bool = False, open_keys: bool = False) -> Any:
  """A config key: its `default`, the `check` its value must pass (beside the type the default gives),
  whether a resumed run may change it (`at_resume`: it steers how, not what, is trained) and, for a dict
  default, `open_keys`: its keys are the user's data (raw field -> field), not config keys."""
  metadata = {"check": check, "at_resume": at_resume, "open_keys": open_keys}
  if isinstance(default, (dict, list)):  # a fresh copy per config
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, *, at_resume: bool = False) -> Any:
  """A nested section (a dataclass of keys); `at_resume`: every key in it may change at resume."""
  return dataclasses.field(default_factory=cls, metadata={"check": None, "at_resume": at_resume, "open_keys": False})


def _fields(cls: type):
  for field in dataclasses.fields(cls):
    yield field, field.metadata or {"check": None, "at_resume": False, "open_keys": False}


def _is_section(field: dataclasses.Field) -> bool:
  return field.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(field.default_factory)


def locked(config: ml_collections.ConfigDict, cls: type) -> ml_collections.ConfigDict:
  """`config` locked (no key can be added), but for its open sections: their keys are the user's."""
  config.lock()
  for path in open_sections(cls):
    section = config
    for part in path.split("."):
      section = section[part]
    section.unlock()
  return config


def to_config_dict(cls: type) -> ml_collections.ConfigDict:
  """The section's defaults as a ConfigDict (nested sections as nested ConfigDicts, tuples kept)."""
  c = ml_collections.ConfigDict()
  for field, _ in _fields(cls):
    if _is_section(field):
      c[field.name] = to_config_dict(field.default_factory)
    elif field.default_factory is not dataclasses.MISSING:
      value = field.default_factory()
      c[field.name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    else:
      c[field.name] = field.default
  return c


def constraints(cls: type, prefix: str = "") -> dict[str, Check]:
  """Dotted key -> check, for every key declared with one."""
  found = {}
  for field, meta in _fields(cls):
    if _is_section(field):
      found.update(constraints(field.default_factory, f"{prefix}{field.name}."))
    elif meta["check"] is not None:
      found[prefix + field.name] = meta["check"]
  return found


def open_sections(cls: type, prefix: str = "") -> tuple[str, ...]:
  """Dotted keys of the dicts whose keys are data (checked as a whole by their check)."""
  found = []
  for field, meta in _fields(cls):
    if _is_section(field):
      found += open_sections(field.default_factory, f"{prefix}{field.name}.")
    elif meta["open_keys"]:
      found.append(prefix + field.name)
  return tuple(found)


def at_resume(cls: type, prefix: str = "") -> tuple[str, ...]:
  """Dotted keys (or whole sections) a resumed run may change."""
  found = []
  for field, meta in _fields(cls):
    if meta["at_resume"]:
      found.append(prefix + field.name)
    elif _is_section(field):
      found += at_resume(field.default_factory, f"{prefix}{field.name}.")
  return tuple(found)


# --- checking a config against its defaults ----------------------------------------------------


def _is_dict(value) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _defaults(base: ml_collections.ConfigDict, open_sections, prefix: str = "") -> dict[str, Any]:
  """Dotted path -> default of every leaf (placeholders stay FieldReferences; open sections are leaves)."""
  leaves = {}
  for key, value in base.items(preserve_field_references=True):
    path = prefix + key
    if _is_dict(value) and path not in open_sections:
      leaves.update(_defaults(value, open_sections, path + "."))
    else:
      leaves[path] = value
  return leaves


def _values(config, sections: set[str], prefix: str = "") -> dict[str, Any]:
  """Dotted path -> value, descending only into the sections the defaults have (an unknown section is one key)."""
  leaves = {}
  for key, value in config.items():
    path = prefix + str(key)
    if _is_dict(value) and path in sections:
      leaves.update(_values(value, sections, path + "."))
    else:
      leaves[path] = value
  return leaves


def _sections(paths) -> set[str]:
  return {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}


def _type_name(kind: type) -> str:
  names = {float: "a number", int: "an integer", bool: "True or False", str: "a string", list: "a list or tuple",
           tuple: "a list or tuple", ml_collections.ConfigDict: "a dict"}
  return names.get(kind, kind.__name__)


def _described(value) -> str:
  return "None" if value is None else f"{type(value).__name__} {value!r}"


def _type_problem(value, default) -> str | None:
  """As ml_collections types a field: by its default (int for float, list for tuple and back); but a
  bool is not an int, and None only fills a placeholder."""
  if isinstance(default, ml_collections.FieldReference):
    if value is None:
      return None
    kind = default.get_type()
  elif default is None:
    return None
  else:
    kind = type(default)
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif kind in (list, tuple):
    ok = isinstance(value, (list, tuple))
  elif issubclass(kind, ml_collections.ConfigDict):
    ok = _is_dict(value)
  else:
    ok = isinstance(value, kind)
  return None if ok else f"expected {_type_name(kind)}, got {_described(value)}"


def _key_problems(defaults: dict[str, Any], values: dict[str, Any], sections: set[str]) -> list[str]:
  problems = []
  valid = sorted(set(defaults) | sections)
  for path in values:
    if path in sections:  # a value where a section belongs
      problems.append(f"{path}: expected a section, got {_described(values[path])}")
    elif path not in defaults:
      near = difflib.get_close_matches(path, valid, n=1)
      problems.append(f"{path}: no such key" + (f"; did you mean {near[0]}?" if near else ""))
  replaced = [p for p in values if p in sections]
  problems += [f"{p}: missing" for p in defaults if p not in values and not any(p.startswith(r + ".") for r in replaced)]
  return problems


def rule_problems(rules, values: dict[str, Any], bad: set[str], prefix: str = "") -> list[str | None]:
  """The problems of the rules whose keys are each valid. `prefix`: where the rules' keys sit in `values` (a
  build in a run config); a message that starts with a key then names its full path, any other the section."""
  problems = []
  for keys, check in rules:
    if bad & {prefix + k for k in keys}:
      continue
    problem = check({k: values[prefix + k] for k in keys})
    if problem and prefix:
      head = re.match(r"[\w.]+", problem)
      problem = prefix + problem if head and prefix + head.group() in values else f"{prefix[:-1]}: {problem}"
    problems.append(problem)
  return problems


def problems_against(config, defaults_config: ml_collections.ConfigDict, cls: type) -> tuple[list[str], dict[str, Any], set[str]]:
  """(problems, values, bad keys) of `config` against `defaults_config`, the ConfigDict made from `cls`:
  keys the defaults lack (with the nearest valid key) or have and the config lacks, values of another type
  than the default's, and values their field's check refuses."""
  checks = constraints(cls)
  defaults = _defaults(defaults_config, open_sections(cls))
  sections = _sections(defaults)
  values = _values(config, sections)
  problems = _key_problems(defaults, values, sections)
  bad = {p for p in values if p not in defaults}
  for path in (p for p in defaults if p in values):
    problem = _type_problem(values[path], defaults[path])
    if problem is None and path in checks and values[path] is not None:
      problem = checks[path](values[path])
    if problem is not None:
      problems.append(f"{path}: {problem}")
      bad.add(path)
  bad |= {p for p in defaults if p not in values}
  return problems, values, bad


def raise_problems(problems: list[str], where: str = "in the config") -> None:
  """One ConfigError listing every problem (none: nothing happens)."""
  if len(problems) == 1:
    raise ConfigError(problems[0])
  if problems:
    raise ConfigError(f"{len(problems)} problems {where}:\n  " + "\n  ".join(problems))


# --- checks ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= value <= high (an open end excludes the bound, None leaves that side unbounded); `also`
  lists values allowed besides (mesh sizes: -1)."""

  low: float
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  also: tuple = ()

  def __str__(self) -> str:
    if self.high is None:
      text = f"{'>' if self.low_open else '>='} {self.low:g}"
    else:
      text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    return " or ".join([*(f"{v:g}" for v in self.also), text])

  def __call__(self, value) -> str | None:
    if value in self.also:
      return None
    above = value > self.low if self.low_open else value >= self.low
    below = self.high is None or (value < self.high if self.high_open else value <= self.high)
    return None if above and below else f"must be {self}, got {value!r}"


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: tuple

  def __call__(self, value) -> str | None:
    return None if value in self.choices else f"must be one of {', '.join(map(repr, self.choices))}; got {value!r}"


@dataclasses.dataclass(frozen=True)
class SomeOf:
  """A list or tuple whose items are each one of `choices`."""

  choices: tuple

  def __call__(self, value) -> str | None:
    odd = [v for v in value if v not in self.choices]
    return f"must hold only {', '.join(map(repr, self.choices))}; got {odd[0]!r}" if odd else None


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
BELOW_1 = Range(0, 1, high_open=True)  # fractions that must leave something (Adam's betas, a validation share)
MESH_SIZE = Range(1, also=(-1,))  # -1: the devices left over
SEED = Range(0, 2**63 - 1)  # what jax.random.key and numpy take; a larger one would be a traceback there


def strings(value) -> str | None:
  odd = [v for v in value if not isinstance(v, str)]
  return f"must hold strings, got {odd[0]!r}" if odd else None


def regexes(value) -> str | None:
  for pattern in value:
    if not isinstance(pattern, str):
      return f"must hold regular expressions (strings), got {pattern!r}"
    try:
      re.compile(pattern)
    except re.error as err:
      return f"{pattern!r} is not a regular expression ({err})"
  return None


def renames(value) -> str | None:
  odd = {k: v for k, v in value.items() if not isinstance(v, str)}
  return f"maps raw field names to field names (strings), got {odd}" if odd else None


def ngram_fractions(value) -> str | None:
  """{"n": the largest fraction of characters in n-grams ...}: n a positive integer, fractions in [0, 1]."""
  for n, fraction in value.items():
    if not str(n).isdigit() or int(n) < 1:
      return f'keys are n-gram sizes ("2", "3", ...), got {n!r}'
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or FRACTION(fraction):
      return f"[{n!r}] must be a fraction in [0, 1], got {fraction!r}"
  return None
