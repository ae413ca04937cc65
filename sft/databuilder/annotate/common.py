"""What the annotation tasks share: the chat a record asks, the checks every generation passes, and the
guard that stops a build whose annotation mostly failed."""

from __future__ import annotations

import collections
from typing import Any, Sequence

from sft.annotator.base import Chat, Generation, check_count
from sft.databuilder import records

STAGE = "annotate"  # the stage of fill, label and self-instruct drops
JUDGE_STAGE = "judge"


def chat_of(record: records.Record) -> list[dict[str, str]]:
  """The turns a record asks the annotator: every turn before its last assistant turn (a record that
  lacks its answer ends with the user turn already)."""
  messages = record["messages"]
  if messages[-1]["role"] != "assistant":
    return [dict(m) for m in messages]
  return [dict(m) for m in messages[:-1]]


def pending(batch: Sequence[records.Record], mark: str) -> list[int]:
  """The indices of the live records of `batch` that carry `mark` (needs_response, needs_label)."""
  return [i for i, r in enumerate(batch) if not records.is_dropped(r) and r.get(mark)]


def without_annotator(batch: Sequence[records.Record], todo: Sequence[int], reason: str, detail: str) -> list[records.Record]:
  """The batch with the records of `todo` dropped: nothing can annotate them (annotate.model is unset)."""
  out = list(batch)
  for i in todo:
    out[i] = records.drop(batch[i], STAGE, reason, detail)
  return out


def generate(annotator: Any, chats: Sequence[Chat], decoding: Any) -> list[Generation]:
  """The annotator's answers, exactly one per chat (else AnnotatorError)."""
  if not chats:
    return []
  out = annotator.generate(list(chats), decoding)
  check_count("answers", out, len(chats))
  return out


def log_likelihoods(annotator: Any, chats: Sequence[Chat], answers: Sequence[str]) -> list[float]:
  if not chats:
    return []
  out = annotator.log_likelihoods(list(chats), list(answers))
  check_count("log-likelihoods", out, len(chats))
  return [float(x) for x in out]


def failure(generation: Generation, max_new_tokens: int) -> tuple[str, str] | None:
  """(reason, detail) when a generation cannot be used as it is; None when it can. An annotator's
  error (a server's request that failed after its retries) comes first: its text is no answer."""
  error = getattr(generation, "error", "")
  if error:
    return "annotator error", error
  if not generation.finished:
    return "truncated", f"cut at max_new_tokens={max_new_tokens}: {generation.text[-80:]!r}"
  if not generation.text.strip():
    return "empty", "the annotator answered nothing"
  return None


def guard_problem(facts: Sequence[dict[str, Any]], max_drop_fraction: float) -> str | None:
  """Why a build must stop (None when it need not): annotation dropped more than `max_drop_fraction` of
  the records it was given. Given: every record an annotation task handled (it carries `annotated` or a
  `judge_score`, or was dropped by an annotation stage)."""
  stages = (STAGE, JUDGE_STAGE)
  given = [f for f in facts if f.get("annotated") or "judge_score" in f or f.get("stage") in stages]
  dropped = collections.Counter(f"{f['stage']}: {f['reason']}" for f in given if f.get("stage") in stages)
  total = sum(dropped.values())
  if not given or total <= max_drop_fraction * len(given):
    return None
  top = ", ".join(f"{reason} {n}" for reason, n in dropped.most_common(3))
  return (
      f"annotation dropped {total} of the {len(given)} records it was given ({total / len(given):.0%}, more than "
      f"annotate.max_drop_fraction={max_drop_fraction}): {top}. The annotator or its settings (annotate.model, "
      "annotate.max_new_tokens) do not fit this data; the previous build is left as it was"
  )
