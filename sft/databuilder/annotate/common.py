"""What the annotation tasks share: the chat a record asks, the checks every generation passes, and the
guard that stops a build whose annotation mostly failed."""

from __future__ import annotations

import collections
import unicodedata
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


def visible(text: str) -> str:
  """The text without format characters (zero-width spaces, byte-order marks, joiners) and outer
  whitespace: what a reader sees. An answer of nothing else is empty."""
  return "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip()


def failure(generation: Generation, max_new_tokens: int) -> tuple[str, str] | None:
  """(reason, detail) when a generation cannot be used as it is; None when it can. An annotator's
  error (a server's request that failed after its retries) comes first: its text is no answer."""
  error = getattr(generation, "error", "")
  if error:
    return "annotator error", error
  if not generation.finished:
    return "truncated", f"cut at max_new_tokens={max_new_tokens}: {generation.text[-80:]!r}"
  if not visible(generation.text):
    return "empty", "the annotator answered nothing" if not generation.text else f"only blanks: {generation.text[:20]!r}"
  return None


# A record's `annotated` mark -> the task that made it.
_TASK_OF_MARK = {"response": "fill", "label": "label", "self-instruct": "self-instruct"}


def _tasks(fact: dict[str, Any]) -> list[tuple[str, bool]]:
  """(task, whether that task dropped the record) for each annotation task that handled it: its
  annotation (fill, label, self-instruct) and the judge."""
  tasks, stage = [], fact.get("stage")
  if fact.get("annotated"):
    tasks.append((_TASK_OF_MARK.get(fact["annotated"], fact["annotated"]), stage == STAGE))
  elif stage == STAGE:  # dropped before any annotation was made ("fill: empty" has its mark; this has none)
    tasks.append((fact["reason"].split(":")[0], True))
  if "judge_score" in fact or stage == JUDGE_STAGE:
    tasks.append(("judge", stage == JUDGE_STAGE))
  return tasks


def guard_problem(facts: Sequence[dict[str, Any]], max_drop_fraction: float) -> str | None:
  """Why a build must stop (None when it need not): an annotation task (fill, label, self-instruct, the
  judge) dropped more than `max_drop_fraction` of the records it was given. Each task is held to it on
  its own, so one that failed outright is never hidden by others that did well."""
  given: collections.Counter[str] = collections.Counter()
  dropped: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
  for fact in facts:
    for task, by_it in _tasks(fact):
      given[task] += 1
      if by_it:
        dropped[task][f"{fact['stage']}: {fact['reason']}"] += 1
  failed = [task for task in sorted(given) if sum(dropped[task].values()) > max_drop_fraction * given[task]]
  if not failed:
    return None
  parts = []
  for task in failed:
    total, top = sum(dropped[task].values()), ", ".join(f"{r} {n}" for r, n in dropped[task].most_common(3))
    parts.append(
        f"annotation dropped {total} of the {given[task]} records {task} was given ({total / given[task]:.0%}, more "
        f"than annotate.max_drop_fraction={max_drop_fraction}): {top}"
    )
  return (
      "; ".join(parts) + ". The annotator or its settings (annotate.model, annotate.max_new_tokens) do not fit this "
      "data; the previous build is left as it was"
  )
