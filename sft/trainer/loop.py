"""`train_and_evaluate(config, workdir)`: data, tokenizer, sharded model, training, evaluation.

The launcher and notebooks call this one function. Running it again on the same workdir resumes from
the latest checkpoint: same data, same tokenizer, the batches that would have come next.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections

from sft import pipeline
from sft.config_check import check_config
from sft.console import ensure_console_handler
from sft.errors import ConfigError, RunStopped, cannot_write
from sft.evaluator import compare as compare_lib
from sft.evaluator import write_report
from sft.model import Transformer, count_params, lora
from sft.tokenizer import ChatTokenizer
from sft.trainer import eval_setup, flops, lock, multihost, preemption, rundir, setup, sharding, sources
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib
from sft.trainer.checkpoint import Checkpointer
from sft.trainer.curves import plot_curves
from sft.trainer.finite import FLAG_METRICS, FiniteGuard
from sft.trainer.metrics_log import MetricsLog, Progress, config_summary, eval_line, format_duration, train_line
from sft.trainer.workdir import Workdir

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


def make_iterators(config: ml_collections.ConfigDict, splits: dict[str, Any], tokenizer: ChatTokenizer, rows: slice) -> dict[str, Any]:
  """One endless packed-batch iterator per phase with data: the global stream, this process's `rows`."""
  tc = config.train
  return {
      phase: iter(
          pipeline.train_dataset(
              records, tokenizer=tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=config.seed, rows=rows,
          )
      )
      for phase, records in (("pretrain", splits["pretrain"]), ("sft", splits["train"]))
      if records or phase == "sft"
  }


def initial_state(config, run: setup.RunSetup, optimizer, abstract_state, state_shardings, checkpointer: Checkpointer, iterators):
  """(train state, start step): resumed from the latest checkpoint (iterators too), else the Hugging
  Face checkpoint's weights (with fresh LoRA adapters), else a fresh initialisation."""
  dummy, rng = run.dummy_inputs, jax.random.key(config.seed)
  restored = checkpointer.restore_latest(state_lib.abstract_with_shardings(abstract_state, state_shardings), iterators)
  if restored is not None:
    log.info("resumed from %s at step %d", checkpointer.directory, restored[1])
    return restored
  if not config.model.checkpoint:
    return state_lib.create_train_state(run.model, optimizer, dummy, state_shardings, rng), 0
  # Each device reads its own slices; with LoRA only the adapters are initialised (no second base copy).
  params = setup.checkpoint_params(config, run, state_shardings.params, rng)
  log.info("weights: loaded from %s", config.model.checkpoint)
  return state_lib.train_state_from_params(params, optimizer, state_shardings), 0


def _check_data(config, data_summary: dict[str, Any], splits: dict[str, Any], tokenizer, model_cfg) -> None:
  """Before any step: a phase that would train on no token at all is an error; records that train on
  nothing, or lose their tails, are counted in the log."""
  tc = config.train
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_cfg.vocab_size}")
  log.info("data: %s records; the build read %s", data_summary["records"], data_summary["build"])
  for name, steps_key, what in (("pretrain", "pretrain_steps", "token"), ("train", "sft_steps", "response token")):
    if not len(splits[name]):
      continue
    fit = pipeline.split_fit(splits[name], tokenizer, tc.seq_len)
    if fit.loss_tokens == 0 and tc[steps_key] > 0:
      raise ConfigError(_nothing_to_learn(name, fit, what, tc.seq_len))
    if fit.empty:
      log.warning(
          "data: %d of %d %s records have no %s within train.seq_len=%d (their prompts fill it): they train nothing; "
          "raise train.seq_len to keep them", fit.empty, fit.records, name, what, tc.seq_len,
      )
    if fit.cut:
      log.info(
          "data: %d of %d %s records are longer than seq_len=%d; their tails are cut", fit.cut, fit.records, name, tc.seq_len
      )
  for steps_key in ("pretrain_steps", "sft_steps"):
    if 0 < tc[steps_key] < tc.warmup_steps:
      log.warning(
          "train.warmup_steps=%d exceeds train.%s=%d: the learning rate rises for the whole phase and never decays; "
          "lower train.warmup_steps", tc.warmup_steps, steps_key, tc[steps_key],
      )


