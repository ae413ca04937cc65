"""Records -> token arrays, as small pure functions and the grain transforms that call them.

A chat record is `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`;
a text record (for pretraining) is `{"text": ...}`. Both become

    {"inputs": int32[L], "targets": int32[L], "loss_mask": int32[L]}

with `targets[i] == inputs[i + 1]` of the underlying token sequence, and a loss mask that is 1 only
where the target is a token the model should learn to produce.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from sft.pipeline.tokenizer import BOS_ID, EOS_ID, Tokenizer

ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any) -> str | None:
  """Returns why `messages` is not a usable chat, or None if it is."""
  if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
    return "messages must be a non-empty list"
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      return f"message {i} is not an object"
    if message.get("role") not in ROLES:
      return f"message {i} has role {message.get('role')!r}, expected one of {ROLES}"
    if not isinstance(message.get("content"), str) or not message["content"].strip():
      return f"message {i} has empty or non-string content"
  if not any(m["role"] == "assistant" for m in messages):
    return "no assistant turn to learn from"
  return None


def tokenize_chat(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Renders a chat as tokens and marks the tokens the model is trained to produce.

  Every turn is `<|role|> content <|end|>`; the assistant's content and its closing `<|end|>` (the
  stop token at generation time) are in the loss, everything else is prompt.

      messages  = [user: "hi", assistant: "yo"]        ("hi" -> [h, i], "yo" -> [y, o])
      tokens    = [BOS, <|user|>, h, i, <|end|>, <|assistant|>, y, o, <|end|>]
      loss_mask = [ 0,     0,     0, 0,    0,         0,        1, 1,    1   ]
  """
  reason = validate_messages(messages)
  if reason:
    raise ValueError(f"invalid chat record: {reason}")
  tokens, mask = [BOS_ID], [0]
  for message in messages:
    turn = _render_turn(message, tokenizer)
    learn = int(message["role"] == "assistant")
    tokens += turn
    mask += [0] + [learn] * (len(turn) - 1)  # the role marker is prompt; content and <|end|> are learned
  return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)


def _render_turn(message: Mapping[str, str], tokenizer: Tokenizer) -> list[int]:
  return [tokenizer.role_ids[message["role"]], *tokenizer.encode(message["content"]), tokenizer.end_id]


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> tuple[list[int], str]:
  """(prompt tokens, reference answer) for a chat whose last turn is the assistant's.

  The prompt is every turn before the last, rendered as in training, then `<|assistant|>`, so the
  model's next tokens are its answer:

      messages = [user: "hi", assistant: "yo"]
      prompt   = [BOS, <|user|>, h, i, <|end|>, <|assistant|>]     reference = "yo"
  """
  reason = validate_messages(messages)
  if reason or messages[-1]["role"] != "assistant":
    raise ValueError(f"cannot make a prompt from this chat: {reason or 'the last turn is not the assistant'}")
  tokens = [BOS_ID]
  for message in messages[:-1]:
    tokens += _render_turn(message, tokenizer)
  return [*tokens, tokenizer.role_ids["assistant"]], messages[-1]["content"]


def tokenize_text(text: str, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Plain text for pretraining: every token after BOS is learned.

      text      = "ab"                 ("ab" -> [a, b])
      tokens    = [BOS, a, b, EOS]
      loss_mask = [ 1,  1, 1,  1 ]     (position 0 is dropped by the shift)
  """
  if not isinstance(text, str) or not text.strip():
    raise ValueError("invalid text record: empty or non-string text")
  tokens = [BOS_ID, *tokenizer.encode(text), EOS_ID]
  return np.asarray(tokens, np.int32), np.ones(len(tokens), np.int32)


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


def tokenize_record(record: Mapping[str, Any], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Any tokenizer with `tokenize_chat` and `tokenize_text` (the built-in one or an HFTokenizer)."""
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

  tokenizer: Any  # Tokenizer or HFTokenizer
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
