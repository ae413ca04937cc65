"""The audit's report.md, and its "Data quality" section in the build's own report.md.

Every figure is shown with the records behind it and its 95% interval; one from fewer than FEW_ITEMS
records is marked "few items".
"""

from __future__ import annotations

import re
from typing import Any

from sft.evaluator.stats import FEW_ITEMS

SECTION = "## Data quality"


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(" ".join(str(x).split()).replace("|", "\\|") for x in row) + " |" for row in rows]
  return "\n".join(lines)


def _text(value: Any) -> str:
  r"""Text from outside (a reviewer's name) as Markdown shows it within a line: on one line, so it starts no
  heading or list, its emphasis, code, link and HTML characters escaped. "eve\n## x" -> "eve \#\# x"."""
  return re.sub(r"([\\`*_\[\]<>#~])", r"\\\1", " ".join(str(value).split()))


def _code(value: Any) -> str:
  """A path as inline code, on one line; fenced with more backticks than it holds."""
  text = " ".join(str(value).split())
  fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
  return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def _names(names: list[str]) -> str:
  return ", ".join(map(_text, names)) or "nobody"


def figure(f: dict[str, Any]) -> str:
  """ "0.750 [0.505, 0.898]", "n/a" when there is no figure, with "(few items)" under FEW_ITEMS records."""
  if f.get("value") is None:
    return "n/a"
  text = f"{f['value']:.3f}"
  if f.get("low") is not None:
    text += f" [{f['low']:.3f}, {f['high']:.3f}]"
  n = f.get("n")
  return text + (" (few items)" if n is not None and n < FEW_ITEMS else "")


def _share(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


def _precision_table(results: dict[str, Any]) -> str:
  rows = [[p["stratum"].removeprefix("dropped: "), p["size"], p["n"], p["k"], figure(p)] for p in results["drop_precision"]]
  if not rows:
    return "No dropped record was reviewed."
  return _table(["drop reason", "records", "reviewed", "judged drop", "precision [95% interval]"], rows)


def _annotation_table(results: dict[str, Any]) -> str:
  rows = [[a["kind"], a["judged_by"], a["n"], a["k"], figure(a)] for a in results["annotation_accuracy"]]
  if not rows:
    return "No annotated record was reviewed."
  return _table(["annotation", "right when", "reviewed", "right", "accuracy [95% interval]"], rows)


def _overall_lines(results: dict[str, Any]) -> list[str]:
  error, recall = results["kept_error"]["overall"], results["recall"]
  return [
      f"- Kept records judged bad (error rate, weighted by stratum sizes): **{figure(error)}**, over strata holding "
      f"{_share(error['coverage'])} of the kept records.",
      f"- Recall of the filters (bad records removed / all bad records): **{figure(recall)}**; estimated bad records "
      f"removed {_count(recall['removed_bad'])}, still kept {_count(recall['kept_bad'])} (reviewed strata hold "
      f"{_share(recall['coverage_dropped'])} of the dropped and {_share(recall['coverage_kept'])} of the kept records).",
  ]


def _count(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.1f}"


def _classification(name: str, report: dict[str, Any] | None) -> list[str]:
  if not report:
    return []
  if "error" in report:
    return [f"\n{name}: no classification report ({report['error']}).\n"]
  md = [f"\n**{name}**: accuracy {report['accuracy']:.3f}, macro F1 {report['macro']['f1']:.3f}, micro F1 {report['micro']['f1']:.3f}\n"]
  md.append(_table(["label", "precision", "recall", "F1", "support"], [
      [label, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]] for label, c in report["per_class"].items()
  ]))
  md.append("\nConfusion matrix (rows: the right label, columns: the record's label):\n")
  md.append(_table(["right \\ given", *report["confusion_columns"]], [
      [label, *row] for label, row in zip(report["labels"], report["confusion_matrix"])
  ]))
  return md


