"""The record every stage passes along, and how a stage drops one without losing it.

A record is a plain JSON-able dict, so the same stages run in worker processes and on Beam:

    {"id": "alpaca.jsonl:12", "source": "alpaca.jsonl", "kind": "chat",
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
    {"id": "notes/a.txt", "source": "notes", "kind": "text", "text": "..."}

Optional keys: "group" (records sharing it land in the same split), "edits" (counts of what cleaning
changed), "lang" (what the language filter judged, or "not judged (short | unsure | translation)"),
"split" (set by the format stage); from annotation, "annotated" (response | label | self-instruct),
"label_confidence", "judge_score", and "gold" (the right answer a raw field named by gold_field held). A dropped record keeps its content and gains "dropped": {"stage", "reason", "detail"}; later
stages pass it through untouched, and the report and the accounting read it at the end.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

Record = dict[str, Any]
ROLES = ("system", "user", "assistant")


def chat(record_id: str, source: str, messages: list[dict[str, str]], **extra: Any) -> Record:
  return {"id": record_id, "source": source, "kind": "chat", "messages": messages, **extra}


def text(record_id: str, source: str, body: str, **extra: Any) -> Record:
  return {"id": record_id, "source": source, "kind": "text", "text": body, **extra}


def drop(record: Record, stage: str, reason: str, detail: str = "", **info: str) -> Record:
  """The record, marked as dropped by `stage` for `reason` (a short fixed phrase; detail says more;
  info, e.g. duplicate_of=<id>, is kept for the report)."""
  return {**record, "dropped": {"stage": stage, "reason": reason, "detail": detail[:300], **info}}


def rejected(record_id: str, source: str, stage: str, reason: str, detail: str = "", raw: str = "") -> Record:
  """A record that never became one (bad JSON, wrong types): its id, source and raw text are kept,
  with what UTF-8 cannot hold (lone surrogates of a bad file) replaced, so rejected.jsonl can be written."""
  raw, detail = (_utf8_safe(x) for x in (raw[:2000], detail[:300]))
  return drop({"id": record_id, "source": source, "kind": "raw", "raw": raw}, stage, reason, detail)


def _utf8_safe(text: str) -> str:
  return text.encode("utf-8", "replace").decode("utf-8")


def is_dropped(record: Record) -> bool:
  return "dropped" in record


def contents(record: Record) -> str:
  """All the text of a record: a chat's turns joined by newlines, or a document's text."""
  if record["kind"] == "chat":
    return "\n".join(m["content"] for m in record["messages"])
  if record["kind"] == "text":
    return record["text"]
  return record.get("raw", "")


_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
  """The text's lowercased words (`\\w+`): what decontamination and the SFT rules compare."""
  return _WORD.findall(text.lower())


def message_words(record: Record) -> list[list[str]]:
  """The words of each text of a record (a chat's turns; a document's text): those of its whole text
  (`contents`, the turns joined by newlines) are theirs one after another, since no word spans a newline
  and lowercasing does not look across one."""
  if record["kind"] == "chat":
    return [words(m["content"]) for m in record["messages"]]
  return [words(contents(record))]


def prompt_and_response(record: Record) -> tuple[str, str]:
  """The user turns before the last assistant turn, and that assistant turn."""
  messages = record["messages"]
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  prompt = "\n".join(m["content"] for m in messages[:last] if m["role"] == "user")
  return prompt, messages[last]["content"]


def stable_hash(key: str) -> int:
  """A 64-bit hash that is the same on every machine and run (Python's hash() is salted)."""
  return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def unit_interval(key: str, salt: str = "") -> float:
  return stable_hash(salt + key) / 2**64


def public(record: Record) -> Record:
  """The record as written for training: without bookkeeping keys."""
  return {k: v for k, v in record.items() if k not in ("edits", "dropped", "lang", "split")}
