"""What an annotator is: a model behind one small interface, whatever runs it.

    annotator.generate(chats, decoding) -> [Generation(text, finished), ...]   one per chat, in order
    annotator.log_likelihoods(chats, answers) -> [float, ...]                  one per (chat, answer) pair
    annotator.fingerprint                                                      what the cache is keyed by

A chat is a list of messages ({"role", "content"}) that ends with a user turn; the annotator renders it
with its own chat template, so a prompt reads to the model as its own training data did. The backends:
a training workdir of this project and a local Hugging Face folder (`sft.annotator.local`), and an
OpenAI-compatible server (`sft.annotator.endpoint`), which cannot score (no `log_likelihoods`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Protocol, Sequence

Chat = Sequence[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How a generation is decoded; part of every cache key and recorded in the build's manifest.
  temperature 0 is greedy. A sampled row's randomness comes from `seed` and its own prompt, never from
  the rows it happens to share a batch with, so a rerun (or a cached half of one) gives the same text."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0

  def __post_init__(self):
    # Checked, never coerced: the cache key must read the value a backend is sent (16.9 is not 16).
    for name in ("max_new_tokens", "top_k", "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Decoding.{name} must be an integer, got {value!r}")
    for name in ("temperature", "top_p"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Decoding.{name} must be a finite number, got {value!r}")

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Generation:
  """One answer: its text (the end-of-turn token and what follows it removed), and whether the model
  ended it (False: cut off at `max_new_tokens`, which the annotation tasks reject as "truncated").
  `error`: why there is no answer (a request to a server that still failed after its retries, an
  answer that broke the API's shape); the tasks drop such a record, counted as "annotator error"."""

  text: str
  finished: bool
  error: str = ""


class Annotator(Protocol):
  """The interface the annotation tasks and the audit's machine reviewer are written against."""

  fingerprint: str  # changes with the weights, the tokenizer or the backend: a different annotator misses the cache

  def generate(self, chats: Sequence[Chat], decoding: Decoding) -> list[Generation]: ...

  def log_likelihoods(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[float]:
    """The summed log-probability of each answer as the assistant turn after its chat, its end of turn
    included (the tokens training puts the loss on): what the label task ranks a label set by."""
    ...


class AnnotatorError(RuntimeError):
  """A backend broke its contract (e.g. returned fewer answers than it was given prompts): never a silent skip."""


def _is_generation(x: Any) -> bool:
  return (
      isinstance(getattr(x, "text", None), str) and isinstance(getattr(x, "finished", None), bool)
      and isinstance(getattr(x, "error", ""), str)
  )


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


# What each kind of output must be, and how to say so.
_KINDS = {
    "answers": (_is_generation, "a Generation(text, finished)"),
    "generations": (_is_generation, "a Generation(text, finished)"),
    "log-likelihoods": (_is_number, "a number"),
}


def check_count(what: str, got: Any, expected: int) -> None:
  """An AnnotatorError unless `got` holds exactly `expected` outputs of the kind `what` names (an
  annotator written by a user may return anything; its answers are read only once they pass)."""
  if not (hasattr(got, "__len__") and hasattr(got, "__getitem__")) or isinstance(got, (str, bytes, dict)):
    raise AnnotatorError(f"the annotator returned {type(got).__name__} for {expected} prompts, not a list of {what}")
  if len(got) != expected:
    raise AnnotatorError(f"the annotator returned {len(got)} {what} for {expected} prompts")
  is_kind, described = _KINDS.get(what, (lambda x: True, ""))
  bad = next((i for i, x in enumerate(got) if not is_kind(x)), None)
  if bad is not None:
    raise AnnotatorError(f"the annotator's {what} {bad + 1} of {expected} is {type(got[bad]).__name__} {got[bad]!r:.60}, not {described}")
