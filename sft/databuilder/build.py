"""Builds the embedded default dataset (standard-library API questions) into a folder.

    <out>/train.jsonl      chat records for SFT
    <out>/eval.jsonl       held-out chat records (split by a hash of the API they are about)
    <out>/pretrain.jsonl   raw text records for the optional pretraining phase
    <out>/summary.json     what was read, kept and dropped, by reason; the options it was built with

A folder that already holds a dataset built with the same options is reused as it is, so a resumed
run trains on exactly the records it started with.
"""

from __future__ import annotations

import collections
import json
import pathlib
import platform
from typing import Any

from sft.config import ConfigError
from sft.databuilder import stdlib_docs, stdlib_tasks

SPLITS = ("train", "eval", "pretrain")


def _write_jsonl(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  tmp = path.with_suffix(".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
  tmp.replace(path)


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  records = []
  with path.open(encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg}); rebuild the dataset") from None
  return records


def build_stdlib_dataset(out_dir: pathlib.Path, *, eval_fraction: float, salt: str = "") -> dict[str, Any]:
  """Reads the stdlib, writes the splits and summary.json into `out_dir`, returns the summary."""
  if not 0.0 < eval_fraction < 1.0:
    raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  docs, read_stats = stdlib_docs.read_stdlib()
  records, dropped = stdlib_tasks.api_records(docs)
  splits: dict[str, list] = {"train": [], "eval": []}
  for record in records:
    splits[stdlib_tasks.split_of(record["group"], eval_fraction, salt)].append(record)
  splits["pretrain"] = stdlib_tasks.pretrain_texts(docs)

  candidates = collections.Counter(r["task"] for r in records)
  for key, n in dropped.items():
    candidates[key.split(":")[0]] += n
  summary = {
      "options": {"eval_fraction": eval_fraction, "salt": salt, "python": platform.python_version()},
      "read": read_stats,
      "candidates_by_task": dict(sorted(candidates.items())),
      "kept_by_task": dict(sorted(collections.Counter(r["task"] for r in records).items())),
      "dropped_by_reason": dropped,
      "records": {name: len(recs) for name, recs in splits.items()},
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in SPLITS:
    _write_jsonl(out_dir / f"{name}.jsonl", splits[name])
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def get_or_build_stdlib_dataset(out_dir: pathlib.Path, *, eval_fraction: float, salt: str = "") -> tuple[dict, dict]:
  """(splits, summary): loads the dataset in `out_dir` if it was built with these options, else builds it."""
  summary_path = out_dir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
  if summary is None or summary["options"]["eval_fraction"] != eval_fraction or summary["options"]["salt"] != salt:
    if summary is not None:
      raise ConfigError(
          f"{out_dir} holds a dataset built with {summary['options']}; this run asks for "
          f"eval_fraction={eval_fraction}, salt={salt!r}. Use a new workdir or delete that folder."
      )
    summary = build_stdlib_dataset(out_dir, eval_fraction=eval_fraction, salt=salt)
  splits = {name: read_jsonl(out_dir / f"{name}.jsonl") for name in SPLITS}
  return splits, summary
