"""The eval job: a model and held-out records in, `<workdir>/eval/report.md` and `results.json` out. Its
commands are in the docstring of configs/eval.py.

The model: the latest checkpoint of a training workdir (`eval.model_workdir`; its config.json says how
the model and tokenizer are built), or a Hugging Face folder (`model.checkpoint`). The records: eval
files (`eval.files`, any format the data builder reads; templates give their task), or the validation
split of the run config's data section (a data build's folder, or a build). Nothing is trained.

With `eval.compare_to` (a second training workdir or Hugging Face folder) the job evaluates that model
too, on the same records with the same settings and greedy decoding, one model's parameters in memory at
a time, and writes `<workdir>/eval/compare.md` and `compare.json`: model B (compare_to) against model A
(the one above), per task and metric, with paired intervals and tests (sft/evaluator/compare.py).

The job holds its workdir's lock (one job or training run per workdir), and its workdir is never a
training run's: its report would replace that run's eval/report.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import pathlib
from typing import Any

import ml_collections

from sft import hf
from sft.config_check import check_config
from sft.console import ensure_console_handler
from sft.databuilder import readers
from sft.databuilder import records as records_lib
from sft.errors import ConfigError
from sft.evaluator import EvalResult, write_report
from sft.evaluator import compare as compare_lib
from sft.evaluator import tasks as tasks_lib
from sft.evaluator.evaluate import render_prompt_of
from sft.trainer import eval_setup, lock, multihost, rundir, setup, sources
from sft.trainer.metrics_log import eval_line
from sft.trainer.workdir import Workdir

log = logging.getLogger("sft")
EVAL_DIR = Workdir(".").eval.name
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


def compare_run_config(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, pathlib.Path | None] | None:
  """As model_run_config, for model B (`eval.compare_to`): a training workdir with a checkpoint, or a Hugging
  Face folder; None without one. Anything else is a ConfigError here, before any model is loaded."""
  target = config.eval.compare_to
  if not target:
    return None
  path, key = pathlib.Path(target), f"eval.compare_to={target!r}"
  if not path.is_dir():
    raise ConfigError(f"{key} is not a folder: give a training workdir or a Hugging Face folder to compare with")
  saved = rundir.load_saved_config(path)
  if Workdir(path).checkpoints.exists() or (isinstance(saved, dict) and "train" in saved):  # a training workdir
    run_config = setup.trained_config(config, path, sections=_FROM_EVAL_CONFIG, given_keys=())
    if run_config is None:
      raise ConfigError(f"{key} has no config.json: is it the workdir of a training run?")
    if setup.latest_step(path) is None:
      raise ConfigError(f"{key} has no checkpoint: train there first")
    return run_config, path
  if saved is not None and any(path.glob("*.safetensors")):  # a Hugging Face folder, built as model.checkpoint is
    run_config = copy.deepcopy(config)
    run_config.model.checkpoint = target
    return run_config, None
  raise ConfigError(
      f"{key} holds no checkpoint: give a training workdir with a checkpoint, or a Hugging Face folder "
      "(config.json and *.safetensors)"
  )


def check_own_workdir(workdir: pathlib.Path, model_workdir: pathlib.Path | None) -> None:
  """The eval job writes eval/report.md: never into a training run's workdir, where it would replace
  that run's report."""
  if model_workdir is not None and workdir.resolve() == model_workdir.resolve():
    raise ConfigError(
        f"the eval job's workdir {workdir} is the model's own training workdir (eval.model_workdir), whose eval report "
        "the job would replace: give the eval job a workdir of its own"
    )
  trained = [p.name for p in (Workdir(workdir).config, Workdir(workdir).checkpoints) if p.exists()]
  if trained:
    raise ConfigError(
        f"the eval job's workdir {workdir} holds a training run ({' and '.join(trained)}), whose eval report the job "
        "would replace: give the eval job a workdir of its own"
    )


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, takeover: bool):
  """Process 0 holds the workdir's lock for the whole job, as a training run does (one at a time there)."""
  with contextlib.ExitStack() as stack:
    take = lambda: stack.enter_context(lock.workdir_lock(workdir, takeover=takeover))  # noqa: E731
    multihost.on_process_0(take, "taking the workdir lock")
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
  folder = sources.data_folder(config, workdir)
  return list(splits["eval"]), f"the validation split of {folder} ({len(splits['eval'])} records)"


def evaluate_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, takeover_lock: bool = False) -> dict[str, float]:
  """Evaluates the configured model on the configured records; writes the report (and, with eval.compare_to,
  the comparison); returns the metrics of the configured model."""
  workdir = pathlib.Path(workdir)
  ensure_console_handler()
  check_config(config)
  run_config, model_workdir = model_run_config(config)
  check_config(run_config)
  check_own_workdir(workdir, model_workdir)
  other = compare_run_config(config)
  run = setup.setup_run(run_config)
  run.check_batch("eval.batch_size", config.eval.batch_size)
  if other is not None:
    check_config(other[0])
    other = (*other, setup.setup_run(other[0]))
    other[2].check_batch("eval.batch_size", config.eval.batch_size)
  workdir.mkdir(parents=True, exist_ok=True)
  with _workdir_lock(workdir, takeover_lock):
    return _evaluate(config, workdir, run_config, model_workdir, run, other)


