"""The review sample: a stratified, seeded random sample of a build's records, as rows to fill.

Each stratum (sft/audit/data.py) gives `per_stratum` records (all of a smaller one), drawn by a generator
seeded with the seed and the stratum's name: the same build and seed give the same rows, and a stratum's
draw does not move when another stratum appears. A row's review_id is a hash of the build and the record
id, so two samples of one build name a record alike and reviews of it from both can be compared.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import pathlib
import random
from typing import Any, Sequence

from sft.audit import data
from sft.databuilder.write import atomic_write_text

COLUMNS = (
    "review_id", "build", "stratum", "stratum_size", "record_id", "status", "annotated", "label", "labels",
    "marks", "text", "verdict", "right_label", "reviewer", "note",
)
VERDICTS = ("keep", "drop")
LABEL_SEPARATOR = " | "
_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell that starts so as a formula


def review_id(build_sha256: str, record_id: str) -> str:
  return "R" + hashlib.blake2b(f"{build_sha256}:{record_id}".encode("utf-8"), digest_size=6).hexdigest()


def strata(build: data.Build) -> dict[str, list[str]]:
  """Stratum -> the ids of its records, sorted."""
  found: dict[str, list[str]] = collections.defaultdict(list)
  for record in data.records(build):
    found[data.stratum(record)].append(record["id"])
  return {name: sorted(ids) for name, ids in sorted(found.items())}


def draw(members: dict[str, list[str]], per_stratum: int, seed: int) -> dict[str, list[str]]:
  """Stratum -> the ids sampled from it."""
  return {name: random.Random(f"{seed}:{name}").sample(ids, min(per_stratum, len(ids))) for name, ids in members.items()}


def sample_records(build: data.Build, per_stratum: int, seed: int) -> tuple[dict[str, int], list[tuple[str, dict[str, Any]]]]:
  """(stratum -> its size, the sampled (stratum, record) pairs, stratum by stratum in the order drawn)."""
  members = strata(build)
  chosen = draw(members, per_stratum, seed)
  wanted = {record_id for ids in chosen.values() for record_id in ids}
  found = {r["id"]: r for r in data.records(build) if r["id"] in wanted}
  sizes = {name: len(ids) for name, ids in members.items()}
  return sizes, [(name, found[record_id]) for name, ids in chosen.items() for record_id in ids]


def review_row(build: data.Build, name: str, size: int, record: dict[str, Any], tokenizer: Any, limit: int) -> dict[str, Any]:
  """A record's row to review, the verdict columns empty."""
  text, marks = data.review_text(record, tokenizer, limit)
  return {
      "review_id": review_id(build.sha256, record["id"]), "build": build.sha256, "stratum": name,
      "stratum_size": size, "record_id": record["id"], "status": data.status(record),
      "annotated": data.annotation(record) or "", "label": data.label(record) or "",
      "labels": LABEL_SEPARATOR.join(data.labels(record) or ()), "marks": marks, "text": text,
      "verdict": "", "right_label": "", "reviewer": "", "note": "",
  }


def jsonl_text(rows: Sequence[dict[str, Any]]) -> str:
  return "".join(json.dumps({c: row.get(c, "") for c in COLUMNS}, ensure_ascii=False) + "\n" for row in rows)


def _cell(value: Any) -> str:
  """A CSV cell that a spreadsheet shows as text: one that would start a formula gets a leading quote, and so
  does one that starts with a quote, so that reading a cell back (review._uncell) removes exactly one."""
  text = str(value)
  return "'" + text if text.startswith((*_FORMULA, "'")) else text


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(COLUMNS)
  writer.writerows([_cell(row.get(c, "")) for c in COLUMNS] for row in rows)
  return "\ufeff" + out.getvalue()  # the byte order mark tells spreadsheets the file is UTF-8


def write_rows(folder: pathlib.Path, stem: str, rows: Sequence[dict[str, Any]]) -> list[pathlib.Path]:
  """<stem>.jsonl and <stem>.csv in `folder`: the same rows."""
  paths = [folder / f"{stem}.jsonl", folder / f"{stem}.csv"]
  atomic_write_text(paths[0], jsonl_text(rows))
  atomic_write_text(paths[1], csv_text(rows))
  return paths


def instructions(build: data.Build, rows: Sequence[dict[str, Any]], per_stratum: int, seed: int) -> str:
  sizes = collections.Counter(row["stratum"] for row in rows)
  labelled = sum(bool(row["label"]) for row in rows)
  return f"""# Reviewing a sample of the data build

Build: `{build.folder}` (manifest sha256 `{build.sha256}`). {len(rows)} records, up to {per_stratum} from each
of {len(sizes)} strata (seed {seed}). `review.jsonl` and `review.csv` hold the same rows: fill either one.

For every row, fill:

- `verdict`: `keep` when the record is worth training on (correct, helpful, safe, answers its instruction),
  `drop` when it is not. Judge kept and dropped records alike: a dropped record you would keep counts against
  its drop reason.
- `right_label` ({labelled} rows): the right label of a labelled record, one of `labels`; copy `label` when it
  is right.
- `reviewer`: your name (the same in every row); `note`: anything worth saying (optional).

Leave the other columns as they are: a row is matched to its record by `review_id` and `record_id`, and to this
build by `build`. A row left without a verdict or label is not counted. Text between {data.MARK_OPEN} and
{data.MARK_CLOSE} is what training learns from (`marks` says how it was found: the tokenizer's loss mask, or the
assistant turns when the audit had no tokenizer). A spreadsheet cell that starts with `'` had it added so the
spreadsheet shows the text rather than running it.

Two people reviewing the same rows (each their own copy, their own `reviewer`) give the agreement between them.
Score with `--config.mode=score --config.reviews="('review.csv',)"`.
"""
