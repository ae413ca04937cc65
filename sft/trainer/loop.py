"""`train_and_evaluate(config, workdir)`: data, tokenizer, sharded model, training, evaluation.

The launcher and notebooks call this one function. Running it again on the same workdir resumes from
the latest checkpoint: same data, same tokenizer, the batches that would have come next.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from sft import hf, pipeline
from sft.config import ConfigError
from sft.console import ensure_console_handler
from sft.evaluator import Evaluator
from sft.model import Transformer, count_params, lora
from sft.trainer import sharding, sources
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib
from sft.trainer.checkpoint import Checkpointer
from sft.trainer.metrics_log import MetricsLog, Progress, config_summary, eval_line, format_duration, train_line

log = logging.getLogger("sft")


def build_optimizer(config: ml_collections.ConfigDict, model_cfg):
  """(schedule, optimizer, trainable mask function or None), as the config describes them."""
  tc = config.train
  schedule = state_lib.joined_schedule([
      (tc.pretrain_steps, state_lib.phase_schedule(tc.lr, tc.pretrain_steps, tc.warmup_steps, tc.final_lr_fraction)),
      (tc.sft_steps, state_lib.phase_schedule(tc.lr, tc.sft_steps, tc.warmup_steps, tc.final_lr_fraction)),
  ])
  trainable = (lambda params: lora.trainable_mask(params, model_cfg)) if model_cfg.lora_rank else None
  optimizer = state_lib.make_optimizer(
      schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, grad_clip_norm=tc.grad_clip_norm,
      trainable=trainable,
  )
  return schedule, optimizer, trainable


def _check_batch(name: str, batch_size: int, shards: int) -> None:
  if batch_size % shards or batch_size % jax.process_count():
    raise ConfigError(
        f"{name} ({batch_size}) must divide by the batch shards of the mesh ({shards}) "
        f"and by the number of processes ({jax.process_count()})"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) the job described by `config` in `workdir`; returns the final metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t_start = time.time()
  ensure_console_handler()
  log.info("config:\n%s", config_summary(config))
  (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")  # how to rebuild the model, e.g. to annotate data

  # Config errors surface before any data is built.
  tc = config.train
  model_cfg = sources.model_config(config)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = sharding.logical_rules(config.sharding_rules, mesh)
  shards = sharding.batch_shards(mesh, rules)
  _check_batch("train.batch_size", tc.batch_size, shards)
  _check_batch("eval.batch_size", config.eval.batch_size, shards)
  log.info("devices: %d x %s, %d process(es); mesh %s", jax.device_count(), jax.devices()[0].platform, jax.process_count(), dict(mesh.shape))

  splits, data_summary = sources.load_splits(config, workdir)
  tokenizer = sources.load_tokenizer(config, workdir, splits)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_cfg.vocab_size}")
  log.info("data: %s records; the build read %s", data_summary["records"], data_summary["build"] or "(no manifest)")
  for name in ("pretrain", "train"):
    cut = pipeline.count_truncated(splits[name], tokenizer, tc.seq_len)
    if cut:
      log.info("data: %d of %d %s records are longer than seq_len=%d; their tails are cut", cut, len(splits[name]), name, tc.seq_len)

  model = Transformer(model_cfg)
  schedule, optimizer, trainable = build_optimizer(config, model_cfg)
  dummy = (jnp.zeros((1, tc.seq_len), jnp.int32),) * 3
  abstract_state, state_shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)
  log.info("model: %s parameters", f"{count_params(abstract_state.params):,}")
  if trainable is not None:
    mask = trainable(abstract_state.params)
    n_train = sum(x.size for x, t in zip(jax.tree.leaves(abstract_state.params), jax.tree.leaves(mask)) if t)
    log.info("LoRA: %s trainable adapter parameters (rank %d on %s)", f"{n_train:,}", model_cfg.lora_rank, model_cfg.lora_targets)

  local_rows = tc.batch_size // jax.process_count()
  iterators = {
      phase: iter(
          pipeline.train_dataset(
              records, tokenizer=tokenizer, seq_len=tc.seq_len, batch_size=local_rows, seed=config.seed,
              process_index=jax.process_index(), process_count=jax.process_count(),
          )
      )
      for phase, records in (("pretrain", splits["pretrain"]), ("sft", splits["train"]))
      if records or phase == "sft"
  }
  checkpointer = Checkpointer(
      workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep, save_interval_steps=config.checkpoint.every_steps
  )
  start_step = checkpointer.latest_step() or 0
  if start_step:
    train_state = checkpointer.restore(
        start_step, state_lib.abstract_with_shardings(abstract_state, state_shardings), iterators
    )
    log.info("resumed from %s at step %d", workdir / "checkpoints", start_step)
  elif config.model.checkpoint:
    base_cfg = dataclasses.replace(model_cfg, lora_rank=0)
    params = hf.load_params(config.model.checkpoint, base_cfg, lora.base_params(state_shardings.params))
    if model_cfg.lora_rank:  # fresh adapters beside the loaded weights
      fresh = state_lib.create_train_state(model, optimizer, dummy, state_shardings, jax.random.key(config.seed)).params
      params = lora.with_base(fresh, params)
    train_state = state_lib.train_state_from_params(params, optimizer, state_shardings)
    log.info("weights: loaded from %s", config.model.checkpoint)
  else:
    train_state = state_lib.create_train_state(model, optimizer, dummy, state_shardings, jax.random.key(config.seed))

  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dropout_rng = jax.random.key(config.seed + 1) if model_cfg.lora_dropout else None
  train_step = step_lib.jit_train_step(
      Transformer(model_cfg, train=True).apply, optimizer, schedule, state_shardings, batch_sharding, replicated,
      trainable=trainable, dropout_rng=dropout_rng,
  )
  eval_step = step_lib.jit_eval_step(model.apply, state_shardings.params, batch_sharding, replicated)
  evaluator = Evaluator(
      splits["eval"], tokenizer=tokenizer, model=model, eval_step=eval_step,
      place_batch=lambda batch: sharding.global_batch(batch, batch_sharding),
      seq_len=tc.seq_len, batch_size=config.eval.batch_size, num_generations=config.eval.num_generations,
      max_new_tokens=config.eval.max_new_tokens,
  )
  metrics_log = MetricsLog(workdir / "metrics.jsonl", resume_step=start_step, enabled=jax.process_index() == 0)
  total_steps = tc.pretrain_steps + tc.sft_steps

  def evaluate(step: int) -> dict[str, float]:
    metrics = evaluator.loss_metrics(train_state.params)
    generation, samples = evaluator.generation_metrics(train_state.params)
    metrics.update(generation)
    log.info("%s", eval_line(step, metrics))
    if step != total_steps:
      return metrics
    for s in samples[: config.eval.num_samples_to_print]:
      log.info("  prompt: %s\n    reference: %s\n    generated: %s", s.prompt, s.reference, s.prediction)
    return metrics

  if start_step >= total_steps:
    log.info("already trained for %d steps (train.pretrain_steps + train.sft_steps); raise them to go on", start_step)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if start_step == 0:
      metrics_log.write(0, evaluate(0))
    progress, pending_tokens, last_logged = Progress(total_steps), [], start_step
    for step in range(start_step, total_steps):
      phase = "pretrain" if step < tc.pretrain_steps else "sft"
      batch = sharding.global_batch(next(iterators[phase]), batch_sharding)
      train_state, metrics = train_step(train_state, batch)
      pending_tokens.append(metrics["tokens"])  # stays on device until the next log line
      done, row = step + 1, {}
      if done % tc.log_every == 0 or done == total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        tokens = float(sum(jax.device_get(pending_tokens)))
        tokens_per_s, eta = progress.interval(done, done - last_logged, tokens)
        pending_tokens, last_logged = [], done
        log.info("%s", train_line(done, total_steps, phase, metrics, tokens_per_s, eta))
        row = {"phase": phase, **{f"train/{k}": v for k, v in metrics.items()}, "train/tokens_per_s": tokens_per_s}
      paused = time.time()
      if done % config.eval.every_steps == 0 or done == total_steps:
        row.update(evaluate(done))
      if row:
        metrics_log.write(done, row)
      checkpointer.save(done, train_state, iterators, force=done == total_steps)
      progress.exclude(paused)
  checkpointer.close()
  if config.model.checkpoint:
    exported = sources.export(config, train_state.params, model_cfg, workdir / "hf_export")
    log.info("exported the fine-tuned model for transformers to %s", exported)

  final = metrics_log.history[-1] if metrics_log.history else {}
  summary = {
      "steps": total_steps,
      "eval/loss_first": metrics_log.first("eval/loss"),
      "eval/loss_last": final.get("eval/loss"),
      "eval/exact_match_first": metrics_log.first("eval/exact_match"),
      "eval/exact_match_last": final.get("eval/exact_match"),
      "wall_s": time.time() - t_start,
  }
  if summary["eval/loss_last"] is not None:
    log.info(
        "done in %s: held-out response loss %.3f -> %.3f, exact match %.3f -> %.3f; metrics in %s",
        format_duration(summary["wall_s"]), summary["eval/loss_first"], summary["eval/loss_last"],
        summary["eval/exact_match_first"] or 0.0, summary["eval/exact_match_last"] or 0.0, metrics_log.path,
    )
  return summary