def _nothing_to_learn(name: str, fit: pipeline.SplitFit, what: str, seq_len: int) -> str:
  if fit.seq_len_needed is None:
    return f"none of the {fit.records} {name} records has a {what} to learn: the {name} split trains nothing"
  return (
      f"none of the {fit.records} {name} records has a {what} within train.seq_len={seq_len} ({fit.cut} are longer, "
      f"their prompts fill it): training would learn nothing; raise train.seq_len to at least {fit.seq_len_needed} "
      "(the shortest prompt), or use shorter prompts"
  )


def _log_model(abstract_params, trainable, model_cfg) -> None:
  log.info("model: %s parameters", f"{count_params(abstract_params):,}")
  if trainable is not None:
    mask = trainable(abstract_params)
    n_train = sum(x.size for x, t in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(mask)) if t)
    log.info("LoRA: %s trainable adapter parameters (rank %d on %s)", f"{n_train:,}", model_cfg.lora_rank, model_cfg.lora_targets)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, annotator: Any = None,
    takeover_lock: bool = False,
) -> dict[str, Any]:
  """Runs (or resumes) the job described by `config` in `workdir`; returns the final metrics. With
  data.source="build", `annotator` serves the data build's model annotation (see sft.jobs);
  `takeover_lock` takes the workdir's lock over from a holder that cannot be checked (lock.workdir_lock).

  Nothing is written before the whole config is checked; one run at a time holds the workdir; a
  resumed run refuses config changes that would mix two experiments (see sft/trainer/rundir.py). A full
  disk, a read-only workdir or a missing permission is a CannotWrite (a ConfigError) naming the path;
  a loss that is not finite is a TrainingDiverged (see sft/trainer/finite.py)."""
  workdir = pathlib.Path(workdir)
  t_start = time.time()
  ensure_console_handler()
  check_config(config)  # every key, before anything is written (cheap: sft.train_and_evaluate has checked it too)
  log.info("config:\n%s", config_summary(config))
  run = setup.setup_run(config)
  if config.train.parallelism == "pmap":
    run.check_pmap_batch("train.batch_size", config.train.batch_size, config.train.grad_accum_steps)
  else:
    run.check_batch("train.batch_size", config.train.batch_size, config.train.grad_accum_steps)
  run.check_batch("eval.batch_size", config.eval.batch_size)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(workdir, takeover_lock):
      start = _check_resume(config, workdir)
      return _train_and_evaluate(config, workdir, run, annotator, t_start, start)
  except (OSError, ValueError) as err:
    failed = cannot_write(err, "the run's files", workdir)
    if failed is None:
      raise
    raise failed from err


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, takeover: bool = False):
  """Process 0 holds the workdir's lock for the whole run; every process stops when it cannot."""
  with contextlib.ExitStack() as stack:
    take = lambda: stack.enter_context(lock.workdir_lock(workdir, takeover=takeover))  # noqa: E731
    multihost.on_process_0(take, "taking the workdir lock")
    yield


