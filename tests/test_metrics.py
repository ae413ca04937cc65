"""Exact match and token F1 agree with the official SQuAD v1.1 evaluation script, reproduced below; the
classification report with scikit-learn, ROUGE with rouge_score, BLEU and chrF with sacrebleu.

Worked example: 'The Eiffel Tower!' vs 'eiffel tower' normalises to 'eiffel tower' on both sides, so
exact match is 1.0 with "squad" and 0.0 with "whitespace".
"""

import collections
import math
import re
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sft.errors import ConfigError
from sft.evaluator.metrics import (
    NO_LABEL,
    bleu,
    bleu_statistic,
    chrf,
    chrf_statistic,
    classification_codes,
    classification_report,
    exact_match,
    exact_match_per_item,
    f1_of_codes,
    mean_token_f1,
    normalize_answer,
    perplexity,
    rouge,
    rouge_per_item,
    token_f1,
    token_f1_per_item,
)

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
  for mode in ("squad", "whitespace"):  # the per-item values that intervals resample
    want = exact_match(predictions, references, mode)
    assert exact_match_per_item(predictions, references, mode).mean() == pytest.approx(want)
    assert token_f1_per_item(predictions, references, mode).tolist() == [token_f1(p, r, mode) for p, r in pairs]


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


# --- classification: against scikit-learn ----------------------------------------------------------

LABEL_ANSWERS = ["yes", "Yes!", "the yes", "no", "NO.", "maybe", "Neutral"]  # normalise to yes / no / maybe / neutral
OUTSIDE = ["dunno", "", "the", "yes no", "noo"]  # normalise to no label
FEWER = settings(max_examples=100, deadline=None)  # sklearn is slow per call


def sklearn_report(preds, refs, labels):
  """sklearn on normalised strings; `labels=` keeps out-of-set predictions out of every class, as we define."""
  p, r, f, s = precision_recall_fscore_support(refs, preds, labels=labels, average=None, zero_division=0.0)
  macro = precision_recall_fscore_support(refs, preds, labels=labels, average="macro", zero_division=0.0)
  micro = precision_recall_fscore_support(refs, preds, labels=labels, average="micro", zero_division=0.0)
  sentinel = "\x00 outside"  # no label normalises to it
  mapped = [x if x in labels else sentinel for x in preds]
  matrix = confusion_matrix(refs, mapped, labels=[*labels, sentinel])[: len(labels)]
  return accuracy_score(refs, preds), p, r, f, s, macro[:3], micro[:3], matrix


