"""Text metrics over (prediction, reference) pairs."""

from __future__ import annotations

import collections
from typing import Sequence


def normalize(text: str) -> str:
  """Whitespace-insensitive comparison: '  a\\n b ' -> 'a b'."""
  return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference after `normalize`."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not references:
    raise ValueError("exact match of an empty set is undefined")
  return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD-style F1 over whitespace tokens: 'a b c' vs 'a c d' -> precision 2/3, recall 2/3, F1 2/3."""
  pred, ref = normalize(prediction).split(), normalize(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def mean_token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
  if len(predictions) != len(references) or not references:
    raise ValueError(f"need as many predictions as references, and at least one; got {len(predictions)}, {len(references)}")
  return sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(references)
