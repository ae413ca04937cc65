"""Decontaminate: drop records that share a word n-gram (13 by default) with an evaluation set item,
or that hold an eval item's text whole.

Text is compared as lowercase word sequences (`\\w+`), so case, punctuation and spacing do not hide a
match. Two matchers, each with its own drop reason:

- n-gram ("overlaps eval set"): a shared n-gram; an eval item shorter than n words is matched whole
  when it has at least `min_words` words.
- exact ("eval item (exact)"), for what the n-gram matcher cannot see, the short items: an eval item
  is keyed by its whole text, its prompt (the user turns) and, when a template made it from fields
  (closed_qa's question, ...), by those fields without the template's instruction words, alone and
  with the response. A record is dropped when its whole text, its prompt, one of its turns or its own
  template fields equals a key of any length, or when its whole text or fields contain a key of at
  least `exact_min_words` words (3: a one-word answer or "Hello" would drop harmless records). Keys
  of n words or more are left to the n-gram matcher, which finds any text containing them.

The n-gram matcher runs first, so a record that matches both is counted once, as an n-gram drop.
Every drop names the eval item it matched and the shared words.
"""

from __future__ import annotations

import functools
import pathlib
import re
import string
from typing import Any, Iterable

from sft.databuilder import readers, records, templates
from sft.databuilder.records import message_words, words

EXACT_MIN_WORDS = 3
NGRAM_REASON = "overlaps eval set"
EXACT_REASON = "eval item (exact)"


def normalise(text: str) -> str:
  return " ".join(words(text))


@functools.cache
def _paraphrase_patterns(task: str) -> tuple[tuple[re.Pattern, tuple[str, ...], int], ...]:
  """(regex capturing the fields, the fields, length of the fixed text) per paraphrase of a template task;
  the label options are part of the instruction, not a field."""
  out = []
  for paraphrase in templates.TASKS[task][2]:
    parts, fields, fixed = [], [], 0
    for literal, field, _, _ in string.Formatter().parse(paraphrase):
      parts.append(re.escape(literal))
      fixed += len(literal)
      if field == "options":
        parts.append(".*?")
      elif field == "blank":
        parts.append(re.escape(templates.BLANK))
      elif field is not None:
        parts.append(f"(?P<{field}>.*?)")
        fields.append(field)
    out.append((re.compile("".join(parts), re.DOTALL), tuple(fields), fixed))
  return tuple(out)


def _template_fields(record: records.Record) -> str:
  """The fields a template filled into the record's prompt, without its instruction words ("" if none).
  The paraphrase to_chat picked for this id is tried first, then the others with the most fixed text
  first, since a bare "{question}" matches any prompt."""
  template = record.get("template")
  if template not in templates.TASKS:
    return ""
  user = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
  patterns = _paraphrase_patterns(template)
  picked = patterns[records.stable_hash(record["id"]) % len(patterns)]
  for pattern, fields, _ in [picked, *sorted(patterns, key=lambda p: -p[2])]:
    if match := pattern.fullmatch(user):
      return "\n".join(match[f] for f in fields)
  return ""


