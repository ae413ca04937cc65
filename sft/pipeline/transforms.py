"""Records -> token arrays, as small pure functions and the grain transforms that call them.

A chat record is `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`;
a text record (for pretraining) is `{"text": ...}`. Both become

    {"inputs": int32[L], "targets": int32[L], "loss_mask": int32[L]}

with `targets[i] == inputs[i + 1]` of the underlying token sequence, and a loss mask that is 1 only
where the target is a token the model should learn to produce.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

from sft.errors import ConfigError
from sft.tokenizer.chat import ChatTokenizer


def shift_and_truncate(tokens: np.ndarray, loss_mask: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
  """Next-token pairs, at most `max_len` long: the target at i is token i + 1.

      tokens    = [2, 5, 6, 7, 8]      loss_mask = [0, 0, 1, 1, 1]      max_len = 3
      inputs    = [2, 5, 6]            (tokens[:4][:-1])
      targets   = [5, 6, 7]            (tokens[:4][1:])
      loss_mask = [0, 1, 1]            (loss_mask[:4][1:])
  """
  if len(tokens) != len(loss_mask):
    raise ValueError(f"tokens ({len(tokens)}) and loss_mask ({len(loss_mask)}) differ in length")
  if len(tokens) < 2:
    raise ValueError("a sequence needs at least two tokens to make a next-token pair")
  tokens, loss_mask = tokens[: max_len + 1], loss_mask[: max_len + 1]
  return {
      "inputs": tokens[:-1].astype(np.int32),
      "targets": tokens[1:].astype(np.int32),
      "loss_mask": loss_mask[1:].astype(np.int32),
  }


def tokenize_record(record: Mapping[str, Any], tokenizer: ChatTokenizer) -> tuple[np.ndarray, np.ndarray]:
  """A chat or text record as (tokens, loss mask), in the tokenizer's own chat format. A record that
  cannot be tokenized (invalid, refused by the chat template, or failing in the tokenizer library) is a
  ConfigError naming it."""
  try:
    return _tokenize(record, tokenizer)
  except ValueError as err:  # ConfigError and TokenizerFailure included
    name = record.get("id") if isinstance(record, Mapping) else None
    raise ConfigError(f"record {name!r}: {err}" if name is not None else f"a record without an id: {err}") from None


def _tokenize(record: Mapping[str, Any], tokenizer: ChatTokenizer) -> tuple[np.ndarray, np.ndarray]:
  if "messages" in record:
    return tokenizer.tokenize_chat(record["messages"])
  if "text" in record:
    if not isinstance(record["text"], str) or not record["text"].strip():
      raise ValueError("invalid text record: empty or non-string text")
    return tokenizer.tokenize_text(record["text"])
  raise ValueError(f"record has neither 'messages' nor 'text': keys {sorted(record)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeAndShift(grain.transforms.Map):
  """grain transform: record -> {inputs, targets, loss_mask}, truncated to `max_len`."""

  tokenizer: ChatTokenizer
  max_len: int

  def map(self, record):
    tokens, loss_mask = tokenize_record(record, self.tokenizer)
    return shift_and_truncate(tokens, loss_mask, self.max_len)


def unpack_features(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packing outputs to the model's batch keys.

  Packing emits `<feature>_segment_ids` / `<feature>_positions` for every feature; they are equal
  across features, so the `inputs_` ones are kept as `segment_ids` and `positions`.
  """
  return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "loss_mask": packed["loss_mask"].astype(np.int32),
      "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
      "positions": packed["inputs_positions"].astype(np.int32),
  }
