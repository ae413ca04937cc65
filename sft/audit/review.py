"""Filled review files read back: every row is used, left unfilled, or rejected with a named reason.

A file is JSONL (.jsonl, .json) or CSV (.csv, as a spreadsheet saves review.csv). What is wrong with one row
(bad JSON or CSV, a field of the wrong type, a verdict that is not keep or drop, an unknown record, a review
id that is not its record's, a right_label that names no label of the record's set or several, a second
review of a record by the same reviewer) rejects that row and is counted; what makes a whole file unusable
(missing, not a review file, a review of another build) is a ConfigError naming it. Nothing here raises
anything else.

The build's records are read once, for the rows that survive the first pass (`parse`), and the rest is
checked against them (`resolve`).

A reviewer is known by name whatever its case ("Alice" and "alice" are one person, shown as first
written), the machine by its exact name, a row with no name by its file.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import pathlib
from typing import Any, Sequence

from sft.audit import sample
from sft.audit.judge import MACHINE
from sft.errors import ConfigError

REQUIRED = ("review_id", "record_id", "verdict")
_TEXT_FIELDS = ("review_id", "record_id", "build", "verdict", "right_label", "reviewer", "note")


@dataclasses.dataclass(frozen=True)
class Review:
  """One filled row: a reviewer's verdict ("keep", "drop" or "") and right label ("" when not given)."""

  review_id: str
  record_id: str
  reviewer: str
  verdict: str
  right_label: str
  file: str
  line: int


@dataclasses.dataclass
class Reviews:
  reviews: list[Review] = dataclasses.field(default_factory=list)
  rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"file", "line", "reason"}
  unfilled: int = 0  # rows with neither a verdict nor a label
  files: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"file", "rows"}

  def reject(self, file: str, line: int, reason: str) -> None:
    self.rejected.append({"file": file, "line": line, "reason": reason})


def _uncell(text: str) -> str:
  """A CSV cell as the sample wrote it: the one quote sample._cell put before it removed."""
  return text.removeprefix("'")


def _csv_rows(name: str, raw: bytes, out: Reviews) -> list[tuple[int, dict[str, Any]]]:
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as err:
    raise ConfigError(f"review file {name} is not UTF-8 text ({err.reason} at byte {err.start}): save it as CSV UTF-8") from None
  reader = csv.reader(io.StringIO(text, newline=""))
  header, rows = None, []
  while True:
    try:
      row = next(reader)
    except StopIteration:
      break
    except csv.Error as err:
      out.reject(name, reader.line_num, f"bad CSV: {err}")
      continue
    if header is None:
      header = [_uncell(h.strip().lstrip("\ufeff")) for h in row]
      missing = [c for c in REQUIRED if c not in header]
      if missing:
        raise ConfigError(f"review file {name} has no column {missing[0]!r}: not a review file (its header is {header[:6]})")
      continue
    if not any(cell.strip() for cell in row):
      continue  # a blank line a spreadsheet left
    if len(row) != len(header):
      out.reject(name, reader.line_num, f"{len(row)} fields, the header has {len(header)}")
      continue
    rows.append((reader.line_num, {h: _uncell(cell) for h, cell in zip(header, row)}))
  return rows


