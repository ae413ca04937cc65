"""Held-out evaluation, per task and overall: response loss, perplexity and token accuracy; the greedy
answers scored by the metrics of their task (sft/evaluator/tasks.py); candidates ranked by
log-likelihood where records have them (sft/evaluator/choices.py).

Metric keys: eval/<metric> over every task (eval/loss, eval/exact_match, eval/token_f1, ...) and
eval/<task>/<metric> per task (eval/classification/accuracy, eval/summarisation/rougeL, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from sft import pipeline
from sft.console import track
from sft.evaluator import choices as choices_lib
from sft.evaluator import tasks as tasks_lib
from sft.evaluator.generate import make_generate, pad_prompts, strip_generation
from sft.evaluator.metrics import exact_match, mean_token_f1, normalize_answer
from sft.model import Transformer


def _chunks(tokens_bp: np.ndarray, lengths_b: np.ndarray, size: int):
  """(real rows, (size, P) tokens, (size,) lengths) per chunk; the last is filled up with copies of row 0."""
  for start in range(0, len(tokens_bp), size):
    chunk_bp, chunk_b = tokens_bp[start:start + size], lengths_b[start:start + size]
    n = len(chunk_bp)
    fill = size - n
    yield n, np.concatenate([chunk_bp, np.repeat(tokens_bp[:1], fill, 0)]), np.concatenate([chunk_b, np.repeat(lengths_b[:1], fill)])


def _loss_metrics(totals: dict[str, Any], prefix: str, accuracy_key: str = "accuracy") -> dict[str, float]:
  n = max(float(totals["loss_tokens"]), 1.0)
  loss = float(totals["nll_sum"]) / n
  return {
      f"{prefix}loss": loss,
      f"{prefix}perplexity": math.exp(min(loss, 50.0)),
      f"{prefix}{accuracy_key}": float(totals["correct_sum"]) / n,  # of next-token argmax on response tokens
      f"{prefix}loss_tokens": float(totals["loss_tokens"]),
  }


@dataclasses.dataclass
class Sample:
  prompt: str
  reference: str
  prediction: str
  task: str = "chat"
  score: float = 0.0  # token F1 of the prediction: what ranks the best and worst examples


@dataclasses.dataclass
class EvalResult:
  """One evaluation: the flat metrics (for metrics.jsonl) and what the report shows beside them."""

  metrics: dict[str, float]
  tasks: dict[str, dict[str, Any]]  # task -> records, generated, metrics (unprefixed), details
  samples: list[Sample]  # every generated answer
  choices: list[dict[str, Any]]  # every ranked multiple-choice item (choices.choice_metrics)


class Evaluator:
  """Built once per run: the eval batches, generation prompts and choice rows are fixed, so every eval
  compares alike."""

  def __init__(
      self,
      records: Sequence[dict[str, Any]],
      *,
      tokenizer: pipeline.ChatTokenizer,
      model: Transformer,
      eval_step: Callable,
      place_batch: Callable,  # host batch -> global device arrays (the trainer's sharding)
      seq_len: int,
      batch_size: int,
      num_generations: int,  # answered greedily, shared between the tasks; -1: every record
      max_new_tokens: int,
      normalization: str = "squad",  # eval.answer_normalization: how answers compare for exact match and F1
      out_sharding: jax.sharding.Sharding | None = None,  # of the generated ids; replicated for multi-process runs
      score_step: Callable | None = None,  # (params, batch) -> per-row log-likelihoods; None: no choice ranking
      batch_rows: slice = slice(None),  # this process's rows of a global batch (sharding.process_rows)
  ):
    normalize_answer("", normalization)  # an unknown mode fails here, not at the first eval
    if not records:
      raise ValueError("the eval split is empty: there is nothing to evaluate on")
    records = list(records)
    self._records = records
    self._groups = tasks_lib.by_task(records)
    process_count = jax.process_count()
    local = {
        task: pipeline.eval_batches(
            [records[i] for i in members], tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size // process_count,
            process_index=jax.process_index(), process_count=process_count,
        )
        for task, members in self._groups.items()
    }
    # Every process must run the same number of steps: pad the short ones with empty batches.
    counts = np.asarray([len(b) for b in local.values()], np.int32)
    most = np.max(multihost_utils.process_allgather(counts), axis=0) if process_count > 1 else counts
    for batches, n in zip(local.values(), most):
      batches += [pipeline.empty_batch(batch_size // process_count, seq_len)] * (int(n) - len(batches))
    self._batches = local
    self._place_batch = place_batch
    self._eval_step = eval_step
    self._tokenizer = tokenizer
    self._batch_size, self._batch_rows = batch_size, batch_rows

    self._chosen = tasks_lib.pick_for_generation(records, num_generations)
    rendered = [tokenizer.render_prompt(records[i]["messages"]) for i in self._chosen]
    self._prompts = [p for p, _ in rendered]
    self._references = [ref for _, ref in rendered]
    self._generation_batch = batch_size  # prompts per generate call: one compiled shape, a bar that moves
    self._normalization = normalization
    self._stop_ids = tokenizer.stop_ids
    self._generate = make_generate(
        model, max_new_tokens=max_new_tokens, stop_ids=self._stop_ids, pad_id=tokenizer.pad_id, out_sharding=out_sharding
    )
    self._score_step = score_step
    with_choices = [i for i, r in enumerate(records) if r.get("choices")] if score_step is not None else []
    self._choice_rows = choices_lib.choice_rows(records, with_choices, tokenizer, seq_len)

  @property
  def num_batches(self) -> int:
    return sum(len(b) for b in self._batches.values())

  def loss_metrics(self, params) -> dict[str, float]:
    """eval/loss, perplexity, accuracy and loss_tokens over every task, and eval/<task>/... per task."""
    per_task = {}
    for task, batches in self._batches.items():
      totals = None
      for batch in batches:
        sums = self._eval_step(params, self._place_batch(batch))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      per_task[task] = jax.device_get(totals)
    overall = {k: sum(float(t[k]) for t in per_task.values()) for k in ("nll_sum", "correct_sum", "loss_tokens")}
    metrics = _loss_metrics(overall, "eval/")
    if len(per_task) > 1:
      for task, totals in per_task.items():
        metrics.update(_loss_metrics(totals, f"eval/{task}/", "token_accuracy"))  # "accuracy" is classification's
    return metrics

  def generation_metrics(self, params) -> tuple[dict[str, float], list[Sample]]:
    """eval/exact_match and eval/token_f1 over every generated answer, and the samples."""
    if not self._prompts:
      return {}, []
    tok = self._tokenizer
    tokens_bp, lengths_b = pad_prompts(self._prompts, tok.pad_id)
    generated_bn = np.concatenate([
        np.asarray(jax.device_get(self._generate(params, chunk_bp, chunk_lengths_b, jax.random.key(0))))[:n]
        for n, chunk_bp, chunk_lengths_b in track(
            list(_chunks(tokens_bp, lengths_b, self._generation_batch)), "eval: generating", unit=" batches",
            enabled=jax.process_index() == 0,
        )
    ])
    predictions = [tok.decode(strip_generation(row, self._stop_ids, tok.pad_id)) for row in generated_bn]
    samples = [
        Sample(
            tok.decode(p), ref, pred, tasks_lib.task_of(self._records[i]),
            tasks_lib.sample_score(pred, ref, self._normalization),
        )
        for i, p, ref, pred in zip(self._chosen, self._prompts, self._references, predictions)
    ]
    metrics = {
        "eval/exact_match": exact_match(predictions, self._references, self._normalization),
        "eval/token_f1": mean_token_f1(predictions, self._references, self._normalization),
    }
    return metrics, samples

  def choice_scores(self, params) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every candidate's summed log-likelihood, in global batches of `batch_size` rows."""
    rows = self._choice_rows
    if not len(rows):
      return {}, []
    size = self._batch_size
    loglik_r = []
    for start in range(0, len(rows), size):
      chunk = {k: v[start:start + size] for k, v in rows.batch.items()}
      chunk = pipeline.pad_batch(chunk, size)
      local = {k: v[self._batch_rows] for k, v in chunk.items()}
      out = jax.device_get(self._score_step(params, self._place_batch(local)))
      loglik_r.append(np.asarray(out["loglik_b"])[: min(size, len(rows) - start)])
    return choices_lib.choice_metrics(np.concatenate(loglik_r), rows)

  def evaluate(self, params) -> EvalResult:
    """Loss, generation and choice ranking, scored per task and over all of them."""
    metrics = self.loss_metrics(params)
    generation, samples = self.generation_metrics(params)
    metrics.update(generation)
    overall_choices, choice_items = self.choice_scores(params)
    for item in choice_items:
      item["task"] = tasks_lib.task_of(self._records[item["record"]])
    metrics.update({f"eval/{k}": v for k, v in overall_choices.items()})
    one_task = len(self._groups) == 1
    tasks: dict[str, dict[str, Any]] = {}
    for task, members in self._groups.items():
      mine = [s for s in samples if s.task == task]
      references = [s.reference for s in mine]
      labels = tasks_lib.label_set([self._records[i] for i in members], references) if task == "classification" else ()
      scores, details = tasks_lib.score(task, [s.prediction for s in mine], references, labels=labels, normalization=self._normalization)
      scores.update(choices_lib.summary([c for c in choice_items if c["task"] == task]))
      if task == "cloze" and self._choice_rows.skipped:
        details["choices_skipped"] = self._choice_rows.skipped
      metrics.update({f"eval/{task}/{k}": v for k, v in scores.items()})
      loss_prefix = "eval/" if one_task else f"eval/{task}/"
      scores = {"loss": metrics[f"{loss_prefix}loss"], "perplexity": metrics[f"{loss_prefix}perplexity"], **scores}
      tasks[task] = {"records": len(members), "generated": len(mine), "metrics": scores, "details": details}
    return EvalResult(metrics, tasks, samples, choice_items)
