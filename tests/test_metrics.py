"""Exact match and token F1 agree with the official SQuAD v1.1 evaluation script, reproduced below.

Worked example: 'The Eiffel Tower!' vs 'eiffel tower' normalises to 'eiffel tower' on both sides, so
exact match is 1.0 with "squad" and 0.0 with "whitespace".
"""

import collections
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.errors import ConfigError
from sft.evaluator.metrics import exact_match, mean_token_f1, normalize_answer, token_f1

# --- the official script (SQuAD v1.1 evaluate-v1.1.py), logic reproduced verbatim ------------------


def squad_normalize_answer(s):
  """Lower text and remove punctuation, articles and extra whitespace."""

  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  def lower(text):
    return text.lower()

  return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction, ground_truth):
  prediction_tokens = squad_normalize_answer(prediction).split()
  ground_truth_tokens = squad_normalize_answer(ground_truth).split()
  if not prediction_tokens or not ground_truth_tokens:  # v2.0's rule for empty answers (v1.1 returned 0)
    return int(prediction_tokens == ground_truth_tokens)
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  f1 = (2 * precision * recall) / (precision + recall)
  return f1


def squad_exact_match_score(prediction, ground_truth):
  return squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth)


# --- answers: words, articles in any case, punctuation glued on or alone, unicode, odd whitespace --

PIECES = st.one_of(
    st.sampled_from(["the", "The", "THE", "a", "A", "an", "An", "theater", "anA", "Eiffel", "tower", "naïve", "ÉCOLE", "日本"]),
    st.sampled_from([" ", "  ", "\n", "\t", "\u00a0", "\u2003"]),
    st.sampled_from(list(string.punctuation) + ["’", "“", "—", "¿", "…"]),
    st.text(max_size=4),
)
ANSWERS = st.lists(PIECES, max_size=12).map("".join)
SOME = settings(max_examples=400, deadline=None)


@SOME
@given(text=ANSWERS)
def test_normalize_answer_is_the_official_one(text):
  assert normalize_answer(text) == squad_normalize_answer(text)
  assert normalize_answer(text, "whitespace") == " ".join(text.split())


@SOME
@given(prediction=ANSWERS, reference=ANSWERS)
def test_exact_match_and_f1_are_the_official_scores(prediction, reference):
  assert exact_match([prediction], [reference]) == float(squad_exact_match_score(prediction, reference))
  assert token_f1(prediction, reference) == pytest.approx(squad_f1_score(prediction, reference))


@SOME
@given(pairs=st.lists(st.tuples(ANSWERS, ANSWERS), min_size=1, max_size=5))
def test_means_over_pairs(pairs):
  predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
  expected_em = sum(squad_exact_match_score(p, r) for p, r in pairs) / len(pairs)
  expected_f1 = sum(squad_f1_score(p, r) for p, r in pairs) / len(pairs)
  assert exact_match(predictions, references) == pytest.approx(expected_em)
  assert mean_token_f1(predictions, references) == pytest.approx(expected_f1)


def test_worked_examples():
  assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert exact_match(["The Eiffel Tower!"], ["eiffel tower"]) == 1.0
  assert exact_match(["The Eiffel Tower!"], ["eiffel tower"], normalization="whitespace") == 0.0
  assert exact_match(["  The Eiffel\nTower!"], ["The Eiffel Tower!"], normalization="whitespace") == 1.0
  assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
  assert token_f1("a b c", "a c d", normalization="whitespace") == pytest.approx(2 / 3)
  assert normalize_answer("the-end of an era") == "theend of era"  # punctuation goes before articles
  assert token_f1("The!", "an") == 1.0 and token_f1("The!", "cat") == 0.0  # empty after normalising


def test_unknown_normalization_is_a_config_error_naming_the_choices():
  with pytest.raises(ConfigError, match="squad.*whitespace"):
    normalize_answer("x", "lower")
  with pytest.raises(ConfigError, match="'lower'"):
    exact_match(["x"], ["x"], normalization="lower")
  with pytest.raises(ConfigError):
    mean_token_f1(["x"], ["x"], normalization="")


def test_mismatched_or_empty_inputs_are_errors():
  with pytest.raises(ValueError, match="2 predictions for 1"):
    exact_match(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="empty"):
    mean_token_f1([], [])
