"""The eval job: a model and held-out records in, `<workdir>/eval/report.md` and `results.json` out.

    python launch.py --config=configs/eval.py --workdir=/tmp/sft-eval \
        --config.eval.model_workdir=/tmp/sft-quickstart --config.data.dir=/tmp/sft-quickstart/data

The model: the latest checkpoint of a training workdir (`eval.model_workdir`; its config.json says how
the model and tokenizer are built), or a Hugging Face folder (`model.checkpoint`). The records: eval
files (`eval.files`, any format the data builder reads; templates give their task), or the validation
split of a data build (`data.source` "dir" with `data.dir`, or "build"). Nothing is trained.

The job holds its workdir's lock (one job or training run per workdir), and its workdir is never a
training run's: its report would replace that run's eval/report.md.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from sft import hf
from sft.config_check import check_config
from sft.console import ensure_console_handler
from sft.databuilder import readers
from sft.databuilder import records as records_lib
from sft.errors import ConfigError
from sft.evaluator import Evaluator, write_report
from sft.trainer import multihost, rundir, setup, sharding, sources
from sft.trainer import step as step_lib
from sft.trainer.metrics_log import eval_line

log = logging.getLogger("sft")
EVAL_DIR = "eval"
# What the eval config decides even when the model comes from a training workdir's config.json.
_FROM_EVAL_CONFIG = ("job", "eval", "mesh", "sharding_rules", "data", "seed")


def model_run_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, pathlib.Path | None]:
  """(the config that builds the model, the training workdir it comes from or None for a Hugging Face
  folder): a workdir's saved config with this config's eval, data, mesh and sharding sections (the
  eval config's model keys are not used: the model is evaluated as trained)."""
  workdir = config.eval.model_workdir
  if not workdir:
    if not config.model.checkpoint:
      raise ConfigError("the eval job needs a model: set eval.model_workdir (a training workdir) or model.checkpoint (a Hugging Face folder)")
    return config, None
  run_config = setup.trained_config(config, workdir, sections=_FROM_EVAL_CONFIG, given_keys=())
  if run_config is None:
    raise ConfigError(f"eval.model_workdir={workdir!r} has no config.json: is it the workdir of a training run?")
  return run_config, pathlib.Path(workdir)


def check_own_workdir(workdir: pathlib.Path, model_workdir: pathlib.Path | None) -> None:
  """The eval job writes eval/report.md: never into a training run's workdir, where it would replace
  that run's report."""
  if model_workdir is not None and workdir.resolve() == model_workdir.resolve():
    raise ConfigError(
        f"the eval job's workdir {workdir} is the model's own training workdir (eval.model_workdir), whose eval report "
        "the job would replace: give the eval job a workdir of its own"
    )
  trained = [name for name in (rundir.CONFIG_FILE, setup.CHECKPOINTS) if (workdir / name).exists()]
  if trained:
    raise ConfigError(
        f"the eval job's workdir {workdir} holds a training run ({' and '.join(trained)}), whose eval report the job "
        "would replace: give the eval job a workdir of its own"
    )


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, takeover: bool):
  """Process 0 holds the workdir's lock for the whole job, as a training run does (one at a time there)."""
  with contextlib.ExitStack() as stack:
    lock = lambda: stack.enter_context(rundir.workdir_lock(workdir, takeover=takeover))  # noqa: E731
    multihost.on_process_0(lock, "taking the workdir lock")
    yield


