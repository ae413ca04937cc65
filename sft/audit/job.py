"""The audit job: a finished data build in, review files or figures out, all in the audit's workdir.

    mode "sample"  review.jsonl, review.csv (the same rows) and instructions.md: a stratified sample to fill
    mode "judge"   review-machine.jsonl / .csv: the same sample, its verdicts filled by a model
    mode "score"   report.md and results.json from the filled files `reviews` names (and the build's gold
                   answers), and the "Data quality" section of the build's own report.md
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import ml_collections

from sft.audit import data, judge, review, sample, score
from sft.audit import report as audit_report
from sft.audit.config import check_audit_config
from sft.console import ensure_console_handler
from sft.databuilder.build import REPORT
from sft.databuilder.report import write_json
from sft.databuilder.write import atomic_write_text
from sft.errors import ConfigError, cannot_write

log = logging.getLogger("sft")
SAMPLE = "review"
MACHINE_SAMPLE = "review-machine"
INSTRUCTIONS = "instructions.md"
RESULTS = "results.json"
_FILLED = ("verdict", "right_label", "reviewer", "note")  # the columns a review fills


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, annotator: Any = None) -> dict[str, Any]:
  """Runs the audit `config.mode` describes; `annotator` (sft/annotator/base.py) is the machine reviewer
  mode "judge" needs. Returns what it wrote (sample, judge) or the figures (score)."""
  ensure_console_handler()
  check_audit_config(config)  # every key, before a file is read
  workdir = pathlib.Path(workdir).resolve()  # recorded in reports read from elsewhere (the build's report.md)
  if config.mode == "judge" and annotator is None:
    annotator = _open_annotator(config.judge)
  build = data.open_build(config.build_dir)
  if workdir == build.folder:
    raise ConfigError(f"--workdir {workdir} is the build's own folder: give the audit a workdir of its own")
  _make_workdir(workdir)
  if config.mode == "score":
    return _score(config, build, workdir)
  tokenizer = _tokenizer(config.tokenizer)
  sizes, picked = sample.sample_records(build, config.per_stratum, config.seed)
  rows = [sample.review_row(build, name, sizes[name], record, tokenizer, config.max_text_chars) for name, record in picked]
  if config.mode == "sample":
    _refuse_other_sample(workdir, SAMPLE, rows, "sampling")
    paths = sample.write_rows(workdir, SAMPLE, rows)
    atomic_write_text(workdir / INSTRUCTIONS, sample.instructions(build, rows, config.per_stratum, config.seed))
    log.info("audit: %d records from %d strata to review in %s (how: %s)", len(rows), len(sizes), paths[1], workdir / INSTRUCTIONS)
    return {"rows": len(rows), "strata": len(sizes), "files": [str(p) for p in paths]}
  return _judge(config, workdir, picked, rows, annotator)


def _open_annotator(judge_config) -> Any:
  """The model judge.model names, loaded on first use."""
  if not judge_config.model:
    raise ConfigError(
        "mode=judge needs a model to review with: set judge.model (a training workdir, a Hugging Face folder or the URL "
        "of an OpenAI-compatible server) or "
        "pass annotator= to sft.audit; or review by hand: mode=sample, then mode=score"
    )
  from sft.annotator import open_annotator, open_endpoint  # noqa: PLC0415
  from sft.annotator.endpoint import is_url  # noqa: PLC0415

  if is_url(judge_config.model):  # an OpenAI-compatible server (sft serve, vLLM, a hosted API): its first model
    return open_endpoint(judge_config.model, progress=False, key="judge.model")
  return open_annotator(judge_config.model, batch_size=judge_config.batch_size, key="judge.model")


def _tokenizer(path: str) -> Any:
  if not path:
    return None
  from sft.tokenizer import load_tokenizer  # noqa: PLC0415 (only a configured tokenizer)

  return load_tokenizer(path)


def _make_workdir(workdir: pathlib.Path) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir} is a file, not a folder: give the audit a folder of its own")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as err:  # a file where a parent folder should be
    raise ConfigError(f"--workdir {workdir} cannot be made ({err.strerror}): give the audit a folder of its own") from None


def _refuse_other_sample(workdir: pathlib.Path, stem: str, rows: list[dict[str, Any]], step: str) -> None:
  """A workdir whose review files hold anything but these rows (another sample, or rows being filled)."""
  expected = {f"{stem}.jsonl": sample.jsonl_text(rows), f"{stem}.csv": sample.csv_text(rows)}
  for name, text in expected.items():
    path = workdir / name
    if path.exists() and path.read_bytes() != text.encode("utf-8"):
      raise _other_sample(path, step)


def _other_sample(path: pathlib.Path, step: str) -> ConfigError:
  return ConfigError(
      f"{path} holds another sample (or one being filled), which {step} again would replace: "
      "give the audit another --workdir, or move that file away"
  )


def _refuse_other_machine_sample(workdir: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  """Before the model runs: review-machine.jsonl of another sample (its filled columns aside) would be replaced.
  Hand corrections of this sample are caught once the model's answers are known (_refuse_other_sample)."""
  path = workdir / f"{MACHINE_SAMPLE}.jsonl"
  if not path.exists():
    return
  try:
    held = [{**json.loads(line), **dict.fromkeys(_FILLED, "")} for line in path.read_bytes().splitlines()]
  except (ValueError, TypeError, RecursionError):  # not JSON lines of objects: not a sample this step wrote
    held = None
  if held is None or sample.jsonl_text(held) != sample.jsonl_text(rows):
    raise _other_sample(path, "judging")


