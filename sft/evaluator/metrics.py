"""Text metrics over (prediction, reference) pairs, with SQuAD's answer normalisation by default.

"squad" is the official SQuAD v1.1 evaluation script's `normalize_answer`: lowercase, drop
`string.punctuation`, drop the articles a/an/the as whole words, collapse whitespace. So

    exact_match(["The Eiffel Tower!"], ["eiffel tower"]) == 1.0     ("the" and "!" go)
    token_f1("The cat sat.", "a cat sat down") == 0.8                 (2 common of 2 and 3 tokens)

"whitespace" only collapses whitespace: the same pair has exact match 0.0.

Also here: `classification_report` (answers from a closed label set), `rouge` (summaries), `bleu` and `chrf`
(translations, sacrebleu's 0-100 scale) and `perplexity`. rouge_score and sacrebleu are imported only when
their metric runs, so importing this module stays cheap.

For intervals (sft/evaluator/stats.py) each figure also comes per item, computed once: `exact_match_per_item`,
`token_f1_per_item`, `rouge_per_item`; and where a figure is no mean of items, as a function of item indices
that recomputes it on any resample: `bleu_statistic`, `chrf_statistic`, and `f1_of_codes` over
`classification_codes`.
"""

from __future__ import annotations

import collections
import math
import re
import string
import sys
from typing import Callable, Sequence

import numpy as np

from sft.config import ANSWER_NORMALIZATIONS
from sft.errors import ConfigError

NORMALIZATIONS = ANSWER_NORMALIZATIONS  # each implemented by normalize_answer
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


def exact_match_per_item(predictions: Sequence[str], references: Sequence[str], normalization: str = "squad"):
  """1.0 or 0.0 per pair (an array): `exact_match` is their mean."""
  _check_pairs(predictions, references)
  pairs = zip(predictions, references)
  return np.asarray([normalize_answer(p, normalization) == normalize_answer(r, normalization) for p, r in pairs], float)


def token_f1_per_item(predictions: Sequence[str], references: Sequence[str], normalization: str = "squad"):
  """`token_f1` per pair (an array): `mean_token_f1` is their mean."""
  _check_pairs(predictions, references)
  return np.asarray([token_f1(p, r, normalization) for p, r in zip(predictions, references)], np.float64)


# --- classification: answers drawn from a closed label set ----------------------------------------

NO_LABEL = "(no label)"
_NO_LABEL_EXAMPLES = 5


def _label_set(labels: Sequence[str] | None, references: Sequence[str], normalization: str) -> list[str]:
  """Normalised labels in the given order, or the sorted normalised references when `labels` is None."""
  if labels is None:
    return sorted({normalize_answer(r, normalization) for r in references})
  if not labels:
    raise ValueError("labels is empty: pass None to use the set of references")
  normalised = [normalize_answer(label, normalization) for label in labels]
  counts = collections.Counter(normalised)
  clashes = sorted(label for label, n in counts.items() if n > 1)
  if clashes:
    raise ValueError(f"labels collide after {normalization!r} normalisation: {clashes}")
  return normalised


def _ratio(numerator: float, denominator: float) -> float:
  return numerator / denominator if denominator else 0.0  # zero division scores 0.0, as sklearn's zero_division=0.0


def _f1(precision: float, recall: float) -> float:
  return _ratio(2 * precision * recall, precision + recall)