def _load(config, workdir: pathlib.Path, run_config, model_workdir: pathlib.Path | None, run: setup.RunSetup, key: str):
  """(tokenizer, parameters, where they came from) of one model: a training workdir's latest checkpoint, or
  a Hugging Face folder (`model.checkpoint` of `run_config`)."""
  if model_workdir is not None:
    tokenizer = setup.open_tokenizer(run_config, model_workdir)
    if setup.latest_step(model_workdir) is None:
      raise ConfigError(f"{key}={str(model_workdir)!r} has no checkpoint: train there first")
    params, origin = setup.serving_params(run_config, model_workdir, run)
    return tokenizer, params, origin
  tokenizer = setup.open_tokenizer(run_config, workdir)
  checkpoint = run_config.model.checkpoint
  return tokenizer, hf.load_params(checkpoint, run.model_cfg, run.param_shardings), checkpoint


def _run_evaluator(config, run_config, run: setup.RunSetup, tokenizer, params, records) -> EvalResult:
  """One model on the records, with the eval config's settings: what makes two models' results comparable."""
  evaluator = eval_setup.make_evaluator(
      config, run, records, tokenizer, param_shardings=run.param_shardings, seq_len=run_config.train.seq_len
  )
  with run.on_mesh():
    return evaluator.evaluate(params)


def _evaluate(
    config, workdir: pathlib.Path, run_config, model_workdir: pathlib.Path | None, run: setup.RunSetup, other=None
) -> dict[str, float]:
  tokenizer, params, origin = _load(config, workdir, run_config, model_workdir, run, "eval.model_workdir")
  log.info("eval: model %s", origin)
  records, data_about = _eval_records(config, workdir)
  log.info("eval: records from %s", data_about)
  result = _run_evaluator(config, run_config, run, tokenizer, params, records)
  del params  # a second model's parameters take their place
  log.info("%s", eval_line(0, result.metrics).replace("eval @ 0", "eval"))
  seq_len = run_config.train.seq_len
  about = {"model": origin, "records": data_about, "answer normalisation": config.eval.answer_normalization,
           "context": f"train.seq_len={seq_len}, eval.max_new_tokens={config.eval.max_new_tokens}"}
  report = multihost.on_process_0(lambda: write_report(result, workdir / EVAL_DIR, about=about), "writing the eval report")
  log.info("eval: report in %s", report or workdir / EVAL_DIR)
  if other is not None:
    _compare(config, workdir, records, (result, tokenizer, origin, run_config), other, about)
  return result.metrics


def same_prompts(records, indices, tokenizer_a, tokenizer_b) -> bool:
  """Whether both tokenizers render the same generation prompt tokens for every record of `indices`."""
  render = lambda tokenizer, i: render_prompt_of(tokenizer, records[i], i)[0]  # noqa: E731
  return all(render(tokenizer_a, i) == render(tokenizer_b, i) for i in indices)


def _compare(config, workdir: pathlib.Path, records, model_a, other, about_a: dict[str, Any]) -> None:
  """Model B (eval.compare_to) on the same records with the same settings; compare.md and compare.json."""
  result_a, tokenizer_a, origin_a, config_a = model_a
  config_b, workdir_b, run_b = other
  tokenizer_b, params, origin_b = _load(config, workdir, config_b, workdir_b, run_b, "eval.compare_to")
  log.info("eval: comparing with model %s", origin_b)
  result_b = _run_evaluator(config, config_b, run_b, tokenizer_b, params, records)
  del params
  chosen = tasks_lib.pick_for_generation(records, config.eval.num_generations)
  prompts = (
      "the same tokens for both models (one tokenizer)" if same_prompts(records, chosen, tokenizer_a, tokenizer_b)
      else "rendered per model: the two tokenizers differ (the same records, each model's own prompt tokens)"
  )
  seq_a, seq_b = config_a.train.seq_len, config_b.train.seq_len
  about = {
      "A": f"{origin_a} ({'eval.model_workdir' if config.eval.model_workdir else 'model.checkpoint'})",
      "B": f"{origin_b} (eval.compare_to)",
      "records": about_a["records"], "prompts": prompts,
      "decoding": f"greedy, eval.max_new_tokens={config.eval.max_new_tokens}",
      "context": f"train.seq_len={seq_a}" if seq_a == seq_b else f"train.seq_len A {seq_a}, B {seq_b} (each its own)",
      "answer normalisation": config.eval.answer_normalization,
  }
  if result_a.prompts_truncated or result_b.prompts_truncated:
    about["generation prompts cut to the context"] = f"A {result_a.prompts_truncated}, B {result_b.prompts_truncated}"
  comparison = compare_lib.compare(result_a, result_b, normalization=config.eval.answer_normalization,
                                   samples=config.eval.bootstrap_samples, seed=config.seed)
  path = multihost.on_process_0(lambda: compare_lib.write_comparison(comparison, workdir / EVAL_DIR, about=about),
                                "writing the comparison")
  log.info("eval: comparison in %s", path or workdir / EVAL_DIR / compare_lib.COMPARE_MD)
