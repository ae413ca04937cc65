"""Held-out evaluation, per task and overall: response loss, perplexity and token accuracy; the greedy
answers scored by the metrics of their task (sft/evaluator/tasks.py); candidates ranked by
log-likelihood where records have them (sft/evaluator/choices.py).

Metric keys: eval/<metric> over every task (eval/loss, eval/exact_match, eval/token_f1, ...) and
eval/<task>/<metric> per task (eval/classification/accuracy, eval/summarisation/rougeL, ...).

`intervals_of(result)` gives the same keys' 95% intervals and item counts; only the written report asks
for them, so an evaluation during training does not pay for resampling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from sft import pipeline
from sft.config import check_value
from sft.console import track
from sft.errors import ConfigError
from sft.evaluator import choices as choices_lib
from sft.evaluator import tasks as tasks_lib
from sft.evaluator.generate import (
    decode_copies,
    fit_prompts,
    make_generate,
    pad_prompts,
    prompt_room,
    strip_generation,
)
from sft.evaluator.metrics import exact_match, mean_token_f1
from sft.model import Transformer
from sft.tokenizer import ChatTokenizer

log = logging.getLogger("sft")


def _chunks(tokens_bp: np.ndarray, lengths_b: np.ndarray, size: int):
  """(real rows, (size, P) tokens, (size,) lengths) per chunk; the last is filled up with copies of row 0."""
  for start in range(0, len(tokens_bp), size):
    chunk_bp, chunk_b = tokens_bp[start:start + size], lengths_b[start:start + size]
    n = len(chunk_bp)
    fill = size - n
    yield n, np.concatenate([chunk_bp, np.repeat(tokens_bp[:1], fill, 0)]), np.concatenate([chunk_b, np.repeat(lengths_b[:1], fill)])


def _loss_metrics(totals: dict[str, Any], prefix: str, accuracy_key: str = "accuracy") -> dict[str, float]:
  """Loss, perplexity and accuracy of the summed totals; only the token count where there are no tokens
  (a mean over nothing is not a perfect model)."""
  n = float(totals["loss_tokens"])
  if n <= 0:
    return {f"{prefix}loss_tokens": 0.0}
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
  prompts_truncated: int = 0  # generation prompts cut to the context (their first tokens dropped)
  normalization: str = "squad"  # how the answers were compared
  resampling: tasks_lib.Resampling = tasks_lib.Resampling()  # how `intervals_of` draws


def intervals_of(result: EvalResult) -> dict[str, dict[str, Any]]:
  """Metric key (as in result.metrics) -> {"low", "high", "n", "method"}: every generation and choice figure,
  over every task and per task. Loss and perplexity have none (they are sums over tokens, not items)."""
  how, normalization = result.resampling, result.normalization
  out = {}
  if result.samples:
    every = tasks_lib.answer_intervals(
        [s.prediction for s in result.samples], [s.reference for s in result.samples], normalization, how
    )
    out.update({f"eval/{k}": v for k, v in every.items()})
  out.update({f"eval/{k}": v for k, v in tasks_lib.choice_intervals(result.choices, how).items()})
  for task, info in result.tasks.items():
    mine = [s for s in result.samples if s.task == task]
    report = info["details"].get("classification_report")
    per_task = tasks_lib.intervals(
        task, [s.prediction for s in mine], [s.reference for s in mine], labels=report["labels"] if report else (),
        normalization=normalization, how=how,
    )
    per_task.update(tasks_lib.choice_intervals([c for c in result.choices if c["task"] == task], how))
    out.update({f"eval/{task}/{k}": v for k, v in per_task.items()})
  for key, span in out.items():  # the figure as reported, summed in its own order, may differ in the last bits
    value = result.metrics.get(key, span["low"])
    span.update(low=min(span["low"], value), high=max(span["high"], value))
  return out


def _record_name(record: dict[str, Any], index: int) -> str:
  return repr(record["id"]) if record.get("id") else f"#{index}"


def render_prompt_of(tokenizer, record: dict[str, Any], index: int) -> tuple[list[int], str]:
  """The record's generation prompt and reference; a chat the template or tokenizer refuses is a
  ConfigError naming the record, not a traceback."""
  try:
    return tokenizer.render_prompt(record["messages"])
  except ValueError as err:  # ConfigError, a template's refusal, TokenizerFailure
    raise ConfigError(f"eval record {record.get('id', f'#{index}')!r}: {err}") from None


class Evaluator:
  """Built once per run: the eval batches, generation prompts and choice rows are fixed, so every eval
  compares alike."""

  def __init__(
      self,
      records: Sequence[dict[str, Any]],
      *,
      tokenizer: ChatTokenizer,
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
      prompt_overflow: str = "truncate",  # eval.prompt_overflow: a prompt longer than the context is cut, or refused
      bootstrap_samples: int = 1000,  # eval.bootstrap_samples: resamples behind each interval of the report
      seed: int = 0,  # the run's seed: the report's intervals are reproducible
  ):
    # Handed directly (a notebook) rather than from a checked config: the config's own rules.
    check_value("eval.answer_normalization", normalization)
    check_value("eval.prompt_overflow", prompt_overflow)
    check_value("eval.bootstrap_samples", bootstrap_samples)
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
    counts = np.asarray([len(b) for b in local.values()], np.int64)
    tokens = np.asarray([sum(int(b["loss_mask"].sum()) for b in batches) for batches in local.values()], np.int64)
    if process_count > 1:
      gathered = multihost_utils.process_allgather(np.stack([counts, tokens]))
      counts, tokens = np.max(gathered[:, 0], axis=0), np.sum(gathered[:, 1], axis=0)
    self._check_loss_tokens(dict(zip(local, tokens.tolist())), len(records), seq_len)
    for batches, n in zip(local.values(), counts):
      batches += [pipeline.empty_batch(batch_size // process_count, seq_len)] * (int(n) - len(batches))
    self._batches = local
    self._place_batch = place_batch
    self._eval_step = eval_step
    self._tokenizer = tokenizer
    self._batch_size, self._batch_rows = batch_size, batch_rows

    self._chosen = tasks_lib.pick_for_generation(records, num_generations)
    rendered = [render_prompt_of(tokenizer, records[i], i) for i in self._chosen]
    self._prompts = self._fit_prompts([p for p, _ in rendered], seq_len, max_new_tokens, prompt_overflow)
    self._references = [ref for _, ref in rendered]
    self._generation_batch = batch_size  # prompts per generate call: one compiled shape, a bar that moves
    self._normalization = normalization
    self._resampling = tasks_lib.Resampling(bootstrap_samples, seed)
    self._stop_ids = tokenizer.stop_ids
    self._generate = make_generate(
        model, max_new_tokens=max_new_tokens, stop_ids=self._stop_ids, pad_id=tokenizer.pad_id, out_sharding=out_sharding
    )
    self._score_step = score_step
    with_choices = [i for i, r in enumerate(records) if r.get("choices")] if score_step is not None else []
    self._choice_rows = choices_lib.choice_rows(records, with_choices, tokenizer, seq_len)

  @staticmethod
  def _check_loss_tokens(tokens: dict[str, int], num_records: int, seq_len: int) -> None:
    """No answer token within `seq_len` anywhere is an error (a loss over nothing reads as perfect); a
    task without any is measured by its answers only, and said so."""
    if not sum(tokens.values()):
      raise ConfigError(
          f"eval: none of the {num_records} eval records has an answer token within train.seq_len={seq_len} (each "
          "prompt fills the context before its answer starts), so loss and perplexity would measure nothing: raise "
          "train.seq_len, or evaluate on records with shorter prompts"
      )
    for task, n in tokens.items():
      if not n:
        log.warning("eval: no %s record has an answer token in train.seq_len=%d: no loss or perplexity", task, seq_len)

  def _fit_prompts(self, prompts: list[list[int]], seq_len: int, max_new_tokens: int, overflow: str) -> list[list[int]]:
    """The generation prompts cut to the context from the left (counted, logged), or refused."""
    room = prompt_room(seq_len, max_new_tokens, "eval.max_new_tokens")
    fitted, cut = fit_prompts(prompts, room)
    self.prompts_truncated = len(cut)
    if cut and overflow == "refuse":
      first, index = cut[0], self._chosen[cut[0]]
      raise ConfigError(
          f"eval: record {_record_name(self._records[index], index)} has a generation prompt of {len(prompts[first])} "
          f"tokens, more than the {room} that fit train.seq_len={seq_len} with eval.max_new_tokens={max_new_tokens} "
          f"({len(cut)} such prompt(s) in all): set eval.prompt_overflow='truncate' to keep their last tokens, or "
          "raise train.seq_len"
      )
    if cut:
      log.warning(
          "eval: %d of %d generation prompts are longer than the %d tokens that fit train.seq_len=%d with "
          "eval.max_new_tokens=%d: their first tokens are cut", len(cut), len(prompts), room, seq_len, max_new_tokens,
      )
    return fitted

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
    copies = decode_copies(params)  # once for every batch below
    generated_bn = np.concatenate([
        np.asarray(jax.device_get(self._generate(params, chunk_bp, chunk_lengths_b, jax.random.key(0), copies)))[:n]
        for n, chunk_bp, chunk_lengths_b in track(
            list(_chunks(tokens_bp, lengths_b, self._generation_batch)), "eval: generating", unit=" batches",
            enabled=jax.process_index() == 0,
        )
    ])
    predictions = [tok.decode(strip_generation(row, self._stop_ids)) for row in generated_bn]
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
      if f"{loss_prefix}loss" in metrics:
        scores = {"loss": metrics[f"{loss_prefix}loss"], "perplexity": metrics[f"{loss_prefix}perplexity"], **scores}
      else:
        details["loss"] = "no tokens: no record of this task has an answer token within seq_len"
      tasks[task] = {"records": len(members), "generated": len(mine), "metrics": scores, "details": details}
    return EvalResult(
        metrics, tasks, samples, choice_items, self.prompts_truncated, self._normalization, self._resampling
    )
