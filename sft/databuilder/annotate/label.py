"""label: a classification record that came with its text and label set but no label gets one label
from the set.

    {"text": "Great film!", "labels": ["positive", "negative"]}
      -> user "Classify the following text as one of: positive, negative. ..."  assistant "positive"
         annotated: "label", label_confidence: 0.62

method "loglik" (the evaluator's candidate ranking): the annotator's log-likelihood of each label as
the answer; the pick is the most likely, and `label_confidence` is its probability margin over the
runner-up, the probabilities being the softmax over the set (1.0 for a set of one). Below
`min_confidence` the record is dropped ("label: unsure"); log-likelihoods that rank nothing (NaN, or
every label impossible) drop it too ("label: bad score"). method "generate": the annotator answers
freely and the answer is read against the set ("label: off-set" when it names no label or several).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from sft.databuilder import records
from sft.databuilder.annotate.common import (
  STAGE,
  chat_of,
  failure,
  generate,
  log_likelihoods,
  pending,
  without_annotator,
)


def _norm(text: str) -> str:
  return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def parse_label(answer: str, labels: Sequence[str]) -> str | None:
  """The one label an answer names: the whole answer as a label is written (case and spacing aside),
  else as its words are (punctuation aside too), else the only label found in it as whole words; None
  when it names none, several, or one that another label of the set cannot be told from.

      parse_label("Positive.", ["positive", "negative"]) -> "positive"
      parse_label("It is negative", [...]) -> "negative";  parse_label("not sure", [...]) -> None
      parse_label("-", ["+", "-"]) -> "-";  parse_label("man, not woman", ["man", "woman"]) -> None
  """
  said_as_written = answer.strip().casefold()
  written = [x for x in labels if x.strip().casefold() == said_as_written]
  if len(written) == 1:
    return written[0]
  said = _norm(answer)
  exact = [x for x in labels if _norm(x) and _norm(x) == said]
  if exact:
    return exact[0] if len(exact) == 1 else None  # "C" and "C++" are both "c" once punctuation is gone
  spans = {x: [m.span() for m in re.finditer(rf"(?<!\w){re.escape(_norm(x))}(?!\w)", said)] for x in labels if _norm(x)}
  found = [x for x, at in spans.items() if at]
  # A label seen only inside a longer found label ("good" in "very good") is not a second answer.
  found = [x for x in found if not all(_inside(span, spans, x) for span in spans[x])]
  return found[0] if len(found) == 1 else None


def _inside(span: tuple[int, int], spans: dict[str, list[tuple[int, int]]], label: str) -> bool:
  """Whether `span` (an occurrence of `label`) lies strictly within an occurrence of another label."""
  start, end = span
  return any(
      a <= start and end <= b and (a, b) != (start, end) for other, at in spans.items() if other != label for a, b in at
  )


def margin(loglik_l: np.ndarray) -> float:
  """The top label's probability less the runner-up's, the probabilities a softmax over the set."""
  if len(loglik_l) == 1:
    return 1.0
  p_l = np.exp(loglik_l - loglik_l.max())
  p_l /= p_l.sum()
  top2 = np.sort(p_l)[-2:]
  return float(top2[1] - top2[0])


def _labelled(record: records.Record, label: str, **extra: Any) -> records.Record:
  record = {k: v for k, v in record.items() if k != "needs_label"}
  messages = [*record["messages"], {"role": "assistant", "content": label}]
  return {**record, "messages": messages, "annotated": "label", **extra}


def label_records(
    batch: list[records.Record], annotator: Any, decoding: Any, method: str, min_confidence: float
) -> list[records.Record]:
  """The batch with every live record marked needs_label labelled (or dropped, with the reason)."""
  todo = pending(batch, "needs_label")
  if not todo:
    return batch
  if annotator is None:
    return without_annotator(batch, todo, "missing label", "no annotate.model to choose one")
  out = list(batch)
  if method == "loglik":
    chats = [chat_of(batch[i]) for i in todo for _ in batch[i]["labels"]]
    scores = log_likelihoods(annotator, chats, [x for i in todo for x in batch[i]["labels"]])
    start = 0
    for i in todo:
      labels = batch[i]["labels"]
      loglik_l = np.asarray(scores[start:start + len(labels)], np.float64)
      start += len(labels)
      if np.isnan(loglik_l).any() or np.isposinf(loglik_l).any() or np.isneginf(loglik_l).all():
        # No ranking to read (a model that yields NaN, or no label it can say at all): never a pick.
        scores_text = ", ".join(f"{x!r} {v}" for x, v in zip(labels, loglik_l.tolist()))
        out[i] = records.drop(
            {**batch[i], "annotated": "label"}, STAGE, "label: bad score", f"log-likelihoods not usable: {scores_text}"
        )
        continue
      pick, confidence = labels[int(np.argmax(loglik_l))], round(margin(loglik_l), 6)
      if confidence < min_confidence:
        out[i] = records.drop(
            {**batch[i], "annotated": "label", "label_confidence": confidence}, STAGE, "label: unsure",
            f"{pick!r} leads by {confidence:.3f} < annotate.label.min_confidence={min_confidence}",
        )
      else:
        out[i] = _labelled(batch[i], pick, label_confidence=confidence)
    return out
  answers = generate(annotator, [chat_of(batch[i]) for i in todo], decoding)
  for i, answer in zip(todo, answers, strict=True):
    problem = failure(answer, decoding.max_new_tokens)
    label = None if problem else parse_label(answer.text, batch[i]["labels"])
    if problem is None and label is None:
      problem = ("off-set", f"{answer.text[:80]!r} names none (or several) of {batch[i]['labels']}")
    if problem:
      out[i] = records.drop({**batch[i], "annotated": "label"}, STAGE, f"label: {problem[0]}", problem[1])
    else:
      out[i] = _labelled(batch[i], label)
  return out