def _jsonl_rows(name: str, raw: bytes, out: Reviews) -> list[tuple[int, dict[str, Any]]]:
  rows = []
  raw = raw.removeprefix(codecs.BOM_UTF8)  # an editor's byte order mark would spoil the first row's JSON
  for number, line in enumerate(raw.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
      out.reject(name, number, "not UTF-8")
      continue
    except (json.JSONDecodeError, RecursionError) as err:
      out.reject(name, number, f"bad JSON: {str(err)[:80]}")
      continue
    if not isinstance(row, dict):
      out.reject(name, number, f"a JSON {type(row).__name__}, not an object")
      continue
    rows.append((number, row))
  return rows


def _fields(row: dict[str, Any]) -> dict[str, str] | str:
  r"""The row's text fields (absent ones "") or why it has none: a field of another type. A record id is
  kept exactly (" a.jsonl:1" is not "a.jsonl:1"), a reviewer's name made one line ("eve\n## x" is "eve ## x"),
  the rest stripped."""
  fields = {}
  for key in _TEXT_FIELDS:
    value = row.get(key)
    if value is None:
      value = ""
    if not isinstance(value, str):
      return f"{key} is a {type(value).__name__}, not text"
    fields[key] = value if key == "record_id" else " ".join(value.split()) if key == "reviewer" else value.strip()
  return fields


def parse(paths: Sequence[str], build_sha256: str) -> Reviews:
  """The rows of every file that pass the checks needing no record of the build."""
  out = Reviews()
  seen_files: set[pathlib.Path] = set()
  seen: dict[tuple[str, str], str] = {}
  names: dict[tuple[str, str], str] = {}  # reviewer identity -> the name shown, as first written
  for path in map(pathlib.Path, paths):
    name = str(path)
    if path.resolve() in seen_files:
      raise ConfigError(f"reviews lists {name} twice")
    seen_files.add(path.resolve())
    if not path.is_file():
      raise ConfigError(f"review file {name} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
      raise ConfigError(f"review file {name}: expected a .jsonl or .csv file (review.jsonl or review.csv as filled)")
    raw = path.read_bytes()
    rows = _csv_rows(name, raw, out) if suffix == ".csv" else _jsonl_rows(name, raw, out)
    out.files.append({"file": name, "rows": len(rows)})
    if not rows:
      out.reject(name, 0, "no review rows in the file")
      continue
    builds = {row["build"].strip() for _, row in rows if isinstance(row.get("build"), str)} - {""}  # as _fields reads it
    if builds and build_sha256 not in builds:
      raise ConfigError(
          f"review file {name} reviews another build (manifest sha256 {sorted(builds)[0][:64]}), not this one "
          f"({build_sha256}): the build was rebuilt or is another; sample this build again"
      )
    for number, row in rows:
      fields = _fields(row)
      if isinstance(fields, str):
        out.reject(name, number, fields)
        continue
      problem = _row_problem(fields, build_sha256)
      if problem:
        out.reject(name, number, problem)
        continue
      if not fields["verdict"] and not fields["right_label"]:
        out.unfilled += 1
        continue
      reviewer = names.setdefault(_identity(fields["reviewer"], name), fields["reviewer"] or f"unnamed ({name})")
      where = f"{name}:{number}"
      if (reviewer, fields["review_id"]) in seen:
        out.reject(name, number, f"{fields['review_id']} reviewed by {reviewer} again (first at {seen[reviewer, fields['review_id']]})")
        continue
      seen[reviewer, fields["review_id"]] = where
      verdict = fields["verdict"].lower()
      out.reviews.append(Review(fields["review_id"], fields["record_id"], reviewer, verdict, fields["right_label"], name, number))
  return out


def _identity(reviewer: str, file: str) -> tuple[str, str]:
  """Who wrote a row: a person's name whatever its case, the machine's exact name (a person signing "Machine"
  is not the model), or, unnamed, the file's path (two unnamed copies of review.csv are two people)."""
  if not reviewer:
    return "file", file
  return ("machine", "") if reviewer == MACHINE else ("person", reviewer.casefold())


def _row_problem(fields: dict[str, str], build_sha256: str) -> str | None:
  if not fields["review_id"] or not fields["record_id"]:
    return "no review_id or record_id"
  if fields["build"] != build_sha256:
    return f"build {fields['build'][:64] or '(empty)'!r} is not this build's"  # whole: a hash cut short shows it
  if fields["verdict"].lower() not in ("", *sample.VERDICTS):
    return f"verdict {fields['verdict'][:40]!r} is not keep or drop"
  if fields["review_id"] != sample.review_id(build_sha256, fields["record_id"]):
    return f"review_id {fields['review_id'][:20]!r} is not the id of record {fields['record_id'][:80]!r}"
  return None


def label_matches(given: str, labels: Sequence[str]) -> list[str]:
  """The labels of `labels` that `given` names: those equal to it (spaces stripped), else equal ignoring case,
  else equal after SQuAD normalisation when that leaves any text. Exactly one is a match; several are
  ambiguous. Of ["positive", "negative"]: "Positive!" -> ["positive"]. Of ["+", "-"]: "-" -> ["-"], never
  "+" (both normalise to ""). Of ["A", "B"]: "the" -> [] (normalised, "the" and "A" are both "")."""
  from sft.evaluator.metrics import normalize_answer  # noqa: PLC0415

  for key in (str.strip, lambda x: x.strip().casefold(), normalize_answer):
    wanted = key(given)
    hits = [x for x in dict.fromkeys(labels) if wanted and key(x) == wanted]
    if hits:
      return hits
  return []


def resolve(reviews: Reviews, known: dict[str, dict[str, Any]]) -> Reviews:
  """The reviews whose record is in the build (`known`: record id -> its facts, see score.index), their
  right_label checked against its label set (`label_matches`) and spelled as the set spells it."""
  kept = []
  for review in reviews.reviews:
    facts = known.get(review.record_id)
    if facts is None:
      reviews.reject(review.file, review.line, f"no record {review.record_id[:80]!r} in this build")
      continue
    if review.right_label:
      if facts["label"] is None:
        reviews.reject(review.file, review.line, f"right_label given for {review.record_id[:80]!r}, which has no label")
        continue
      hits = label_matches(review.right_label, facts["labels"] or [review.right_label])  # no set: any label
      if len(hits) != 1:
        allowed = sample.LABEL_SEPARATOR.join(hits or facts["labels"] or [])
        what = "could be any of the record's labels" if hits else "is not one of the record's labels"
        reviews.reject(review.file, review.line, f"right_label {review.right_label[:40]!r} {what} ({allowed}): write it as the label set does")
        continue
      review = dataclasses.replace(review, right_label=hits[0])
    kept.append(review)
  reviews.reviews = kept
  return reviews
