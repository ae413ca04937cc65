"""Decontaminate: drop records that share a word n-gram (13 by default) with an evaluation set item.

Text is compared as lowercase word sequences (`\\w+`), so punctuation and spacing do not hide a
match. An eval item shorter than n words is matched whole when it has at least `min_words` words.
Every drop names the eval item it matched and the shared words.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Iterable

from sft.databuilder import readers, records

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def build_index(items: Iterable[tuple[str, str]], n: int, min_words: int) -> dict[str, Any]:
  """{"grams": {"w1 ... wn": eval item id}, "lengths": sorted n-gram lengths} from (id, text) pairs."""
  grams: dict[str, str] = {}
  lengths = set()
  for item_id, text in items:
    tokens = words(text)
    size = n if len(tokens) >= n else len(tokens)
    if size < min_words:
      continue
    lengths.add(size)
    for i in range(len(tokens) - size + 1):
      grams.setdefault(" ".join(tokens[i:i + size]), item_id)
  return {"grams": grams, "lengths": sorted(lengths)}


def index_from_files(paths: Iterable[str], n: int, min_words: int) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
  """The index over every item of the eval files (any format readers.py reads), and per file how many
  items it holds: `items`, of which `raw` did not parse as a record and are matched by their raw text."""
  items, counts = [], {}
  for path in paths:
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"decontamination eval set {path} does not exist")
    file_records = [r for r in readers.read_file(path, f"eval:{path.name}") if words(records.contents(r))]
    counts[str(path)] = {"items": len(file_records), "raw": sum(records.is_dropped(r) for r in file_records)}
    items += [(r["id"], records.contents(r)) for r in file_records]
  return build_index(items, n, min_words), counts


def find_overlap(text: str, index: dict[str, Any]) -> tuple[str, str] | None:
  """(eval item id, shared words) for the first shared n-gram, or None."""
  tokens = words(text)
  grams = index["grams"]
  for size in index["lengths"]:
    for i in range(len(tokens) - size + 1):
      gram = " ".join(tokens[i:i + size])
      if gram in grams:
        return grams[gram], gram
  return None


def decontaminate_record(record: records.Record, index: dict[str, Any]) -> records.Record:
  match = find_overlap(records.contents(record), index) if index["grams"] else None
  if match is None:
    return record
  item_id, gram = match
  return records.drop(record, "decontaminate", "overlaps eval set", f"{item_id}: '{gram}'")
