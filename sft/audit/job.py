"""The audit job: a finished data build in, review files or figures out, all in the audit's workdir.

    mode "sample"  review.jsonl, review.csv (the same rows) and instructions.md: a stratified sample to fill
    mode "judge"   review-machine.jsonl / .csv: the same sample, its verdicts filled by a model
    mode "score"   report.md and results.json from the filled files `reviews` names (and the build's gold
                   answers), and the "Data quality" section of the build's own report.md
"""

from __future__ import annotations

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


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, annotator: Any = None) -> dict[str, Any]:
  """Runs the audit `config.mode` describes; `annotator` (sft/annotator/base.py) is the machine reviewer
  mode "judge" needs. Returns what it wrote (sample, judge) or the figures (score)."""
  ensure_console_handler()
  check_audit_config(config)  # every key, before a file is read
  workdir = pathlib.Path(workdir)
  if config.mode == "judge" and annotator is None:
    annotator = _open_annotator(config.judge)
  build = data.open_build(config.build_dir)
  if workdir.resolve() == build.folder.resolve():
    raise ConfigError(f"--workdir {workdir} is the build's own folder: give the audit a workdir of its own")
  workdir.mkdir(parents=True, exist_ok=True)
  if config.mode == "score":
    return _score(config, build, workdir)
  tokenizer = _tokenizer(config.tokenizer)
  sizes, picked = sample.sample_records(build, config.per_stratum, config.seed)
  rows = [sample.review_row(build, name, sizes[name], record, tokenizer, config.max_text_chars) for name, record in picked]
  if config.mode == "sample":
    _refuse_other_sample(workdir, SAMPLE, rows)
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


def _refuse_other_sample(workdir: pathlib.Path, stem: str, rows: list[dict[str, Any]]) -> None:
  """A workdir whose review files hold anything but these rows (another sample, or rows being filled)."""
  expected = {f"{stem}.jsonl": sample.jsonl_text(rows), f"{stem}.csv": sample.csv_text(rows)}
  for name, text in expected.items():
    path = workdir / name
    if path.exists() and path.read_bytes() != text.encode("utf-8"):
      raise ConfigError(
          f"{path} holds another sample (or one being filled), which sampling again would replace: "
          "give the audit another --workdir, or move that file away"
      )


def _judge(config, workdir: pathlib.Path, picked, rows: list[dict[str, Any]], annotator: Any) -> dict[str, Any]:
  from sft.annotator.base import Decoding  # noqa: PLC0415

  found = {record["id"]: record for _, record in picked}
  decoding = Decoding(max_new_tokens=config.judge.max_new_tokens)
  filled, unparseable = judge.fill(rows, found, annotator, config.judge.rubric, decoding, config.judge.batch_size)
  paths = sample.write_rows(workdir, MACHINE_SAMPLE, filled)
  if unparseable:
    log.warning("audit: %d of %d answers of the machine reviewer were unparseable; their rows stay unfilled (see note)", unparseable, len(rows))
  log.info("audit: the machine reviewer filled %d of %d rows: %s", len(rows) - unparseable, len(rows), paths[0])
  return {"rows": len(rows), "unparseable": unparseable, "files": [str(p) for p in paths]}


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
