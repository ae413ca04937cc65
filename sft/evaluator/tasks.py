"""Which metrics score which task, and the per-task view of an evaluation.

Every built record carries its `task` (sft/databuilder/templates.py): its answers are scored by the
metrics of that task, and the evaluation reports each task and all of them together.

    classification  accuracy, macro and micro F1 (+ per-class table, confusion matrix)
    summarisation   ROUGE-1/2/L/Lsum
    translation     BLEU, chrF
    qa, extraction  exact match, token F1 (SQuAD normalisation)
    cloze           exact match, token F1; with candidates, log-likelihood ranking (see choices.py)
    chat            ROUGE-L: an open answer has no single right wording

Exact match and token F1 are reported for every task, so every task has a number that compares
across tasks. A record without a task, or with one this table does not know, counts as "chat".

`intervals` gives each of these figures its 95% interval and item count (the final report's, not every
training eval's): Wilson's for proportions (exact match, accuracy, choice accuracy), else a seeded
percentile bootstrap over items, a corpus figure (BLEU, chrF, macro and micro F1) recomputed on each resample.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from sft.evaluator import metrics as M
from sft.evaluator import stats

log = logging.getLogger("sft")
TASKS = ("classification", "summarisation", "qa", "translation", "extraction", "cloze", "chat")
# The number a task is judged by first (the report's "main" column).
HEADLINE = {
    "classification": "accuracy", "summarisation": "rougeL", "translation": "bleu", "qa": "token_f1",
    "extraction": "exact_match", "cloze": "exact_match", "chat": "rougeL",
}


def task_of(record: dict[str, Any]) -> str:
  task = record.get("task")
  return task if task in TASKS else "chat"


def by_task(records: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
  """Task -> indices of its records, tasks in TASKS order."""
  groups = collections.defaultdict(list)
  for i, record in enumerate(records):
    groups[task_of(record)].append(i)
  return {task: groups[task] for task in TASKS if groups[task]}


def pick_for_generation(records: Sequence[dict[str, Any]], num: int) -> list[int]:
  """Indices of the records answered by generation: `num` in all (-1: every record), shared evenly
  between the tasks (a task with fewer records gives its share to the others), each task's share
  spread evenly over its records (records come grouped by source and module)."""
  groups = by_task(records)
  if num < 0:
    return sorted(i for members in groups.values() for i in members)
  shares, left, open_tasks = dict.fromkeys(groups, 0), num, list(groups)
  while left > 0 and open_tasks:
    each = max(left // len(open_tasks), 1)
    for task in list(open_tasks):
      give = min(each, len(groups[task]) - shares[task], left)
      shares[task] += give
      left -= give
      if shares[task] == len(groups[task]):
        open_tasks.remove(task)
  picked = []
  for task, members in groups.items():
    k = shares[task]
    if k:
      stride = len(members) / k
      picked += [members[int(j * stride)] for j in range(k)]
  return sorted(picked)


def label_set(records: Sequence[dict[str, Any]], references: Sequence[str]) -> list[str]:
  """A classification task's labels: every record's declared `labels` and every reference."""
  labels = {str(label) for r in records for label in (r.get("labels") or ())}
  return sorted(labels | set(references))


def score(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    labels: Sequence[str] = (),
    normalization: str = "squad",
) -> tuple[dict[str, float], dict[str, Any]]:
  """(metrics, details) of one task's generated answers. details holds the classification report;
  a metric that cannot be computed (labels that normalise to nothing) is left out with the reason."""
  if not predictions:
    return {}, {}
  out = {
      "exact_match": M.exact_match(predictions, references, normalization),
      "token_f1": M.mean_token_f1(predictions, references, normalization),
  }
  details: dict[str, Any] = {}
  if task == "classification":
    try:
      report = M.classification_report(predictions, references, labels=list(labels) or None, normalization=normalization)
    except ValueError as err:
      log.warning("eval: no classification report: %s", err)
      details["error"] = str(err)
    else:
      out.update(accuracy=report["accuracy"], macro_f1=report["macro"]["f1"], micro_f1=report["micro"]["f1"])
      details["classification_report"] = report
  elif task == "summarisation":
    out.update(M.rouge(predictions, references))
  elif task == "translation":
    out.update(bleu=M.bleu(predictions, references), chrf=M.chrf(predictions, references))
  elif task == "chat":
    out["rougeL"] = M.rouge(predictions, references)["rougeL"]
  return out, details


CONFIDENCE = 0.95  # of every interval the report gives


@dataclasses.dataclass(frozen=True)
class Resampling:
  """How intervals are drawn: eval.bootstrap_samples resamples from the run's seed, at CONFIDENCE."""

  samples: int = 1000
  seed: int = 0


