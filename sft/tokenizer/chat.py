"""The chat protocol: what a chat record is, and what every tokenizer offers the pipeline, the
evaluator and serving. The built-in SentencePiece `Tokenizer` and `HFTokenizer` both implement it."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]

# Chat markup of this project and of common chat formats (ChatML, Llama 2, Llama 3, Mistral, Gemma):
# text that holds these was likely written for, or against, some model's chat format.
KNOWN_CONTROL_STRINGS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
            "<|im_start|>", "<|im_end|>",
            "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>",
            "[INST]", "[/INST]",
            "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
        ]
    )
)  # fmt: skip


class TokenizerFailure(ValueError):
  """The tokenizer library failed on a text (a Rust panic included): a fault of that record, which the
  data builder rejects and training reports with the record named."""


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


@runtime_checkable
class ChatTokenizer(Protocol):
  """Text <-> ids, and chats -> (tokens, loss mask) in the tokenizer's own chat format."""

  pad_id: int

  @property
  def vocab_size(self) -> int: ...

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end an answer at generation time: the eos and the end-of-turn token(s) the chat format
    writes right after an assistant message (a model fine-tuned on chats emits those, not the eos)."""
    ...

  @property
  def control_strings(self) -> tuple[str, ...]:
    """The strings that are control (special) tokens; only the chat format writes them as such."""
    ...

  def encode(self, text: str) -> list[int]:
    """Plain text: control strings in it are spelled out with ordinary tokens."""
    ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def tokenize_chat(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """(int32[L] tokens, int32[L] loss mask): 1 on the tokens the assistant writes. Message content is
    plain text: only the chat format's own markup becomes control tokens."""
    ...

  def tokenize_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32[L] tokens, int32[L] loss mask) of plain text for pretraining: every token learned."""
    ...

  def render_prompt(self, messages: Sequence[Message]) -> tuple[list[int], str]:
    """(prompt tokens up to where the last, assistant turn starts, that turn's text as reference)."""
    ...
