"""Debian package descriptions from apt's lists: control-format parsing, joining, plain text.

apt keeps one file per index it downloaded in its lists directory (`Dir::State::lists`, usually
/var/lib/apt/lists). Two kinds are read here, both in Debian's control format (stanzas of
`Field: value` lines separated by blank lines; a line starting with a space continues the field
above it):

    *_i18n_Translation-en[.lz4|.gz|.xz]   Package, Description-md5, Description-en
    *_binary-<arch>_Packages[.lz4|...]    Package, Section, Description-md5, ...

`Description-en`'s first line is the synopsis (a one-line summary); the continuation lines are
the long description, where " ." stands for an empty line between paragraphs. Translation-en files
are written only when apt fetches English descriptions (`apt-get update -o Acquire::Languages=en`).
.lz4 lists are decompressed with the `lz4` command (package lz4), .gz and .xz with Python's own
modules, anything else is read as plain text.
"""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import pathlib
import re
import shutil
import subprocess
from typing import Iterable, Iterator

DEFAULT_LISTS_DIR = pathlib.Path("/var/lib/apt/lists")
COMPRESSED = (".lz4", ".gz", ".xz")
UPDATE_HINT = "run `apt-get update -o Acquire::Languages=en` as root"
LZ4_HINT = "install the lz4 package (apt-get install lz4)"
_BULLET = re.compile(r"^([*+\-o\u2022]|\d+[.)])\s")


