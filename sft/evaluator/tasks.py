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
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Sequence

from sft.evaluator import metrics as M

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


def sample_score(prediction: str, reference: str, normalization: str = "squad") -> float:
  """How good one answer is, to rank the best and worst examples of any task: token F1."""
  return M.token_f1(prediction, reference, normalization)