def _judge(config, workdir: pathlib.Path, picked, rows: list[dict[str, Any]], annotator: Any) -> dict[str, Any]:
  from sft.annotator.base import Decoding  # noqa: PLC0415

  found = {record["id"]: record for _, record in picked}
  decoding = Decoding(max_new_tokens=config.judge.max_new_tokens)
  _refuse_other_machine_sample(workdir, rows)
  filled, unfilled = judge.fill(rows, found, annotator, config.judge.rubric, decoding, config.judge.batch_size)
  _refuse_other_sample(workdir, MACHINE_SAMPLE, filled, "judging")  # hand corrections, another model's answers
  paths = sample.write_rows(workdir, MACHINE_SAMPLE, filled)
  left = sum(unfilled.values())
  if left:
    counts = ", ".join(f"{n} {reason}" for reason, n in unfilled.items())
    log.warning("audit: %d of %d answers of the machine reviewer filled no row (%s); those rows stay unfilled (see note)", left, len(rows), counts)
  log.info("audit: the machine reviewer filled %d of %d rows: %s", len(rows) - left, len(rows), paths[0])
  # "unparseable": every answer that filled no row, whatever the reason; "unfilled": by reason.
  return {"rows": len(rows), "unparseable": left, "unfilled": unfilled, "files": [str(p) for p in paths]}


def _score(config, build: data.Build, workdir: pathlib.Path) -> dict[str, Any]:
  reviews = review.parse(list(config.reviews), build.sha256)
  idx = score.index(build, {r.record_id for r in reviews.reviews})
  reviews = review.resolve(reviews, idx.known)
  results = {"build": {"folder": str(build.folder), "sha256": build.sha256}, **score.score(idx, reviews, config.bootstrap_samples, config.seed)}
  write_json(workdir / RESULTS, results)
  atomic_write_text(workdir / REPORT, audit_report.write_markdown(results))
  _update_build_report(build, results, workdir / REPORT)
  if not config.reviews and not results["gold"]["kinds"]:
    log.warning("audit: no review file given (reviews) and no gold answer in the build: the report has no figures")
  log.info("audit: %d review rows used, %d rejected; report %s", len(reviews.reviews), len(reviews.rejected), workdir / REPORT)
  return results


def _update_build_report(build: data.Build, results: dict[str, Any], audit_report_path: pathlib.Path) -> None:
  """The build's report.md with its "Data quality" section replaced (or added), the rest as it was."""
  path = build.folder / REPORT
  if not path.is_file():
    log.warning("audit: %s has no %s to add the data quality section to", build.folder, REPORT)
    return
  section = audit_report.quality_section(results, str(audit_report_path))
  try:
    atomic_write_text(path, audit_report.with_section(path.read_text(encoding="utf-8"), section))
  except OSError as err:
    full = cannot_write(err, "the build's report.md", path)
    if full is None:
      raise
    raise full from err