def _wilson(right_n: np.ndarray) -> dict[str, Any]:
  low, high = stats.wilson_interval(int(np.sum(right_n)), len(right_n), CONFIDENCE)
  return {"low": low, "high": high, "n": len(right_n), "method": "wilson"}


def _bootstrap(
    how: Resampling, values_n: np.ndarray | None = None, *, n: int | None = None,
    statistic: Callable[[np.ndarray], float] | None = None,
) -> dict[str, Any]:
  low, high = stats.bootstrap_interval(
      values_n, n=n, statistic=statistic, samples=how.samples, seed=how.seed, confidence=CONFIDENCE
  )
  return {"low": low, "high": high, "n": len(values_n) if statistic is None else n, "method": "bootstrap"}


def answer_intervals(
    predictions: Sequence[str], references: Sequence[str], normalization: str = "squad", how: Resampling = Resampling()
) -> dict[str, dict[str, Any]]:
  """The intervals of the figures every task has: exact match and token F1."""
  return {
      "exact_match": _wilson(M.exact_match_per_item(predictions, references, normalization)),
      "token_f1": _bootstrap(how, M.token_f1_per_item(predictions, references, normalization)),
  }


def intervals(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    labels: Sequence[str] = (),
    normalization: str = "squad",
    how: Resampling = Resampling(),
) -> dict[str, dict[str, Any]]:
  """metric -> {"low", "high", "n", "method"} for each figure `score` gives these answers: every item's
  value computed once, then resampled."""
  if not predictions:
    return {}
  out, n = answer_intervals(predictions, references, normalization, how), len(predictions)
  if task == "classification":
    try:
      reference_n, answer_n, k = M.classification_codes(predictions, references, list(labels) or None, normalization)
    except ValueError:
      return out  # `score` has left these figures out, with the reason
    out["accuracy"] = _wilson(reference_n == answer_n)
    for i, key in enumerate(("macro_f1", "micro_f1")):
      f1 = lambda idx_n, i=i: M.f1_of_codes(reference_n[idx_n], answer_n[idx_n], k)[i]  # noqa: E731
      out[key] = _bootstrap(how, n=n, statistic=f1)
  elif task == "summarisation":
    out.update({key: _bootstrap(how, v_n) for key, v_n in M.rouge_per_item(predictions, references).items()})
  elif task == "translation":
    out["bleu"] = _bootstrap(how, n=n, statistic=M.bleu_statistic(predictions, references))
    out["chrf"] = _bootstrap(how, n=n, statistic=M.chrf_statistic(predictions, references))
  elif task == "chat":
    out["rougeL"] = _bootstrap(how, M.rouge_per_item(predictions, references)["rougeL"])
  return out


def choice_intervals(per_item: Sequence[dict[str, Any]], how: Resampling = Resampling()) -> dict[str, dict[str, Any]]:
  """The intervals of `choices.summary`'s figures (its item count has none)."""
  if not per_item:
    return {}
  return {
      "choice_accuracy": _wilson(np.asarray([i["pick"] == i["gold"] for i in per_item])),
      "choice_accuracy_norm": _wilson(np.asarray([i["pick_norm"] == i["gold"] for i in per_item])),
      "gold_rank": _bootstrap(how, np.asarray([i["gold_rank"] for i in per_item], np.float64)),
  }


def sample_score(prediction: str, reference: str, normalization: str = "squad") -> float:
  """How good one answer is, to rank the best and worst examples of any task: token F1."""
  return M.token_f1(prediction, reference, normalization)