def write_markdown(results: dict[str, Any]) -> str:
  """The audit's report.md."""
  reviews, build = results["reviews"], results["build"]
  md = [
      "# Data audit\n",
      f"Build {_code(build['folder'])} (manifest sha256 `{build['sha256'][:16]}…`), {sum(results['strata'].values())} records "
      f"in {len(results['strata'])} strata. Reviews: {reviews['used']} rows from {len(reviews['files'])} files by "
      f"{_names(reviews['reviewers'])}, on {reviews['records']} records; {reviews['unfilled']} rows left "
      f"unfilled, {len(reviews['rejected'])} rejected, {reviews['split_evenly']} records left out (reviewers split evenly "
      f"on the verdict), {reviews['label_split_evenly']} left out of label accuracy (split evenly on right_label).\n",
      "How each figure is estimated: docs/audit.md and the docstring of sft/audit/score.py.\n",
      "## Precision of each drop reason\n",
      "The share of the reviewed records a reason dropped that the reviewers would drop too.\n",
      _precision_table(results),
      "\n## Error rate of the kept records\n",
  ]
  strata = results["kept_error"]["strata"]
  md.append(_table(["stratum", "records", "reviewed", "judged drop", "error rate [95% interval]"], [
      [s["stratum"], s["size"], s["n"], s["k"], figure(s)] for s in strata
  ]) if strata else "No kept record was reviewed.")
  md += ["\n## Overall\n", *_overall_lines(results)]
  md += ["\n## Annotation accuracy\n", _annotation_table(results)]
  for a in results["annotation_accuracy"]:
    md += _classification(a["kind"], a.get("classification"))
  md.append("\n## Agreement between reviewers\n")
  pairs = results["agreement"]
  md.append(_table(["reviewers", "answer", "shared records", "agreement [95% interval]", "Cohen's kappa [95% interval]"], [
      [f"{_text(p['a'])} vs {_text(p['b'])}" + (" (machine vs person)" if p["machine"] else ""), p["what"], p["kappa"]["n"],
       figure(p["agreement"]), figure(p["kappa"]) if p["kappa"]["value"] is not None else "undefined (one answer only)"]
      for p in pairs
  ]) if pairs else "No record was reviewed by two reviewers.")
  md += ["\n## Gold answers\n", *_gold_lines(results["gold"])]
  md += ["\n## Rejected review rows\n", *_rejected_lines(reviews)]
  return "\n".join(md) + "\n"


def _gold_lines(gold: dict[str, Any]) -> list[str]:
  if not gold["kinds"] and not gold["unusable"]:
    return ["No kept annotated record carries a gold answer."]
  md = ["Every kept annotated record with a `gold` answer, no review needed.\n"]
  md.append(_table(["annotation", "records", "right", "accuracy [95% interval]"], [
      [g["kind"], g["n"], g["k"], figure(g)] for g in gold["kinds"]
  ]))
  md += [f"\n{n} records not scored: {reason}." for reason, n in gold["unusable"].items()]
  for g in gold["kinds"]:
    md += _classification(f"{g['kind']} against gold", g.get("classification"))
  return md


def _rejected_lines(reviews: dict[str, Any]) -> list[str]:
  if not reviews["rejected"]:
    return ["None."]
  md = [_table(["reason", "rows"], [[k, v] for k, v in reviews["rejected_by_reason"].items()])]
  md.append("")
  md += [f"- {_text(r['file'])}:{r['line']}: {_text(r['reason'])}" for r in reviews["rejected"][:50]]
  if len(reviews["rejected"]) > 50:
    md.append(f"- … {len(reviews['rejected']) - 50} more in results.json")
  return md


def quality_section(results: dict[str, Any], audit_report: str) -> str:
  """The build report's "Data quality" section: the headline figures and where the rest is."""
  reviews = results["reviews"]
  md = [
      f"{SECTION}\n",
      f"From an audit of {reviews['records']} reviewed records (by {_names(reviews['reviewers'])}); "
      f"every figure, agreement between reviewers and the rejected review rows: {_code(audit_report)}.\n",
      *_overall_lines(results),
      "",
      _precision_table(results),
      "",
      _annotation_table(results),
  ]
  return "\n".join(md) + "\n"


def with_section(text: str, section: str) -> str:
  """`text` with its SECTION (from its heading to the next "## " heading) replaced by `section`, or with
  `section` appended; any later copy of SECTION (an older audit's, which a reviewer's name once split) removed,
  the rest of `text` byte for byte as it was."""
  lines = text.splitlines(keepends=True)
  starts = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == SECTION]
  if not starts:
    gap = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    return text + gap + section
  out, at = [], 0
  for n, start in enumerate(starts):  # a section ends at the next "## " heading: at or before the next copy
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    out += [*lines[at:start], *([section, "\n" if end < len(lines) else ""] if n == 0 else [])]
    at = end
  return "".join(out + lines[at:])
