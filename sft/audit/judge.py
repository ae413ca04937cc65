"""The machine reviewer: a model (sft/annotator/base.py's Annotator) fills the review rows' verdicts.

Each sampled record becomes one chat: the rubric, the record, and the question. A labelled record asks for
the right label from its label set; the verdict follows from it (keep when it is the record's label, drop
when it is not). Any other record asks for keep or drop. An answer that names neither (or both, or no label
of the set, or several) leaves the row's verdict empty, says so in its note, and is counted.
"""

from __future__ import annotations

import re
from typing import Any

from sft.audit import data
from sft.databuilder.annotate.label import parse_label  # the build's own reading of a label answer

MACHINE = "machine"
_VERDICT_QUESTION = "Should this record be kept for training? Answer with one word: keep or drop."
_LABEL_QUESTION = "Which label is right for this text? Answer with exactly one of: {labels}."


def _norm(text: str) -> str:
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_verdict(answer: str) -> str | None:
  """ "keep" or "drop" when the answer names exactly one of them as a word: "Keep." -> "keep"."""
  words = set(_norm(answer).split())
  named = [v for v in ("keep", "drop") if v in words]
  return named[0] if len(named) == 1 else None


def chat(record: dict[str, Any], rubric: str) -> list[dict[str, str]]:
  """The one-turn chat that asks the model about `record`."""
  label_set = data.labels(record)
  if label_set and not data.is_dropped(record):
    turns = [m for m in record.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"]
    text = "\n\n".join(str(m.get("content")) for m in turns)
    question = _LABEL_QUESTION.format(labels=", ".join(label_set))
  else:
    text, question = data.plain_text(record), _VERDICT_QUESTION
  return [{"role": "user", "content": f"{rubric}\n\nRecord:\n{text}\n\n{question}"}]


def fill(
    rows: list[dict[str, Any]], found: dict[str, dict[str, Any]], annotator: Any, rubric: str, decoding: Any, batch_size: int
) -> tuple[list[dict[str, Any]], int]:
  """The rows with the model's verdicts (and labels) filled, reviewer "machine", and how many answers were
  unparseable. `found`: record id -> the record; `decoding`: an sft.annotator.base.Decoding."""
  from sft.annotator.base import check_count  # noqa: PLC0415

  out, unparseable = [], 0
  for start in range(0, len(rows), batch_size):
    batch = rows[start : start + batch_size]
    answers = annotator.generate([chat(found[row["record_id"]], rubric) for row in batch], decoding)
    check_count("answers", answers, len(batch))
    for row, answer in zip(batch, answers):
      filled, ok = _filled(row, found[row["record_id"]], answer.text)
      out.append(filled)
      unparseable += not ok
  return out, unparseable


def _filled(row: dict[str, Any], record: dict[str, Any], answer: str) -> tuple[dict[str, Any], bool]:
  label_set = data.labels(record)
  row = {**row, "reviewer": MACHINE}
  shown = " ".join(answer.split())[:80]
  if label_set and not data.is_dropped(record):
    pick = parse_label(answer, label_set)
    if pick is None:
      return {**row, "note": f"unparseable answer (no one label of the set): {shown!r}"}, False
    return {**row, "right_label": pick, "verdict": "keep" if pick == data.label(record) else "drop"}, True
  verdict = parse_verdict(answer)
  if verdict is None:
    return {**row, "note": f"unparseable answer (not keep or drop): {shown!r}"}, False
  return {**row, "verdict": verdict}, True
