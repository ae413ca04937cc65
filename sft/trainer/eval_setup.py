"""The evaluator of a run: one builder for the training loop's evaluations and the eval job's."""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from sft.evaluator import Evaluator
from sft.trainer import setup, sharding
from sft.trainer import step as step_lib


def make_evaluator(
    config: ml_collections.ConfigDict, run: setup.RunSetup, records: Sequence[dict[str, Any]], tokenizer: Any, *,
    param_shardings: Any, seq_len: int, loss_chunk_size: int = 0,
) -> Evaluator:
  """An Evaluator of `records` with the config's eval section (batch, generations, normalisation, prompt
  overflow, intervals) and seed, its steps jitted over `run`'s mesh for parameters placed as `param_shardings`."""
  ec = config.eval
  apply, batch, replicated = run.model.apply, run.batch_sharding, run.replicated
  return Evaluator(
      records, tokenizer=tokenizer, model=run.model,
      eval_step=step_lib.jit_eval_step(apply, param_shardings, batch, replicated, loss_chunk_size=loss_chunk_size),
      place_batch=lambda rows: sharding.global_batch(rows, batch),
      seq_len=seq_len, batch_size=ec.batch_size, num_generations=ec.num_generations,
      max_new_tokens=ec.max_new_tokens, normalization=ec.answer_normalization, out_sharding=replicated,
      score_step=step_lib.jit_score_step(apply, param_shardings, batch, replicated),
      batch_rows=sharding.process_rows(batch, ec.batch_size, seq_len),
      prompt_overflow=ec.prompt_overflow, bootstrap_samples=ec.bootstrap_samples, seed=config.seed,
  )
