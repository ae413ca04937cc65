"""The machine reviewer: a model (sft/annotator/base.py's Annotator) fills the review rows' verdicts.

Each sampled record becomes one chat: the rubric, the record, and the question. A labelled record asks for
the right label from its label set; the verdict follows from it (keep when it is the record's label, drop
when it is not). Any other record asks for keep or drop. Only an answer that is a verdict (or a label) and
nothing that negates it fills a row: one that names neither (or both, or no label of the set, or several),
or holds a negation ("not keep", "Keep? No."), is "unparseable"; one cut at max_new_tokens is "truncated";
a request that failed is "annotator error". Each leaves the row's verdict empty, says so in its note, and
is counted.
"""

from __future__ import annotations

import re
from typing import Any

from sft.audit import data
from sft.databuilder.annotate.common import failure  # the build's own rule for an answer it cannot use
from sft.databuilder.annotate.label import parse_label as build_parse_label  # the build's reading of a label answer

MACHINE = "machine"
UNFILLED = ("unparseable", "truncated", "annotator error")  # why a row stays unfilled, as counted
_VERDICT_QUESTION = "Should this record be kept for training? Answer with one word: keep or drop."
_LABEL_QUESTION = "Which label is right for this text? Answer with exactly one of: {labels}."
# Words that turn a verdict into its opposite; "n't" is normalised to a word ending in n and a lone "t".
_NEGATIONS = frozenset(
    "not no never nor neither none nothing nobody nowhere cannot nope nah dont doesnt didnt isnt arent wasnt "
    "werent wont wouldnt shouldnt cant couldnt mustnt neednt havent hasnt hadnt aint shant".split()
)


def _norm(text: str) -> str:
  return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _negated(said: str) -> bool:
  """Whether normalised text holds a negation: "do not", "no", "don't" (normalised "don t")."""
  words = said.split()
  return any(w in _NEGATIONS or (w == "t" and prev.endswith("n")) for prev, w in zip(["", *words], words))


def parse_verdict(answer: str) -> str | None:
  """ "keep" or "drop" when the answer names exactly one of them as a word and holds no negation:
  "Keep." -> "keep", "Verdict: DROP" -> "drop"; "Don't keep it", "Keep? No." and "keep or drop" -> None."""
  said = _norm(answer)
  named = [v for v in ("keep", "drop") if v in said.split()]
  return named[0] if len(named) == 1 and not _negated(said) else None


def parse_label(answer: str, labels: list[str]) -> str | None:
  """The label an answer names (as the build reads one), None when it holds a negation outside the labels' words:
  "Not positive." -> None, yet "not spam" of ["spam", "not spam"] -> "not spam"."""
  said = _norm(answer)
  for x in sorted({_norm(x) for x in labels} - {""}, key=len, reverse=True):  # "not spam" before "spam"
    said = re.sub(rf"(?<!\w){re.escape(x)}(?!\w)", " ", said)
  return None if _negated(said) else build_parse_label(answer, labels)


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
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """The rows with the model's verdicts (and labels) filled, reviewer "machine", and how many stayed unfilled
  for each reason of UNFILLED. `found`: record id -> the record; `decoding`: an sft.annotator.base.Decoding."""
  from sft.annotator.base import check_count  # noqa: PLC0415

  out, unfilled = [], dict.fromkeys(UNFILLED, 0)
  for start in range(0, len(rows), batch_size):
    batch = rows[start : start + batch_size]
    answers = annotator.generate([chat(found[row["record_id"]], rubric) for row in batch], decoding)
    check_count("answers", answers, len(batch))
    for row, answer in zip(batch, answers):
      filled, problem = _filled(row, found[row["record_id"]], answer, decoding.max_new_tokens)
      out.append(filled)
      if problem:
        unfilled[problem] += 1
  return out, unfilled


def _filled(row: dict[str, Any], record: dict[str, Any], answer: Any, max_new_tokens: int) -> tuple[dict[str, Any], str | None]:
  """The row filled from `answer` (a Generation), or left unfilled with a note and the reason (UNFILLED)."""
  row = {**row, "reviewer": MACHINE}
  problem = failure(answer, max_new_tokens)
  if problem and problem[0] != "empty":  # an empty answer is read, and found unparseable, below
    return {**row, "note": f"{problem[0]}: {' '.join(problem[1].split())[:160]}"}, problem[0]
  label_set = data.labels(record)
  shown = " ".join(answer.text.split())[:80]
  if label_set and not data.is_dropped(record):
    pick = parse_label(answer.text, label_set)
    if pick is None:
      return {**row, "note": f"unparseable answer (no one label of the set, or negated): {shown!r}"}, "unparseable"
    return {**row, "right_label": pick, "verdict": "keep" if pick == data.label(record) else "drop"}, None
  verdict = parse_verdict(answer.text)
  if verdict is None:
    return {**row, "note": f"unparseable answer (not keep or drop, or negated): {shown!r}"}, "unparseable"
  return {**row, "verdict": verdict}, None
