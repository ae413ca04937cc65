"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores its multiple-choice tasks.

A record with `choices` (a cloze record's candidates) is scored without generating: each candidate is
put in the assistant turn, and the model's log-likelihood of the turn's tokens (the candidate and the
end of turn that closes it: the loss-masked tokens) is summed. The model's pick is the candidate with
the highest sum ("acc"), or with the highest sum per byte of candidate text ("acc_norm": long
candidates are not penalised for their length). Ranks are 1 for the best; ties count against the gold:

    candidates ["Rome", "Paris", "Oslo"], gold "Paris", log-likelihoods [-3.0, -1.2, -1.2]
    -> gold rank 2 (Oslo ties it), the pick is Paris (argmax takes the first), accuracy 1
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from sft.errors import ConfigError
from sft.tokenizer import ChatTokenizer

SKIP_NOT_AMONG = "answer not among the choices"
SKIP_TOO_LONG = "longer than seq_len"


@dataclasses.dataclass
class ChoiceRows:
  """One row per (item, candidate), each a whole (unpacked) sequence of `seq_len` tokens."""

  batch: dict[str, np.ndarray]  # (R, T): inputs, targets, loss_mask, segment_ids, positions
  item_r: np.ndarray  # the item each row scores
  items: list[dict[str, Any]]  # per item: record index, choices, gold index
  skipped: dict[str, int]  # reason -> items left out

  def __len__(self) -> int:
    return len(self.item_r)


def _with_answer(messages: Sequence[dict[str, str]], answer: str) -> list[dict[str, str]]:
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return [*messages[:last], {"role": "assistant", "content": answer}]


def choice_rows(records: Sequence[dict[str, Any]], indices: Sequence[int], tokenizer: ChatTokenizer, seq_len: int) -> ChoiceRows:
  """The rows for every record of `indices` that has choices. An item whose reference is not among its
  choices, or whose longest candidate does not fit in `seq_len`, is left out and counted."""
  rows: dict[str, list[np.ndarray]] = {k: [] for k in ("inputs", "targets", "loss_mask")}
  item_r, lengths_r, items, skipped = [], [], [], {SKIP_NOT_AMONG: 0, SKIP_TOO_LONG: 0}
  for index in indices:
    record = records[index]
    choices = record.get("choices")
    if not choices:
      continue
    reference = record["messages"][max(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")]["content"]
    if reference not in choices:  # cleaning changed the answer, or the record was written by hand
      skipped[SKIP_NOT_AMONG] += 1
      continue
    try:
      encoded = [tokenizer.tokenize_chat(_with_answer(record["messages"], c)) for c in choices]
    except ValueError as err:  # a template's refusal, TokenizerFailure: name the record, not a traceback
      raise ConfigError(f"eval record {record.get('id', f'#{index}')!r}: {err}") from None
    if any(len(tokens) > seq_len + 1 for tokens, _ in encoded):
      skipped[SKIP_TOO_LONG] += 1
      continue
    for tokens, mask in encoded:
      n = len(tokens) - 1
      for key, values in (("inputs", tokens[:-1]), ("targets", tokens[1:]), ("loss_mask", mask[1:])):
        row = np.zeros(seq_len, np.int32)
        row[:n] = values
        rows[key].append(row)
      item_r.append(len(items))
      lengths_r.append(n)
    items.append({"record": index, "choices": list(choices), "gold": choices.index(reference)})
  batch = {k: np.stack(v) if v else np.zeros((0, seq_len), np.int32) for k, v in rows.items()}
  real_rt = (np.arange(seq_len)[None, :] < np.asarray(lengths_r, np.int32).reshape(-1, 1)).astype(np.int32)
  batch["segment_ids"] = real_rt
  batch["positions"] = np.cumsum(real_rt, axis=1, dtype=np.int32) - real_rt  # 0, 1, 2, ... then 0 on padding
  return ChoiceRows(batch, np.asarray(item_r, np.int64), items, {k: v for k, v in skipped.items() if v})


def choice_metrics(loglik_r: np.ndarray, rows: ChoiceRows) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """(metrics, per item: choices, log-likelihoods, pick, gold rank) from each row's summed log-likelihood."""
  per_item = []
  for k, item in enumerate(rows.items):
    loglik_c = np.asarray(loglik_r[rows.item_r == k], np.float64)
    per_byte_c = loglik_c / np.asarray([max(len(c.encode("utf-8")), 1) for c in item["choices"]])
    gold = item["gold"]
    per_item.append({
        **item,
        "loglik": loglik_c.tolist(),
        "pick": int(np.argmax(loglik_c)),
        "pick_norm": int(np.argmax(per_byte_c)),
        "gold_rank": int(np.sum(loglik_c >= loglik_c[gold])),  # itself and every candidate at least as likely
    })
  return summary(per_item), per_item


def summary(per_item: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Accuracy (argmax log-likelihood), accuracy per byte, mean gold rank and item count of ranked items."""
  if not per_item:
    return {}
  n = len(per_item)
  return {
      "choice_accuracy": sum(i["pick"] == i["gold"] for i in per_item) / n,
      "choice_accuracy_norm": sum(i["pick_norm"] == i["gold"] for i in per_item) / n,
      "gold_rank": sum(i["gold_rank"] for i in per_item) / n,
      "choice_items": float(n),
  }
