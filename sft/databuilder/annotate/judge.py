"""judge: the annotator scores every kept chat from 1 to 5 against a rubric (the config's text); the
score is kept as `judge_score`, its distribution is in the report, and a chat below `min_score` is
dropped ("low score"), as is one whose answer holds no score ("unreadable score"), was cut at
max_new_tokens ("truncated"), is empty, or failed ("annotator error")."""

from __future__ import annotations

import re
from typing import Any

from sft.databuilder import records
from sft.databuilder.annotate.common import JUDGE_STAGE, failure, generate

DEFAULT_RUBRIC = (
    "5: correct, complete and helpful; 4: correct with small gaps; 3: partly correct or unclear; "
    "2: mostly wrong or unhelpful; 1: wrong, harmful or off-topic."
)
PROMPT = (
    "Score the response to the instruction from 1 to 5 with this rubric.\n\nRubric: {rubric}\n\n"
    "Instruction: {prompt}\n\nResponse: {response}\n\nReply with the score only."
)
# A digit 1-5 standing alone: not part of a number ("10", "4.5", "4,5") nor the start of a range ("1-5",
# "1 to 5"); a full stop after it ends a sentence.
_DIGIT = r"(?<![\d.])(?<!\d,)([1-5])(?!\d|[.,]\d|\s*(?:-|\u2013|to)\s*\d)"
_STATED = re.compile(rf"\bscore\W{{0,4}}(?:is|of|=)?\W{{0,4}}{_DIGIT}|{_DIGIT}\s*(?:/|out of)\s*5(?!\d|[.,]\d)", re.IGNORECASE)
# What is no score: the scale ("1 to 5", "(1-5)") and fractions of another scale ("2/10").
_NOT_A_SCORE = re.compile(r"(?<![\d.])1\s*(?:-|\u2013|to)\s*5(?!\d)|(?<![\d.])\d+(?:[.,]\d+)?\s*(?:/|out of)\s*\d+", re.IGNORECASE)
_LEADING = re.compile(rf"^\W*{_DIGIT}(?!\s*(?:/|out of)\s*\d)", re.IGNORECASE)


def parse_score(text: str) -> int | None:
  """The score an answer gives, 1-5; None when it gives none or contradicts itself. In this order: a
  stated one ("Score: 4.", "the score is 5", "4/5", "3 out of 5", every one it states agreeing), the
  digit the answer starts with ("4", "**4**, because ..."), else the one lone digit 1-5 left once the
  scale ("on a scale of 1 to 5") and other fractions ("2/10") are set aside, several equal ones included.

      parse_score("Score: 4.") -> 4;  parse_score("On a scale of 1 to 5, I give it 4.") -> 4
      parse_score("2/10") -> None;  parse_score("4.5") -> None;  parse_score("maybe 3, maybe 2") -> None
  """
  stated = {int(a or b) for a, b in _STATED.findall(text)}
  if stated:
    return stated.pop() if len(stated) == 1 else None
  leading = _LEADING.match(text)
  if leading:
    return int(leading.group(1))
  lone = {int(x) for x in re.findall(_DIGIT, _NOT_A_SCORE.sub(" ", text))}
  return lone.pop() if len(lone) == 1 else None


def judge_batch(batch: list[records.Record], annotator: Any, decoding: Any, rubric: str, min_score: int) -> list[records.Record]:
  """Every live chat of the batch scored (or dropped, with the reason)."""
  todo = [i for i, r in enumerate(batch) if not records.is_dropped(r) and r["kind"] == "chat"]
  if not todo:
    return batch
  chats = []
  for i in todo:
    prompt, response = records.prompt_and_response(batch[i])
    chats.append([{"role": "user", "content": PROMPT.format(rubric=rubric, prompt=prompt, response=response)}])
  out = list(batch)
  for i, answer in zip(todo, generate(annotator, chats, decoding), strict=True):
    problem = failure(answer, decoding.max_new_tokens)  # an error, a verdict cut short, or none at all
    score = None if problem else parse_score(answer.text)
    if problem:
      out[i] = records.drop(batch[i], JUDGE_STAGE, problem[0], problem[1])
    elif score is None:
      out[i] = records.drop(batch[i], JUDGE_STAGE, "unreadable score", repr(answer.text[:80]))
    elif score < min_score:
      out[i] = records.drop({**batch[i], "judge_score": score}, JUDGE_STAGE, "low score", f"{score} < {min_score}")
    else:
      out[i] = {**batch[i], "judge_score": score}
  return out