def exact_texts(item: str | records.Record, eval_side: bool, per_message: list[list[str]] | None = None) -> list[str]:
  """The normalised texts of a record (or plain text) that the exact matcher compares: see the module doc.
  An eval item's single turns are no keys: its answer alone ("Saturn") is no evidence of contamination.
  `per_message`: the record's message_words, when the caller has them already."""
  if isinstance(item, str):
    return [normalise(item)]
  per_message = message_words(item) if per_message is None else per_message
  whole = " ".join(word for seq in per_message for word in seq)
  texts = []
  if item["kind"] == "chat":
    messages = item["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    response = messages[last]["content"] if last < len(messages) else ""
    texts.append(" ".join(word for m, seq in zip(messages[:last], per_message) if m["role"] == "user" for word in seq))
    if fields := _template_fields(item):
      texts += [normalise(fields), normalise(f"{fields}\n{response}")]
    if not eval_side:
      texts += [" ".join(seq) for seq in per_message]
  return list(dict.fromkeys(t for t in [whole, *texts] if t))


def build_index(items: Iterable[tuple[str, str | records.Record]], n: int, min_words: int, exact_min_words: int = EXACT_MIN_WORDS) -> dict[str, Any]:
  """The index over (id, text or record) pairs, plain dicts so it is cheap to send to workers:
  "grams": {"w1 ... wn": eval item id}, "lengths": sorted n-gram lengths, "heads": {the first two words of the
  grams, or the one of a one-word gram} (most positions of a text start no gram: no join, no lookup), "exact": {normalised key:
  eval item id}, "starts": {first word: lengths of the keys (exact_min_words <= length < n) starting with it}."""
  grams: dict[str, str] = {}
  exact: dict[str, str] = {}
  starts: dict[str, set[int]] = {}
  lengths = set()
  for item_id, item in items:
    tokens = words(item if isinstance(item, str) else records.contents(item))
    size = n if len(tokens) >= n else len(tokens)
    if size >= min_words:
      lengths.add(size)
      for i in range(len(tokens) - size + 1):
        grams.setdefault(" ".join(tokens[i:i + size]), item_id)
    for key in exact_texts(item, eval_side=True):
      exact.setdefault(key, item_id)
      length = key.count(" ") + 1
      if exact_min_words <= length < n:
        starts.setdefault(key.split(" ", 1)[0], set()).add(length)
  heads = {" ".join(gram.split(" ", 2)[:2]) for gram in grams}
  return {"grams": grams, "lengths": sorted(lengths), "heads": heads, "exact": exact, "starts": {w: sorted(s) for w, s in starts.items()}}


def index_from_files(paths: Iterable[str], n: int, min_words: int, exact_min_words: int = EXACT_MIN_WORDS) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
  """The index over every item of the eval files (any format readers.py reads), and per file how many
  items it holds: `items`, of which `raw` did not parse as a record and are matched by their raw text."""
  items, counts = [], {}
  for path in paths:
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"decontamination eval set {path} does not exist")
    file_records = [r for r in readers.read_file(path, f"eval:{path.name}") if words(records.contents(r))]
    counts[str(path)] = {"items": len(file_records), "raw": sum(records.is_dropped(r) for r in file_records)}
    items += [(r["id"], r) for r in file_records]
  return build_index(items, n, min_words, exact_min_words), counts


def find_overlap(text: str, index: dict[str, Any], tokens: list[str] | None = None) -> tuple[str, str] | None:
  """(eval item id, shared words) for the first shared n-gram, or None. `tokens`: words(text), if known."""
  tokens = words(text) if tokens is None else tokens
  grams = index["grams"]
  heads = index.get("heads")  # an n-gram can only start where the text's next two words start one of the index's
  pairs = [f"{a} {b}" for a, b in zip(tokens, tokens[1:])] if heads is not None else []
  for size in index["lengths"]:
    stop = len(tokens) - size + 1
    if heads is None:
      starts = range(stop)
    else:
      starts = [i for i, word in enumerate(tokens[:stop]) if word in heads] if size == 1 else [i for i, pair in enumerate(pairs[:stop]) if pair in heads]
    for i in starts:
      gram = " ".join(tokens[i:i + size])
      if gram in grams:
        return grams[gram], gram
  return None


def find_exact(record: records.Record, index: dict[str, Any], per_message: list[list[str]] | None = None) -> tuple[str, str] | None:
  """(eval item id, its key) when one of the record's texts equals an eval key or, for the whole text and
  template fields (which hold the others), contains one of exact_min_words or more; else None.
  `per_message`: the record's message_words, if known."""
  exact, starts = index["exact"], index["starts"]
  per_message = message_words(record) if per_message is None else per_message
  for text in exact_texts(record, eval_side=False, per_message=per_message):
    if text in exact:
      return exact[text], text
  fields = _template_fields(record) if record["kind"] == "chat" else ""
  for seq in ([word for turn in per_message for word in turn], words(fields)):
    for i, sizes in [(i, sizes) for i, word in enumerate(seq) if (sizes := starts.get(word))]:
      for size in sizes:
        key = " ".join(seq[i:i + size])
        if key in exact:
          return exact[key], key
  return None


def decontaminate_record(record: records.Record, index: dict[str, Any], per_message: list[list[str]] | None = None) -> records.Record:
  """The record, or the record dropped by a matcher (stage "decontaminate"). `per_message`: its
  records.message_words, if known."""
  per_message = message_words(record) if per_message is None else per_message  # once, for both matchers
  tokens = [word for seq in per_message for word in seq]
  if match := (find_overlap("", index, tokens) if index["grams"] else None):
    item_id, gram = match
    return records.drop(record, "decontaminate", NGRAM_REASON, f"{item_id}: '{gram}'")
  if match := (find_exact(record, index, per_message) if index.get("exact") else None):
    item_id, key = match
    return records.drop(record, "decontaminate", EXACT_REASON, f"{item_id}: '{key}'")
  return record
