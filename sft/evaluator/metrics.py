"""Text metrics over (prediction, reference) pairs, with SQuAD's answer normalisation by default.

"squad" is the official SQuAD v1.1 evaluation script's `normalize_answer`: lowercase, drop
`string.punctuation`, drop the articles a/an/the as whole words, collapse whitespace. So

    exact_match(["The Eiffel Tower!"], ["eiffel tower"]) == 1.0     ("the" and "!" go)
    token_f1("The cat sat.", "a cat sat down") == 0.8                 (2 common of 2 and 3 tokens)

"whitespace" only collapses whitespace: the same pair has exact match 0.0.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

from sft.errors import ConfigError

NORMALIZATIONS = ("squad", "whitespace")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
  """Whitespace-insensitive comparison: '  a\\n b ' -> 'a b'."""
  return " ".join(text.split())


def _squad(text: str) -> str:
  # The official order matters: lowercase before articles ("The"), punctuation before them ("the-end" stays).
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return normalize(_ARTICLES.sub(" ", text))


def normalize_answer(text: str, mode: str = "squad") -> str:
  """`text` as compared: 'The  Eiffel Tower!' -> 'eiffel tower' ("squad") or 'The Eiffel Tower!' ("whitespace")."""
  if mode == "squad":
    return _squad(text)
  if mode == "whitespace":
    return normalize(text)
  raise ConfigError(f"eval.answer_normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not references:
    raise ValueError("a metric over an empty set is undefined")


def exact_match(predictions: Sequence[str], references: Sequence[str], normalization: str = "squad") -> float:
  """Fraction of predictions equal to their reference after `normalize_answer`."""
  _check_pairs(predictions, references)
  same = (normalize_answer(p, normalization) == normalize_answer(r, normalization) for p, r in zip(predictions, references))
  return sum(same) / len(references)


def token_f1(prediction: str, reference: str, normalization: str = "squad") -> float:
  """SQuAD's F1 over the normalised text's `split()` tokens: 'a b c' vs 'a c d' -> 2/3 ("whitespace").

  Two empty answers score 1.0, one empty answer 0.0 (SQuAD v2.0's rule; v1.1 gave 0.0 to both)."""
  pred = normalize_answer(prediction, normalization).split()
  ref = normalize_answer(reference, normalization).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def mean_token_f1(predictions: Sequence[str], references: Sequence[str], normalization: str = "squad") -> float:
  _check_pairs(predictions, references)
  return sum(token_f1(p, r, normalization) for p, r in zip(predictions, references)) / len(references)
