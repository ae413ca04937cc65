"""judge: the annotator scores every kept chat from 1 to 5 against a rubric (the config's text); the
score is kept as `judge_score`, its distribution is in the report, and a chat below `min_score` is
dropped ("low score"), as is one whose answer holds no score ("unreadable score")."""

from __future__ import annotations

import re
from typing import Any

from sft.databuilder import records
from sft.databuilder.annotate.common import JUDGE_STAGE, generate

DEFAULT_RUBRIC = (
    "5: correct, complete and helpful; 4: correct with small gaps; 3: partly correct or unclear; "
    "2: mostly wrong or unhelpful; 1: wrong, harmful or off-topic."
)
PROMPT = (
    "Score the response to the instruction from 1 to 5 with this rubric.\n\nRubric: {rubric}\n\n"
    "Instruction: {prompt}\n\nResponse: {response}\n\nReply with the score only."
)
_SCORE = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def parse_score(text: str) -> int | None:
  """The first lone digit 1-5 of an answer ("Score: 4", "4/5" -> 4); None when there is none."""
  match = _SCORE.search(text)
  return int(match.group(1)) if match else None


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
    score = parse_score(answer.text)
    if answer.error:  # the request failed (an endpoint's error after its retries): no verdict to read
      out[i] = records.drop(batch[i], JUDGE_STAGE, "annotator error", answer.error)
    elif score is None:
      out[i] = records.drop(batch[i], JUDGE_STAGE, "unreadable score", repr(answer.text[:80]))
    elif score < min_score:
      out[i] = records.drop({**batch[i], "judge_score": score}, JUDGE_STAGE, "low score", f"{score} < {min_score}")
    else:
      out[i] = {**batch[i], "judge_score": score}
  return out
