"""fill: a record read without its response (an alpaca row with an empty output, a chat ending in a user
turn) gets the annotator's answer as its last turn.

    {"instruction": "Write a haiku about rain.", "output": ""}
      -> user "Write a haiku about rain."  assistant <the annotator's haiku>   annotated: "response"

Without an annotator such records are dropped ("missing response"); an answer cut off at
max_new_tokens ("fill: truncated") or empty ("fill: empty") is dropped with its reason.
"""

from __future__ import annotations

from typing import Any

from sft.databuilder import records
from sft.databuilder.annotate.common import STAGE, chat_of, failure, generate, pending, without_annotator


def fill_responses(batch: list[records.Record], annotator: Any, decoding: Any) -> list[records.Record]:
  """The batch with every live record marked needs_response answered (or dropped, with the reason)."""
  todo = pending(batch, "needs_response")
  if not todo:
    return batch
  if annotator is None:
    return without_annotator(batch, todo, "missing response", "no annotate.model to write it")
  out = list(batch)
  answers = generate(annotator, [chat_of(batch[i]) for i in todo], decoding)
  for i, answer in zip(todo, answers, strict=True):
    record = {k: v for k, v in batch[i].items() if k != "needs_response"}
    problem = failure(answer, decoding.max_new_tokens)
    if problem:
      out[i] = records.drop({**record, "annotated": "response"}, STAGE, f"fill: {problem[0]}", problem[1])
      continue
    out[i] = {**record, "messages": [*record["messages"], {"role": "assistant", "content": answer.text}], "annotated": "response"}
  return out