def _confusion(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
  index = {label: i for i, label in enumerate(labels)}
  matrix = [[0] * (len(labels) + 1) for _ in labels]
  for pred, ref in zip(preds, refs):
    matrix[index[ref]][index.get(pred, len(labels))] += 1  # the last column is NO_LABEL
  return matrix


def classification_report(
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
    normalization: str = "squad",
) -> dict:
  """Accuracy, per-class and averaged precision/recall/F1 and the confusion matrix of label answers.

  Answers and labels are compared after `normalize_answer`. The label set is `labels` (in that order) or the
  sorted set of normalised references; every reference must be in it. A prediction outside it ("maybe" when
  the labels are yes/no) lands in the confusion matrix's extra last column NO_LABEL and is wrong: it lowers
  its reference's recall but is a false positive of no class. Hence (sklearn's definitions with `labels=`):

    precision(c) = TP(c) / predictions of c      recall(c) = TP(c) / references of c     0/0 -> 0.0
    macro P, R, F1 = unweighted means over the label set, labels without support included
    micro P = correct / predictions inside the label set,  micro R = accuracy = correct / all answers

  Worked example: predictions ["Yes", "no", "maybe", "yes"] for references ["yes", "yes", "no", "no"]:
  accuracy 1/4; yes: P 1/2, R 1/2; no: P 0/1, R 0/2; micro P = 1/3 (3 predictions inside the label set),
  micro R = 1/4; confusion matrix rows no, yes = [[0, 1, 1], [1, 1, 0]] with columns no, yes, NO_LABEL.

  Returns a JSON-ready dict: accuracy, labels, per_class {label: precision, recall, f1, support}, macro and
  micro {precision, recall, f1}, confusion_matrix (rows: reference label, columns: `confusion_columns`) and
  no_label {count, examples: the first few such predictions, as given}."""
  _check_pairs(predictions, references)
  label_set = _label_set(labels, references, normalization)
  if "" in label_set:
    raise ValueError(f"a label or reference is empty after {normalization!r} normalisation (e.g. 'the' or '!')")
  preds = [normalize_answer(p, normalization) for p in predictions]
  refs = [normalize_answer(r, normalization) for r in references]
  unknown = sorted(set(refs) - set(label_set))
  if unknown:
    raise ValueError(f"references outside the label set: {unknown[:_NO_LABEL_EXAMPLES]}")
  matrix = _confusion(preds, refs, label_set)
  true_pos = [matrix[i][i] for i in range(len(label_set))]
  predicted = [sum(row[i] for row in matrix) for i in range(len(label_set))]
  support = [sum(row) for row in matrix]
  per_class = {}
  for i, label in enumerate(label_set):
    precision, recall = _ratio(true_pos[i], predicted[i]), _ratio(true_pos[i], support[i])
    per_class[label] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": support[i]}
  macro = {key: sum(c[key] for c in per_class.values()) / len(label_set) for key in ("precision", "recall", "f1")}
  micro_p, micro_r = _ratio(sum(true_pos), sum(predicted)), _ratio(sum(true_pos), len(refs))
  outside = [raw for raw, pred in zip(predictions, preds) if pred not in per_class]
  return {
      "accuracy": sum(true_pos) / len(refs),
      "labels": label_set,
      "per_class": per_class,
      "macro": macro,
      "micro": {"precision": micro_p, "recall": micro_r, "f1": _f1(micro_p, micro_r)},
      "confusion_matrix": matrix,
      "confusion_columns": [*label_set, NO_LABEL],
      "no_label": {"count": len(outside), "examples": outside[:_NO_LABEL_EXAMPLES]},
  }


def classification_codes(
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
    normalization: str = "squad",
) -> tuple[np.ndarray, np.ndarray, int]:
  """(reference codes, answer codes, number of labels): each answer's index in `classification_report`'s label
  set, NO_LABEL's index (the number of labels) for an answer outside it. Errors as `classification_report`."""
  _check_pairs(predictions, references)
  label_set = _label_set(labels, references, normalization)
  index = {label: i for i, label in enumerate(label_set)}
  refs = [normalize_answer(r, normalization) for r in references]
  unknown = sorted(set(refs) - set(index))
  if "" in index or unknown:
    raise ValueError(f"references outside the label set or empty labels: {unknown[:_NO_LABEL_EXAMPLES]}")
  codes = [index.get(normalize_answer(p, normalization), len(label_set)) for p in predictions]
  return np.asarray([index[r] for r in refs], np.int64), np.asarray(codes, np.int64), len(label_set)


def _safe_ratio(numerator_k: np.ndarray, denominator_k: np.ndarray) -> np.ndarray:
  out = np.zeros(len(numerator_k), np.float64)
  return np.divide(numerator_k, denominator_k, out=out, where=denominator_k > 0)  # 0/0 -> 0.0, as `_ratio`


def f1_of_codes(reference_n: np.ndarray, answer_n: np.ndarray, num_labels: int) -> tuple[float, float]:
  """(macro F1, micro F1) of `classification_codes`, as `classification_report` computes them: vectorised,
  to recompute on each resample of the answers."""
  k = num_labels
  true_pos = np.bincount(reference_n[reference_n == answer_n], minlength=k)[:k]
  predicted = np.bincount(answer_n, minlength=k + 1)[:k]
  support = np.bincount(reference_n, minlength=k)[:k]
  precision, recall = _safe_ratio(true_pos, predicted), _safe_ratio(true_pos, support)
  macro = float(np.mean(_safe_ratio(2 * precision * recall, precision + recall)))
  micro_p, micro_r = _ratio(true_pos.sum(), predicted.sum()), _ratio(true_pos.sum(), len(reference_n))
  return macro, float(_f1(micro_p, micro_r))


# --- generation: ROUGE, BLEU, chrF -----------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L/Lsum F-measures (0-1) over pairs, from rouge_score with its Porter stemmer.

  rouge_score lowercases and keeps only [a-z0-9] tokens, so text in other scripts scores 0.0. ROUGE-Lsum
  treats each summary as sentences separated by "\\n" (summary-level LCS): nothing here splits sentences,
  so write one sentence per line; on single-line text Lsum equals L.

  Worked example: "the cat sat" vs reference "the cat sat down": 3 common unigrams, P = 3/3, R = 3/4, so
  rouge1 = 2 * 1 * 0.75 / 1.75 = 0.857; bigrams P = 2/2, R = 2/3, so rouge2 = 0.8."""
  per_item = rouge_per_item(predictions, references)
  return {key: sum(values.tolist()) / len(references) for key, values in per_item.items()}


def rouge_per_item(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
  """Each pair's ROUGE-1/2/L/Lsum F-measure: `rouge` is their mean."""
  _check_pairs(predictions, references)
  from rouge_score import rouge_scorer  # pulls in nltk: only when ROUGE is asked for

  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]  # rouge_score's order: target first
  return {key: np.asarray([s[key].fmeasure for s in scores], np.float64) for key in ROUGE_TYPES}


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
  """sacrebleu's layout: one stream per reference position. ['r1', ['r2', 'r2b']] -> [['r1', 'r2'], ['', 'r2b']].

  A missing reference is '' (sacrebleu skips it: "variable number of references")."""
  per_prediction = [[r] if isinstance(r, str) else list(r) for r in references]
  width = max(len(refs) for refs in per_prediction)
  if width == 0:
    raise ValueError("every prediction needs at least one reference")
  return [[refs[i] if i < len(refs) else "" for refs in per_prediction] for i in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Corpus BLEU (0-100) from sacrebleu's defaults: 13a tokenisation, case-sensitive, exp smoothing.

  One reference per prediction, or a list of references each. Corpus-level, not a mean of sentence scores;
  a corpus without 4-grams (all answers under 4 tokens) scores 0.0 even when it matches exactly.

  Worked example: 'the cat sat on the mat' vs itself -> 100.0; sacrebleu's README corpus
  (3 sentences, 2 references each) -> 48.53."""
  _check_pairs(predictions, references)
  import sacrebleu  # only when BLEU is asked for

  return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Corpus chrF2 (0-100) from sacrebleu's defaults: character 6-grams, beta 2, whitespace ignored.

  References as for `bleu`. Worked example: 'a b' vs itself -> 100.0; sacrebleu's README corpus -> 59.73."""
  _check_pairs(predictions, references)
  import sacrebleu  # only when chrF is asked for

  return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def _corpus_statistic(metric, predictions: Sequence[str], references) -> Callable[[np.ndarray], float]:
  """sacrebleu's own route for its significance tests: each sentence's sufficient statistics once, the
  corpus score of any resample from their sum."""
  _check_pairs(predictions, references)
  stats_nk = np.asarray(metric._extract_corpus_statistics(list(predictions), _reference_streams(references)))
  return lambda idx_n: float(metric._compute_score_from_stats(stats_nk[idx_n].sum(0)).score)


def bleu_statistic(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Callable:
  """indices -> corpus `bleu` of those pairs (repeats count again): statistic(np.arange(n)) == bleu(...)."""
  from sacrebleu.metrics import BLEU

  return _corpus_statistic(BLEU(), predictions, references)


def chrf_statistic(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Callable:
  """indices -> corpus `chrf` of those pairs: statistic(np.arange(n)) == chrf(...)."""
  from sacrebleu.metrics import CHRF

  return _corpus_statistic(CHRF(), predictions, references)


# --- language modelling ---------------------------------------------------------------------------

_MAX_LOG = math.log(sys.float_info.max)  # exp() of anything larger overflows


def perplexity(nll_sum: float, tokens: int) -> float:
  """exp(nll_sum / tokens): the exponentiated mean negative log-likelihood (nats) per token.

  Capped at the largest float, so a diverged model reports 1.8e308 rather than raising OverflowError.

  Worked example: a model uniform over 4 choices has NLL ln 4 per token: perplexity(2 * ln 4, 2) == 4.0."""
  nll_sum, tokens = float(nll_sum), int(tokens)
  if tokens <= 0:
    raise ValueError(f"perplexity needs at least one token, got {tokens}")
  if math.isnan(nll_sum) or nll_sum < 0:
    raise ValueError(f"a negative log-likelihood sum is >= 0, got {nll_sum}")
  return math.exp(min(nll_sum / tokens, _MAX_LOG))