class ListsError(RuntimeError):
  """apt's lists cannot be read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Package:
  name: str
  synopsis: str
  description: str  # the long description as plain text (see plain_text)
  section: str  # "" when no Packages list names it


# --- control format ---------------------------------------------------------------------------

def parse_stanzas(text: str) -> Iterator[dict[str, str]]:
  """Control-format text -> one dict per stanza, in order.

  A field's value is the rest of its first line, stripped, then its continuation lines joined with
  "\\n" exactly as written (leading space included), so multi-line fields keep their structure:
  "Description-en: Synopsis\\n First line\\n .\\n Second paragraph". Comment lines (#) are skipped.
  """
  stanza: dict[str, str] = {}
  field = None
  for line in text.splitlines():
    if not line.strip():
      if stanza:
        yield stanza
      stanza, field = {}, None
    elif line.startswith("#"):
      continue
    elif line[0] in " \t":
      if field is not None:
        stanza[field] += "\n" + line
    elif ":" in line:
      field, value = line.split(":", 1)
      field = field.strip()
      stanza[field] = value.strip()
    # a line with neither a colon nor a leading space is not control format: ignored
  if stanza:
    yield stanza


def split_description(value: str) -> tuple[str, list[str]]:
  """A Description field -> (synopsis, the long description's raw continuation lines)."""
  first, *rest = value.split("\n")
  return first.strip(), rest


def plain_text(lines: Iterable[str]) -> str:
  """A long description's continuation lines -> plain text.

  One leading space is removed; " ." lines separate paragraphs (a blank line in the result); the
  lines of a paragraph are joined into one line with single spaces (Debian wraps them at ~80
  columns), except that a line starting a list item ("* ", "- ", "+ ", "o ", "1. ") begins a new
  line, so lists stay one item per line. Lines indented further (Debian's "verbatim" lines) are
  reflowed like the others: in package descriptions they are almost always list continuations.
  """
  paragraphs: list[list[str]] = [[]]
  for raw in lines:
    line = raw[1:] if raw[:1] in (" ", "\t") else raw
    stripped = line.strip()
    if stripped == ".":
      if paragraphs[-1]:
        paragraphs.append([])
      continue
    if not stripped:
      continue
    current = paragraphs[-1]
    if not current or _BULLET.match(stripped):
      current.append(stripped)
    else:
      current[-1] += " " + stripped
  return "\n\n".join("\n".join(p) for p in paragraphs if p)


def last_section(section: str) -> str:
  """`contrib/net` -> `net`; `non-free-firmware/kernel` -> `kernel`; `games` -> `games`."""
  return section.strip().rsplit("/", 1)[-1]


def join(translations: Iterable[dict[str, str]], packages: Iterable[dict[str, str]]) -> list[Package]:
  """Translation stanzas + Packages stanzas -> one Package per package name, sorted by name.

  A translation's section comes from the Packages stanza with the same (Package, Description-md5),
  else from any Packages stanza of that package. When several translations name a package (the
  same package in bookworm and bookworm-updates), the first one whose md5 matches a Packages stanza
  is kept, else the first one read.
  """
  by_md5: dict[tuple[str, str], str] = {}
  by_name: dict[str, str] = {}
  for stanza in packages:
    name, section = stanza.get("Package", "").strip(), last_section(stanza.get("Section", ""))
    if not name or not section:
      continue
    by_md5.setdefault((name, stanza.get("Description-md5", "").strip()), section)
    by_name.setdefault(name, section)

  chosen: dict[str, tuple[bool, Package]] = {}
  for stanza in translations:
    name, value = stanza.get("Package", "").strip(), stanza.get("Description-en")
    if not name or value is None:
      continue
    md5 = stanza.get("Description-md5", "").strip()
    exact = (name, md5) in by_md5
    if name in chosen and (chosen[name][0] or not exact):
      continue
    synopsis, long_lines = split_description(value)
    section = by_md5.get((name, md5)) or by_name.get(name, "")
    chosen[name] = (exact, Package(name, synopsis, plain_text(long_lines), section))
  return [chosen[name][1] for name in sorted(chosen)]


# --- apt's lists ------------------------------------------------------------------------------

def lists_dir_from_config(dump: str) -> pathlib.Path | None:
  """`apt-config dump` output -> the lists directory (Dir + Dir::State + Dir::State::lists), or
  None when the dump does not say. A later part that is absolute replaces what came before."""
  values = {}
  for line in dump.splitlines():
    m = re.match(r'^(Dir|Dir::State|Dir::State::lists)\s+"([^"]*)";\s*$', line.strip())
    if m:
      values[m.group(1)] = m.group(2)
  if "Dir::State::lists" not in values:
    return None
  path = pathlib.Path(values.get("Dir", "/") or "/")
  for part in (values.get("Dir::State", "var/lib/apt"), values["Dir::State::lists"]):
    path = path / part  # pathlib: an absolute part replaces the path so far
  return path


def find_lists_dir() -> pathlib.Path:
  """apt's lists directory, from `apt-config dump`, else /var/lib/apt/lists."""
  if shutil.which("apt-config"):
    try:
      dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30, check=True).stdout
      found = lists_dir_from_config(dump)
      if found is not None:
        return found
    except (OSError, subprocess.SubprocessError):
      pass
  return DEFAULT_LISTS_DIR


def _is_list(path: pathlib.Path, kind: str) -> bool:
  name = path.name
  return path.is_file() and any(name.endswith(kind + ext) for ext in ("", *COMPRESSED))


def find_lists(lists_dir: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(Translation-en lists, Packages lists) in a lists directory, sorted by name; raises ListsError
  when there is no Translation-en list."""
  if not lists_dir.is_dir():
    raise ListsError(f"apt's lists directory {lists_dir} does not exist: {UPDATE_HINT}")
  files = sorted(lists_dir.iterdir())
  translations = [p for p in files if _is_list(p, "_Translation-en")]
  packages = [p for p in files if _is_list(p, "_Packages")]
  if not translations:
    raise ListsError(f"no English descriptions (*_Translation-en*) in {lists_dir}: {UPDATE_HINT}")
  return translations, packages


def read_list(path: pathlib.Path) -> str:
  """The text of one list, decompressed by its extension."""
  if path.suffix == ".lz4":
    lz4 = shutil.which("lz4")
    if lz4 is None:
      raise ListsError(f"{path.name} is lz4-compressed and the `lz4` command is missing: {LZ4_HINT}")
    done = subprocess.run([lz4, "-dc", str(path)], capture_output=True)
    if done.returncode != 0:
      raise ListsError(f"`lz4 -dc {path}` failed: {done.stderr.decode(errors='replace').strip()}")
    data = done.stdout
  elif path.suffix == ".gz":
    data = gzip.decompress(path.read_bytes())
  elif path.suffix == ".xz":
    data = lzma.decompress(path.read_bytes())
  else:
    data = path.read_bytes()
  return data.decode("utf-8", errors="replace")


def load(lists_dir: pathlib.Path | None = None) -> tuple[list[Package], dict[str, int]]:
  """Every package with an English description -> (packages sorted by name, counts read)."""
  lists_dir = find_lists_dir() if lists_dir is None else lists_dir
  translation_files, package_files = find_lists(lists_dir)
  translations = [s for p in translation_files for s in parse_stanzas(read_list(p))]
  stanzas = [s for p in package_files for s in parse_stanzas(read_list(p))]
  joined = join(translations, stanzas)
  counts = {
      "translation_lists": len(translation_files), "packages_lists": len(package_files),
      "translation_stanzas": len(translations), "packages_stanzas": len(stanzas),
      "packages": len(joined), "with_section": sum(1 for p in joined if p.section),
  }
  return joined, counts
