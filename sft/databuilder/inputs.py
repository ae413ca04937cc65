"""The input folder's files: `list_files` walks it, links to files and folders followed, so that every
input reached is read and counted (sft.databuilder.readers reads each one)."""

from __future__ import annotations

import collections
import os
import pathlib

from sft.errors import ConfigError


def list_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """Every file under `folder`, links to files and folders followed, in a fixed order (hidden names skipped).

  A file reached by several paths is listed once: under its own place in the folder if it has one, else
  under the first path met (the real tree is walked before any linked folder, each level in name order).
  A dangling link is listed, so that reading it gives its counted rejection; a folder link that leads
  back to a folder holding it (a loop) is a ConfigError naming the link."""
  if not folder.is_dir():
    raise FileNotFoundError(f"input folder {folder} does not exist")
  walked = {_identity(folder)}
  candidates: list[tuple[bool, pathlib.Path]] = []  # (reached through a link, path), in walk order
  pending, links = collections.deque([(folder, False)]), collections.deque()
  while pending or links:
    if not pending:  # the next folder link, once everything before it is walked
      link = links.popleft()
      if _leads_back(link):
        raise ConfigError(f"input_dir: the link {link} -> {os.readlink(link)} leads back to a folder that holds it "
                          "(a loop); remove it or point it elsewhere")
      if _identity(link) not in walked:  # else a folder already walked under another name
        walked.add(_identity(link))
        pending.append((link, True))
      continue
    directory, via_link = pending.popleft()
    for entry in _entries(directory):
      path = pathlib.Path(entry.path)
      if entry.name.startswith("."):
        continue
      if entry.is_dir(follow_symlinks=False):
        if _identity(path) not in walked:
          walked.add(_identity(path))
          pending.append((path, via_link))
      elif entry.is_symlink() and os.path.isdir(path):
        links.append(path)
      elif entry.is_file() or (entry.is_symlink() and not os.path.exists(path)):  # files, links to files, dangling links
        candidates.append((via_link or entry.is_symlink(), path))
  listed: dict[str, pathlib.Path] = {}
  for _, path in sorted(candidates, key=lambda c: c[0]):  # stable: files in their own place first
    listed.setdefault(os.path.realpath(path) if os.path.exists(path) else str(path), path)
  return sorted(listed.values())


def _entries(directory: pathlib.Path) -> list[os.DirEntry]:
  """A folder's entries in name order; a folder that cannot be listed is a ConfigError, not a silent gap."""
  try:
    with os.scandir(directory) as it:
      return sorted(it, key=lambda e: e.name)
  except OSError as err:
    raise ConfigError(f"input_dir: cannot list {directory} ({err.strerror}); fix its permissions or move it out") from None


def _identity(path: pathlib.Path) -> tuple[int, int]:
  st = path.stat()
  return st.st_dev, st.st_ino


def _leads_back(link: pathlib.Path) -> bool:
  """Whether the folder `link` points to holds the link itself (walking it would never end)."""
  target, parent = pathlib.Path(os.path.realpath(link)), pathlib.Path(os.path.realpath(link.parent))
  return parent == target or parent.is_relative_to(target)