def _check_resume(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> int:
  """The step a run starts from; a resumed run's config compared with the saved one (unsafe changes refused)."""
  start = setup.latest_step(workdir) or 0
  if start:
    for line in rundir.resume_changes(rundir.load_saved_config(workdir), config, start):
      log.info("config: changed at resume: %s", line)
  return start


def _record_config(config: ml_collections.ConfigDict, workdir: pathlib.Path, start: int) -> None:
  """Keeps the config as config.json (what serving and annotation rebuild the model from) and
  config-<start step>.json, once the data passed its checks: a run refused for its data leaves none."""
  multihost.on_process_0(lambda: rundir.write_run_config(workdir, config, start), "writing config.json")


def _train_and_evaluate(config, workdir: pathlib.Path, run: setup.RunSetup, annotator, t_start: float, start: int) -> dict[str, Any]:
  tc = config.train
  paths = Workdir(workdir)
  log.info("devices: %d x %s, %d process(es); mesh %s", jax.device_count(), jax.devices()[0].platform, jax.process_count(), dict(run.mesh.shape))
  splits, data_summary = sources.load_splits(config, workdir, annotator=annotator)
  tokenizer = sources.prepare_tokenizer(config, workdir, splits)
  _check_data(config, data_summary, splits, tokenizer, run.model_cfg)
  _record_config(config, workdir, start)

  schedule, optimizer, trainable = build_optimizer(config, run.model_cfg)
  abstract_state, state_shardings = state_lib.state_shardings(run.model, optimizer, run.dummy_inputs, run.mesh, run.rules)
  if tc.parallelism == "pmap":  # data parallel: every device holds the whole state (config_check: no fsdp, no tensor)
    state_shardings = jax.tree.map(lambda _: run.replicated, state_shardings)
  _log_model(run.abstract_params, trainable, run.model_cfg)
  iterators = make_iterators(config, splits, tokenizer, _train_rows(config, run))
  checkpointer = Checkpointer(
      paths.checkpoints, max_to_keep=config.checkpoint.max_to_keep, save_interval_steps=config.checkpoint.every_steps
  )
  train_state, start_step = initial_state(config, run, optimizer, abstract_state, state_shardings, checkpointer, iterators)

  dropout_rng = jax.random.key(config.seed + 1) if run.model_cfg.lora_dropout else None
  stepper = _stepper(config, run, optimizer, schedule, trainable, dropout_rng, state_shardings)
  speed = _speed(config, run)
  evaluator = eval_setup.make_evaluator(
      config, run, splits["eval"], tokenizer, param_shardings=state_shardings.params, seq_len=tc.seq_len,
      loss_chunk_size=tc.loss_chunk_size,
  )
  metrics_log = MetricsLog(paths.metrics, resume_step=start_step, enabled=jax.process_index() == 0)
  total_steps = tc.pretrain_steps + tc.sft_steps

  final = {}  # the last step's evaluation, for the report (and the pretrained model's, to compare with)

  def evaluate(step: int, params) -> dict[str, float]:
    with run.on_mesh():
      result = evaluator.evaluate(params)
    log.info("%s", eval_line(step, result.metrics))
    if step == pretrained_step(config):
      final["pretrained"] = result
    if step == total_steps:
      final["result"] = result
      for s in result.samples[: config.eval.num_samples_to_print]:
        log.info("  prompt: %s\n    reference: %s\n    generated: %s", s.prompt, s.reference, s.prediction)
    return result.metrics

  if start_step >= total_steps:
    log.info("already trained for %d steps (train.pretrain_steps + train.sft_steps); raise them to go on", start_step)
  with stepper.context():
    try:
      if start_step == 0:
        metrics_log.write(0, evaluate(0, train_state.params))
      state = stepper.to_step(train_state)
      del train_state  # pmap: from here the step's replicated state is the only copy
      train_state, skipped_steps = _train(
          config, state, stepper, iterators, checkpointer, metrics_log, evaluate, start_step, speed=speed
      )
    finally:
      checkpointer.close()  # waits for the last save, also when a signal stopped the run
      metrics_log.close()  # the TensorBoard event file, flushed
  if config.model.checkpoint:
    exported = sources.export(config, train_state.params, run.model_cfg, paths.hf_export)
    log.info("exported the fine-tuned model for transformers to %s", exported)
  if metrics_log.enabled:
    log.info("training curves in %s", plot_curves(metrics_log.history, paths.curves))
    if "result" in final:
      about = {"model": f"{paths.checkpoints / str(total_steps)}", "records": f"the eval split ({len(splits['eval'])} records)", "answer normalisation": config.eval.answer_normalization}
      log.info("eval report in %s", write_report(final["result"], paths.eval, about=about))
      _compare_with_pretrained(config, workdir, final, about)
  return _summary(metrics_log, total_steps, time.time() - t_start, skipped_steps)


def pretrained_step(config) -> int | None:
  """The step whose model `eval.compare_pretrained` compares the final one with: the end of pretraining."""
  tc = config.train
  return tc.pretrain_steps if config.eval.compare_pretrained and tc.pretrain_steps and tc.sft_steps else None


def _compare_with_pretrained(config, workdir: pathlib.Path, final: dict[str, Any], about: dict[str, Any]) -> None:
  """eval/compare.md: the final model (B) against the pretrained one (A) on the same items: did SFT help?"""
  step = pretrained_step(config)
  if step is None or "result" not in final:
    return
  if "pretrained" not in final:
    stale = [Workdir(workdir).eval / name for name in (compare_lib.COMPARE_MD, compare_lib.COMPARE_JSON)]
    for path in stale:  # an earlier run's comparison is of another final model: not left beside this report
      path.unlink(missing_ok=True)
    log.warning("eval: no comparison with the pretrained model: this run started after step %d, where it was evaluated", step)
    return
  comparison = compare_lib.compare(
      final["pretrained"], final["result"], normalization=config.eval.answer_normalization,
      samples=config.eval.bootstrap_samples, seed=config.seed,
  )
  total = config.train.pretrain_steps + config.train.sft_steps
  about = {
      "A": f"{Workdir(workdir).checkpoints} at step {step} (the end of pretraining)",
      "B": f"{Workdir(workdir).checkpoints / str(total)} (after SFT)", **{k: v for k, v in about.items() if k != "model"},
      "decoding": f"greedy, eval.max_new_tokens={config.eval.max_new_tokens}",
  }
  log.info("SFT against the pretrained model in %s", compare_lib.write_comparison(comparison, Workdir(workdir).eval, about=about))


def _train_rows(config, run: setup.RunSetup) -> slice:
  """The rows of every global train batch this process reads (see sharding.process_rows)."""
  tc = config.train
  if tc.parallelism == "pmap":
    return sharding.pmap_process_rows(tc.batch_size)
  return sharding.process_rows(run.batch_sharding, tc.batch_size, tc.seq_len)


def _stepper(config, run: setup.RunSetup, optimizer, schedule, trainable, dropout_rng, state_shardings):
  return step_lib.build_train_step(
      Transformer(run.model_cfg, train=True).apply, optimizer, schedule, state_shardings, run.mesh, run.rules,
      trainable=trainable, dropout_rng=dropout_rng, **step_lib.step_options(config.train),
  )


def _speed(config, run: setup.RunSetup):
  """(steps, seconds) -> the model TFLOP/s per device and, where the device's peak is known, the MFU of a log
  interval (flops.achieved); None where the model's FLOPs are not counted."""
  per_step = flops.step_flops(run.model_cfg, config.train.seq_len, config.train.batch_size)
  if per_step is None:
    log.info("model FLOPs: not counted for LoRA or sliding-window models: no TFLOP/s or MFU in the metrics")
    return None
  kind = jax.devices()[0].device_kind
  peak = flops.peak_flops(kind)
  about = f"MFU of {peak / 1e12:g} TFLOP/s bf16 per {kind}" if peak else f"no peak known for {kind!r}: TFLOP/s only, no MFU"
  log.info("model FLOPs: %.4g per step (sft/trainer/flops.py); %s", per_step, about)
  return functools.partial(flops.achieved, per_step, devices=jax.device_count(), peak=peak)


def _train(
    config, state, stepper: step_lib.Stepper, iterators, checkpointer, metrics_log, evaluate, start_step, speed=None
):
  """The loop from `start_step` (`state`: the step's state, see step_lib.Stepper): a step per batch, metric lines
  every log_every, evals and checkpoints; returns the final train state and the number of skipped steps.
  A SIGTERM / SIGINT ends it after the running step with a checkpoint (RunStopped); a step that is not
  finite ends it with a TrainingDiverged, or is skipped (see FiniteGuard)."""
  tc = config.train
  total_steps = tc.pretrain_steps + tc.sft_steps
  progress, pending_tokens, last_logged = Progress(total_steps), [], start_step
  guard = FiniteGuard(config, checkpointer)
  with preemption.StopRequests() as stop:
    for step in range(start_step, total_steps):
      phase = "pretrain" if step < tc.pretrain_steps else "sft"
      batch = stepper.place_batch(next(iterators[phase]))
      state, metrics = stepper.step(state, batch)
      train_state = None  # the train state of this step (layout of the mesh), made when needed
      pending_tokens.append(metrics["tokens"])  # stays on device until the next log line
      guard.add(step + 1, metrics)
      done, row = step + 1, {}
      log_now = done % tc.log_every == 0 or done == total_steps
      if log_now:
        guard.check()
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in FLAG_METRICS}
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        tokens = float(sum(jax.device_get(pending_tokens)))
        tokens_per_s, eta = progress.interval(done, done - last_logged, tokens)
        rates = speed(done - last_logged, progress.last_interval_s) if speed else {}
        skipped = guard.take_unreported() if guard.skip else None
        pending_tokens, last_logged = [], done
        log.info("%s", train_line(done, total_steps, phase, metrics, tokens_per_s, eta, skipped=skipped, speed=rates))
        row = {"phase": phase, **{f"train/{k}": v for k, v in metrics.items()}, "train/tokens_per_s": tokens_per_s}
        row.update({f"train/{k}": v for k, v in rates.items()})
        if skipped is not None:
          row["train/skipped_steps"] = skipped  # since the previous row
      paused = time.time()
      if done % config.eval.every_steps == 0 or done == total_steps or done == pretrained_step(config):
        guard.check()
        train_state = stepper.from_step(state)
        row.update(evaluate(done, train_state.params))
      if row:
        metrics_log.write(done, row)
      stopping = stop.requested(sync=log_now) or checkpointer.reached_preemption(done)
      force = done == total_steps or stopping
      if force or checkpointer.manager.should_save(done):  # the same test as orbax's save
        guard.check()
        checkpointer.save(done, stepper.from_step(state) if train_state is None else train_state, iterators, force=force)
      progress.exclude(paused)
      if stopping and done < total_steps:
        name = signal.Signals(stop.signum or signal.SIGTERM).name
        message = f"stopped by {name} after step {done}; checkpoint saved in {checkpointer.directory}; run the same command to resume"
        log.warning("%s", message)
        raise RunStopped(message, stop.signum or signal.SIGTERM)
  return stepper.from_step(state), guard.skipped


def _summary(metrics_log: MetricsLog, total_steps: int, wall_s: float, skipped_steps: int = 0) -> dict[str, Any]:
  final = metrics_log.history[-1] if metrics_log.history else {}
  summary = {
      "steps": total_steps,
      "eval/loss_first": metrics_log.first("eval/loss"),
      "eval/loss_last": final.get("eval/loss"),
      "eval/exact_match_first": metrics_log.first("eval/exact_match"),
      "eval/exact_match_last": final.get("eval/exact_match"),
      "skipped_steps": skipped_steps,
      "wall_s": wall_s,
  }
  if summary["eval/loss_last"] is not None:
    log.info(
        "done in %s: held-out response loss %s -> %s, exact match %s -> %s%s; metrics in %s",
        format_duration(wall_s),
        *(_number(summary[f"eval/{k}"]) for k in ("loss_first", "loss_last", "exact_match_first", "exact_match_last")),
        f"; {skipped_steps} non-finite steps skipped" if skipped_steps else "", metrics_log.path,
    )
  return summary


def _number(value: Any) -> str:
  """A metric for the summary line: 3 decimals, or what the row holds instead (absent, "nan")."""
  if value is None:
    return "n/a"
  return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)
