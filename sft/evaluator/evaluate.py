"""Held-out evaluation: response loss, perplexity and token accuracy; exact match and token F1 of greedy answers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from sft import pipeline
from sft.console import track
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


@dataclasses.dataclass
class Sample:
  prompt: str
  reference: str
  prediction: str


class Evaluator:
  """Built once per run: the eval batches and generation prompts are fixed, so every eval compares alike."""

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
      num_generations: int,
      max_new_tokens: int,
      normalization: str = "squad",  # eval.answer_normalization: how answers compare for exact match and F1
      out_sharding: jax.sharding.Sharding | None = None,  # of the generated ids; replicated for multi-process runs
  ):
    normalize_answer("", normalization)  # an unknown mode fails here, not at the first eval
    if not records:
      raise ValueError("the eval split is empty: there is nothing to evaluate on")
    process_count = jax.process_count()
    local = pipeline.eval_batches(
        records,
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size // process_count,
        process_index=jax.process_index(),
        process_count=process_count,
    )
    # Every process must run the same number of steps: pad the short ones with empty batches.
    most = int(np.max(multihost_utils.process_allgather(np.int32(len(local))))) if process_count > 1 else len(local)
    local += [pipeline.empty_batch(batch_size // process_count, seq_len)] * (most - len(local))
    self._batches = local
    self._place_batch = place_batch
    self._eval_step = eval_step
    self._tokenizer = tokenizer

    # An even spread over the eval set (records come grouped by module), the same at every eval.
    stride = max(len(records) // max(num_generations, 1), 1)
    chosen = list(records[::stride])[:num_generations]
    rendered = [tokenizer.render_prompt(r["messages"]) for r in chosen]
    self._prompts = [p for p, _ in rendered]
    self._references = [ref for _, ref in rendered]
    self._generation_batch = batch_size  # prompts per generate call: one compiled shape, a bar that moves
    self._normalization = normalization
    self._stop_ids = tokenizer.stop_ids
    self._generate = make_generate(
        model, max_new_tokens=max_new_tokens, stop_ids=self._stop_ids, pad_id=tokenizer.pad_id, out_sharding=out_sharding
    )

  @property
  def num_batches(self) -> int:
    return len(self._batches)

  def loss_metrics(self, params) -> dict[str, float]:
    totals = None
    for batch in self._batches:
      sums = self._eval_step(params, self._place_batch(batch))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    n = max(float(totals["loss_tokens"]), 1.0)
    loss = float(totals["nll_sum"]) / n
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/accuracy": float(totals["correct_sum"]) / n,
        "eval/loss_tokens": float(totals["loss_tokens"]),
    }

  def generation_metrics(self, params) -> tuple[dict[str, float], list[Sample]]:
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
        Sample(tok.decode(p), ref, pred)
        for p, ref, pred in zip(self._prompts, self._references, predictions)
    ]
    metrics = {
        "eval/exact_match": exact_match(predictions, self._references, self._normalization),
        "eval/token_f1": mean_token_f1(predictions, self._references, self._normalization),
    }
    return metrics, samples