def check_against_sklearn(report, predictions, references):
  preds = [normalize_answer(x) for x in predictions]
  refs = [normalize_answer(x) for x in references]
  labels = report["labels"]
  accuracy, p, r, f, s, macro, micro, matrix = sklearn_report(preds, refs, labels)
  assert report["accuracy"] == pytest.approx(accuracy)
  for i, label in enumerate(labels):
    got = report["per_class"][label]
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[i], r[i], f[i]))
    assert got["support"] == s[i]
  assert [report["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(macro))
  assert [report["micro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(micro))
  assert report["confusion_matrix"] == matrix.tolist()
  assert report["confusion_columns"] == [*labels, NO_LABEL]
  assert report["no_label"]["count"] == sum(x not in labels for x in preds)


@FEWER
@given(pairs=st.lists(st.tuples(st.sampled_from(LABEL_ANSWERS + OUTSIDE), st.sampled_from(LABEL_ANSWERS)), min_size=1, max_size=30))
def test_classification_report_is_sklearns_with_the_reference_labels(pairs):
  predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
  report = classification_report(predictions, references)
  assert report["labels"] == sorted({normalize_answer(r) for r in references})
  check_against_sklearn(report, predictions, references)


@FEWER
@given(
    pairs=st.lists(st.tuples(st.sampled_from(LABEL_ANSWERS + OUTSIDE), st.sampled_from(["yes", "no"])), min_size=1, max_size=30),
    order=st.permutations(["Yes", "no", "Maybe", "neutral"]),
)
def test_classification_report_with_given_labels_keeps_unseen_ones(pairs, order):
  predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
  report = classification_report(predictions, references, labels=order)
  assert report["labels"] == [normalize_answer(x) for x in order]
  assert report["per_class"]["maybe"]["support"] == 0  # counted in the macro average all the same
  check_against_sklearn(report, predictions, references)


@FEWER
@given(
    pairs=st.lists(st.tuples(st.sampled_from(LABEL_ANSWERS + OUTSIDE), st.sampled_from(["yes", "no"])), min_size=1),
    order=st.none() | st.permutations(["Yes", "no", "Maybe", "neutral"]),
    picks=st.lists(st.integers(0, 29), min_size=1, max_size=30),
)
def test_f1_of_codes_is_the_reports_on_every_resample(pairs, order, picks):
  """Macro and micro F1 recomputed from label codes, as a bootstrap does, equal the report of those answers
  (with the same label set: a resample may lack a class, which still counts in the macro mean)."""
  predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
  reference_n, answer_n, k = classification_codes(predictions, references, order)
  report = classification_report(predictions, references, order)
  assert k == len(report["labels"]) and (reference_n == answer_n).mean() == report["accuracy"]
  idx_n = np.asarray([i % len(pairs) for i in picks])
  labels = report["labels"]
  resampled = classification_report([predictions[i] for i in idx_n], [references[i] for i in idx_n], labels)
  want = (resampled["macro"]["f1"], resampled["micro"]["f1"])
  assert f1_of_codes(reference_n[idx_n], answer_n[idx_n], k) == pytest.approx(want)


def test_classification_worked_example():
  report = classification_report(["Yes", "no", "maybe", "yes"], ["yes", "yes", "no", "no"])
  assert report["accuracy"] == 0.25
  assert report["labels"] == ["no", "yes"]
  assert report["per_class"]["yes"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
  assert report["per_class"]["no"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
  assert report["micro"]["precision"] == pytest.approx(1 / 3) and report["micro"]["recall"] == 0.25
  assert report["macro"] == {"precision": 0.25, "recall": 0.25, "f1": 0.25}
  assert report["confusion_matrix"] == [[0, 1, 1], [1, 1, 0]]
  assert report["confusion_columns"] == ["no", "yes", NO_LABEL]
  assert report["no_label"] == {"count": 1, "examples": ["maybe"]}
  whitespace = classification_report(["Yes"], ["yes"], normalization="whitespace")
  assert whitespace["accuracy"] == 0.0 and whitespace["no_label"]["count"] == 1


def test_classification_no_label_examples_are_few_and_raw():
  report = classification_report([f"guess {i}!" for i in range(20)], ["yes"] * 20)
  assert report["no_label"]["count"] == 20
  assert report["no_label"]["examples"] == [f"guess {i}!" for i in range(5)]
  assert report["micro"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # nothing predicted inside: 0/0 -> 0


def test_classification_report_rejects_bad_label_sets():
  with pytest.raises(ValueError, match="outside the label set: \\['maybe'\\]"):
    classification_report(["yes"], ["Maybe"], labels=["yes", "no"])
  with pytest.raises(ValueError, match="collide.*'yes'"):
    classification_report(["yes"], ["yes"], labels=["Yes", "yes!"])
  with pytest.raises(ValueError, match="empty after 'squad'"):
    classification_report(["yes"], ["the"])
  with pytest.raises(ValueError, match="labels is empty"):
    classification_report(["yes"], ["yes"], labels=[])
  with pytest.raises(ConfigError):
    classification_report(["yes"], ["yes"], normalization="lower")
  with pytest.raises(ValueError, match="2 predictions for 1"):
    classification_report(["a", "b"], ["a"])


# --- ROUGE: against rouge_score itself -------------------------------------------------------------

SUMMARIES = [
    ("the cat sat", "the cat sat down"),
    ("Police killed the gunman.", "The gunman was shot dead by police."),
    ("Running dogs ran.\nThey were happy.", "The dog runs.\nIt was happy and running."),
    ("", "an empty prediction scores zero"),
    ("naïve café", "naive cafe"),
]


def test_rouge_is_the_mean_of_rouge_score_f_measures():
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
  rows = [scorer.score(ref, pred) for pred, ref in SUMMARIES]
  expected = {k: sum(row[k].fmeasure for row in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
  got = rouge([p for p, _ in SUMMARIES], [r for _, r in SUMMARIES])
  assert got == pytest.approx(expected)
  assert got["rougeLsum"] != pytest.approx(got["rougeL"])  # the two-line pair is scored by sentences


def test_rouge_per_item_is_what_rouge_averages():
  predictions, references = ["the cat sat", "a dog", ""], ["the cat sat down", "the dog ran", "x"]
  per_item = rouge_per_item(predictions, references)
  assert {k: v.mean() for k, v in per_item.items()} == pytest.approx(rouge(predictions, references))
  assert per_item["rouge1"][0] == pytest.approx(2 * 0.75 / 1.75) and per_item["rouge1"][2] == 0.0


def test_rouge_worked_example():
  got = rouge(["the cat sat"], ["the cat sat down"])
  assert got["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)
  assert got["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
  assert got["rougeL"] == got["rougeLsum"] == pytest.approx(2 * 1 * 0.75 / 1.75)  # one line: Lsum is L
  assert rouge(["Dogs running"], ["the dog runs"])["rouge1"] == pytest.approx(0.8)  # stemmed: dog, run match


# --- BLEU and chrF: sacrebleu's README values ------------------------------------------------------

# sacrebleu's README: "BLEU = 48.53 82.4/50.0/45.5/37.5 ...", "chrF2 = 59.73"; with the first reference of the
# first sentence removed, "BLEU = 29.44".
README_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_bleu_and_chrf_match_sacrebleus_readme():
  per_prediction = [list(refs) for refs in zip(*README_REFS)]
  assert bleu(README_SYS, per_prediction) == pytest.approx(48.53, abs=0.005)
  assert chrf(README_SYS, per_prediction) == pytest.approx(59.73, abs=0.005)
  per_prediction[0] = per_prediction[0][1:]  # a variable number of references
  assert bleu(README_SYS, per_prediction) == pytest.approx(29.44, abs=0.005)


def test_corpus_statistics_recompute_bleu_and_chrf_on_any_resample():
  per_prediction = [list(refs) for refs in zip(*README_REFS)]
  for metric, statistic in ((bleu, bleu_statistic), (chrf, chrf_statistic)):
    of_indices = statistic(README_SYS, per_prediction)
    assert of_indices(np.arange(3)) == pytest.approx(metric(README_SYS, per_prediction), abs=1e-9)
    for idx in ([0, 0, 2], [1], [2, 1, 2, 2]):  # a repeated item counts again, as in a bootstrap draw
      want = metric([README_SYS[i] for i in idx], [per_prediction[i] for i in idx])
      assert of_indices(np.asarray(idx)) == pytest.approx(want, abs=1e-9), (metric.__name__, idx)


def test_bleu_and_chrf_with_one_reference_each():
  import sacrebleu

  references = README_REFS[0]
  assert bleu(README_SYS, references) == pytest.approx(sacrebleu.corpus_bleu(README_SYS, [references]).score)
  assert chrf(README_SYS, references) == pytest.approx(sacrebleu.corpus_chrf(README_SYS, [references]).score)
  assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
  assert chrf(["a b"], ["a b"]) == pytest.approx(100.0)
  assert bleu(["a b"], ["a b"]) == 0.0  # no 4-grams in the corpus
  with pytest.raises(ValueError, match="at least one reference"):
    bleu(["a"], [[]])
  with pytest.raises(ValueError, match="empty"):
    chrf([], [])


# --- perplexity ------------------------------------------------------------------------------------


def test_perplexity():
  assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)  # uniform over 4 choices
  assert perplexity(0.0, 7) == 1.0
  assert perplexity(1e6, 1) == pytest.approx(1.7976931348623157e308)  # capped, not OverflowError
  assert math.isfinite(perplexity(float("inf"), 3))
  with pytest.raises(ValueError, match="at least one token, got 0"):
    perplexity(1.0, 0)
  with pytest.raises(ValueError, match=">= 0"):
    perplexity(-1.0, 2)
  with pytest.raises(ValueError, match=">= 0"):
    perplexity(float("nan"), 2)
