"""A finished data build as the audit reads it: its identity, its records and the stratum of each one.

Every record of a build falls in exactly one stratum, so the strata's sizes add up to the build:

    dropped: <stage>: <reason>     a record the builder dropped (rejected-*.jsonl)
    annotated: <kind>              a kept record a model annotated ("response", "label", "self-instruct")
    kept: <task> / <source>        any other kept record ("pretrain" is the task of a raw text record)

A build is named by the sha256 of its manifest.json bytes: a review row carries it, so a review of another
build (or of this folder rebuilt) is recognised and refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Iterator

from sft.databuilder.build import MANIFEST, check_outputs
from sft.errors import ConfigError

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around the text training puts its loss on


@dataclasses.dataclass(frozen=True)
class Build:
  folder: pathlib.Path
  manifest: dict[str, Any]
  sha256: str  # of manifest.json's bytes

  def files(self) -> list[pathlib.Path]:
    """The build's JSONL files, every split and the rejected records, as its manifest lists them."""
    names = sorted(e["file"] for e in self.manifest["outputs"] if e["file"].endswith(".jsonl"))
    return [self.folder / name for name in names]


def open_build(folder: str | pathlib.Path) -> Build:
  """The finished build in `folder`, its path resolved (reports name it from elsewhere). A ConfigError when
  it is none, a file is missing or of another size; a file changed since the build but of the same size is
  one as `records` reads it (hashing every shard here too would read each twice)."""
  folder = pathlib.Path(folder).resolve()
  manifest = check_outputs(folder)
  return Build(folder, manifest, hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest())


def records(build: Build) -> Iterator[dict[str, Any]]:
  """Every record of the build, kept and dropped. Each file is hashed as it is read: one whose sha256 is not
  the manifest's is a ConfigError once its last line is read, before any caller has written a thing."""
  digests = {e["file"]: e.get("sha256") for e in build.manifest["outputs"]}
  for path in build.files():
    digest = hashlib.sha256()  # as sft.databuilder.write.sha256: of the file's bytes
    with path.open("rb") as lines:
      for number, line in enumerate(lines, 1):
        digest.update(line)
        yield _record(path, number, line)
    if digests.get(path.name) and digest.hexdigest() != digests[path.name]:
      raise ConfigError(
          f"{path} has sha256 {digest.hexdigest()}, {MANIFEST} says {digests[path.name]}: changed since the build"
      )


def _record(path: pathlib.Path, number: int, line: bytes) -> dict[str, Any]:
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as err:
    raise ConfigError(f"{path}:{number} is not UTF-8 ({err.reason} at byte {err.start}): not a finished data build's file") from None
  except json.JSONDecodeError as err:
    raise ConfigError(f"{path}:{number} is not JSON ({err}): not a finished data build's file") from None
  if not isinstance(record, dict) or not isinstance(record.get("id"), str):
    raise ConfigError(f"{path}:{number} is not a record with an id: not a finished data build's file")
  return record


def is_dropped(record: dict[str, Any]) -> bool:
  return isinstance(record.get("dropped"), dict)


def status(record: dict[str, Any]) -> str:
  """ "kept", or "dropped: <stage>: <reason>"."""
  if not is_dropped(record):
    return "kept"
  return f"dropped: {record['dropped'].get('stage', '?')}: {record['dropped'].get('reason', '?')}"


def annotation(record: dict[str, Any]) -> str | None:
  """How a model annotated the record ("response", "label", "self-instruct"), or None."""
  kind = record.get("annotated")
  return kind if isinstance(kind, str) and kind else None


def stratum(record: dict[str, Any]) -> str:
  if is_dropped(record):
    return status(record)
  kind = annotation(record)
  if kind:
    return f"annotated: {kind}"
  task = record.get("task") or ("pretrain" if record.get("kind") == "text" else "chat")
  return f"kept: {task} / {record.get('source', '?')}"


def labels(record: dict[str, Any]) -> list[str] | None:
  """The record's label set (a classification record's), or None."""
  found = record.get("labels")
  if isinstance(found, list) and found and all(isinstance(x, str) for x in found):
    return found
  return None


def label(record: dict[str, Any]) -> str | None:
  """The label a labelled record carries: its last assistant turn (None for a record with no label)."""
  if labels(record) is None and annotation(record) != "label":
    return None
  turns = [m for m in record.get("messages") or () if isinstance(m, dict) and m.get("role") == "assistant"]
  content = turns[-1].get("content") if turns else None
  return content if isinstance(content, str) else None


def _turns(record: dict[str, Any]) -> list[tuple[str, str]]:
  return [(str(m.get("role")), str(m.get("content"))) for m in record.get("messages") or () if isinstance(m, dict)]


def plain_text(record: dict[str, Any]) -> str:
  """The record's text with nothing marked: its turns, its document or, never parsed, its raw text."""
  if record.get("kind") == "chat":
    return "\n\n".join(f"{role}: {content}" for role, content in _turns(record))
  return str(record.get("text", record.get("raw", "")))


def marked_by_turns(record: dict[str, Any]) -> str:
  """The chat with its assistant turns marked: what the chat templates put the loss on."""
  parts = []
  for role, content in _turns(record):
    parts.append(f"{role}: {MARK_OPEN}{content}{MARK_CLOSE}" if role == "assistant" else f"{role}: {content}")
  return "\n\n".join(parts)


def marked_by_mask(record: dict[str, Any], tokenizer: Any) -> str:
  """The chat as the tokenizer renders it, every run of loss-masked tokens marked. A chat the tokenizer
  refuses raises its ValueError."""
  from sft.pipeline.inspect import token_texts  # noqa: PLC0415 (a configured tokenizer only)

  tokens, mask = tokenizer.tokenize_chat(record["messages"])
  out, inside = [], False
  for text, trained in zip(token_texts(tokenizer, tokens), mask):
    if bool(trained) != inside:
      out.append(MARK_OPEN if trained else MARK_CLOSE)
      inside = bool(trained)
    out.append(text)
  return "".join(out) + (MARK_CLOSE if inside else "")


def review_text(record: dict[str, Any], tokenizer: Any, limit: int) -> tuple[str, str]:
  """(the text a reviewer judges, how its trained text is marked). A kept chat shows what training learns
  marked; a dropped record its text and why it was dropped; a kept raw text is trained whole."""
  if is_dropped(record):
    detail = str(record["dropped"].get("detail", ""))
    text, marks = plain_text(record) + (f"\n\n[dropped because: {detail}]" if detail else ""), "not trained"
  elif record.get("kind") != "chat":
    text, marks = plain_text(record), "every token (a pretraining text)"
  elif tokenizer is None:
    text, marks = marked_by_turns(record), "assistant turns (no tokenizer: as the chat templates train)"
  else:
    try:
      text, marks = marked_by_mask(record, tokenizer), "the tokenizer's loss mask"
    except ValueError as err:
      reason = " ".join(str(err).split())[:160]
      text, marks = marked_by_turns(record), f"assistant turns (the tokenizer refused the chat: {reason})"
  if len(text) > limit:
    text = f"{text[:limit]}… ({len(text) - limit} more characters)"
  return text, marks