def read_eval_files(paths: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """(chat records, counts) of eval files read by the data builder's readers; records that are no chat
  (documents, rejected lines) or have no answer to compare with are counted, not evaluated."""
  records, counts = [], {"files": 0, "chats": 0, "documents": 0, "rejected": 0}
  for name in paths:
    path = pathlib.Path(name)
    if not path.is_file():
      raise ConfigError(f"eval.files: {name!r} is not a file")
    counts["files"] += 1
    for record in readers.read_file(path, path.name):
      if records_lib.is_dropped(record) or record.get("needs_response"):
        counts["rejected"] += 1
        why = record["dropped"] if records_lib.is_dropped(record) else {"reason": "no reference answer", "detail": "its last turn is the user's"}
        log.warning("eval: %s: %s rejected: %s %s", path, record["id"], why["reason"], why["detail"])
      elif record["kind"] == "chat":
        records.append(record)
        counts["chats"] += 1
      else:
        counts["documents"] += 1
  if not records:
    raise ConfigError(f"eval.files {tuple(paths)} hold no chat records to evaluate ({counts})")
  return records, counts


def _eval_records(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[list[dict[str, Any]], str]:
  if config.eval.files:
    records, counts = read_eval_files(config.eval.files)
    return records, f"{', '.join(config.eval.files)} ({counts['chats']} chats; {counts['rejected']} rejected, {counts['documents']} documents not evaluated)"
  splits, _ = sources.load_splits(config, workdir)
  folder = config.data.dir if config.data.source == "dir" else str(workdir / "data")
  return list(splits["eval"]), f"the validation split of {folder} ({len(splits['eval'])} records)"


def evaluate_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, takeover_lock: bool = False) -> dict[str, float]:
  """Evaluates the configured model on the configured records; writes the report; returns the metrics."""
  workdir = pathlib.Path(workdir)
  ensure_console_handler()
  check_config(config)
  run_config, model_workdir = model_run_config(config)
  check_config(run_config)
  check_own_workdir(workdir, model_workdir)
  run = setup.setup_run(run_config)
  run.check_batch("eval.batch_size", config.eval.batch_size)
  workdir.mkdir(parents=True, exist_ok=True)
  with _workdir_lock(workdir, takeover_lock):
    return _evaluate(config, workdir, run_config, model_workdir, run)


def _evaluate(config, workdir: pathlib.Path, run_config, model_workdir: pathlib.Path | None, run: setup.RunSetup):
  if model_workdir is not None:
    tokenizer = setup.open_tokenizer(run_config, model_workdir)
    step = setup.latest_step(model_workdir)
    if step is None:
      raise ConfigError(f"eval.model_workdir={str(model_workdir)!r} has no checkpoint: train there first")
    params, origin = setup.serving_params(run_config, model_workdir, run)
  else:
    tokenizer = setup.open_tokenizer(run_config, workdir)
    params, origin = hf.load_params(config.model.checkpoint, run.model_cfg, run.param_shardings), config.model.checkpoint
  log.info("eval: model %s", origin)
  records, data_about = _eval_records(config, workdir)
  log.info("eval: records from %s", data_about)
  seq_len = run_config.train.seq_len
  evaluator = Evaluator(
      records, tokenizer=tokenizer, model=run.model,
      eval_step=step_lib.jit_eval_step(run.model.apply, run.param_shardings, run.batch_sharding, run.replicated),
      place_batch=lambda batch: sharding.global_batch(batch, run.batch_sharding),
      seq_len=seq_len, batch_size=config.eval.batch_size, num_generations=config.eval.num_generations,
      max_new_tokens=config.eval.max_new_tokens, normalization=config.eval.answer_normalization,
      out_sharding=run.replicated,
      score_step=step_lib.jit_score_step(run.model.apply, run.param_shardings, run.batch_sharding, run.replicated),
      batch_rows=sharding.process_rows(run.batch_sharding, config.eval.batch_size, seq_len),
      prompt_overflow=config.eval.prompt_overflow,
  )
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    result = evaluator.evaluate(params)
  log.info("%s", eval_line(0, result.metrics).replace("eval @ 0", "eval"))
  about = {"model": origin, "records": data_about, "answer normalisation": config.eval.answer_normalization,
           "context": f"train.seq_len={seq_len}, eval.max_new_tokens={config.eval.max_new_tokens}"}
  report = multihost.on_process_0(lambda: write_report(result, workdir / EVAL_DIR, about=about), "writing the eval report")
  log.info("eval: report in %s", report or workdir / EVAL_DIR)
  return result.metrics
