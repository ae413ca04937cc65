"""An evaluation written down: `eval/report.md` for people, `eval/results.json` for programs, and a
confusion-matrix PNG per classification task. The eval job and the end of a training run write it.

    write_report(result, workdir / "eval", about={"model": ..., "data": ..., "step": ...})

Examples in the report are quoted in fenced blocks longer than any backtick run they hold, so a
record's own Markdown (tables, headings, fences) cannot change the report's layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any

from sft.databuilder.write import atomic_write_text
from sft.evaluator import tasks as tasks_lib
from sft.evaluator.evaluate import EvalResult, Sample

REPORT, RESULTS = "report.md", "results.json"
EXAMPLES = 3  # best and worst answers shown per task
QUOTE_CHARS = 600  # an example's prompt is cut to its first and last characters beyond this

# Columns of the per-task table, in order, when any task has them.
_COLUMNS = (
    "loss", "perplexity", "exact_match", "token_f1", "accuracy", "macro_f1", "rouge1", "rouge2", "rougeL",
    "bleu", "chrf", "choice_accuracy", "gold_rank",
)


def _number(value: Any) -> str:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return str(value)
  if math.isnan(value) or math.isinf(value):
    return str(value)
  return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1000 else f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"


def _missing(column: str, info: dict[str, Any]) -> str:
  """A table cell without a value: "no tokens" where a loss was not measured, else empty."""
  return "no tokens" if column in ("loss", "perplexity") and "loss" in info["details"] else ""


def _fence(text: str) -> str:
  longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
  fence = "`" * max(3, longest + 1)
  return f"{fence}text\n{text}\n{fence}"


def _cut(text: str, limit: int = QUOTE_CHARS) -> str:
  return text if len(text) <= limit else f"{text[: limit // 2]} [... {len(text) - limit} characters ...] {text[-limit // 2:]}"


def _cell(text: str) -> str:
  """Text safe inside a Markdown table cell: one line, pipes escaped."""
  return " ".join(str(text).split()).replace("|", "\\|")


def confusion_png(report: dict[str, Any], path: pathlib.Path, title: str) -> pathlib.Path:
  """The classification report's confusion matrix as a PNG: references as rows, answers as columns
  (the last column: answers that are no label), counts written in the cells."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  matrix, rows, columns = report["confusion_matrix"], report["labels"], report["confusion_columns"]
  size = max(4.0, 0.6 * len(columns) + 2.5)
  fig = Figure(figsize=(size, max(3.5, 0.5 * len(rows) + 2.0)), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(matrix, cmap="Blues", aspect="auto")
  fig.colorbar(image, ax=ax)
  ax.set_xticks(range(len(columns)), [_cut(c, 24) for c in columns], rotation=45, ha="right")
  ax.set_yticks(range(len(rows)), [_cut(r, 24) for r in rows])
  ax.set_xlabel("answer")
  ax.set_ylabel("reference")
  ax.set_title(title)
  peak = max((v for row in matrix for v in row), default=0)
  for i, row in enumerate(matrix):
    for j, value in enumerate(row):
      if value:
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, metadata={"Software": None})
  return path


def _example(sample: Sample) -> list[str]:
  return [
      f"score (token F1) {sample.score:.3f}",
      "", "prompt:", _fence(_cut(sample.prompt)), "reference:", _fence(_cut(sample.reference)),
      "answer:", _fence(_cut(sample.prediction)), "",
  ]


def _task_section(task: str, info: dict[str, Any], samples: list[Sample], choices: list[dict[str, Any]], png: str | None) -> list[str]:
  lines = [f"## {task}", "", f"{info['records']:,} records; {info['generated']:,} answered by greedy generation.", ""]
  lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_number(v)} |" for k, v in info["metrics"].items()] + [""]
  details = info["details"]
  if "loss" in details:
    lines += [f"No loss or perplexity: {_cell(details['loss'])}.", ""]
  if "error" in details:
    lines += [f"No classification report: {_cell(details['error'])}", ""]
  report = details.get("classification_report")
  if report:
    lines += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [
        f"| {_cell(label)} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        for label, c in report["per_class"].items()
    ]
    lines += ["", f"Answers that are no label: {report['no_label']['count']}."]
    for text in report["no_label"]["examples"]:
      lines += [_fence(_cut(text, 200))]
    lines += [""]
    if png:
      lines += [f"![confusion matrix]({png})", ""]
  if choices:
    lines += [
        f"Candidates ranked by log-likelihood: {len(choices)} items; the gold's mean rank "
        f"{sum(c['gold_rank'] for c in choices) / len(choices):.2f} of {sum(len(c['choices']) for c in choices) / len(choices):.1f}.", "",
    ]
  if details.get("choices_skipped"):
    lines += ["Items left out of the ranking: " + ", ".join(f"{k}: {v}" for k, v in details["choices_skipped"].items()), ""]
  if samples:
    ranked = sorted(samples, key=lambda s: s.score)
    lines += ["### Best answers", ""]
    for sample in ranked[::-1][:EXAMPLES]:
      lines += _example(sample)
    lines += ["### Worst answers", ""]
    for sample in ranked[:EXAMPLES]:
      lines += _example(sample)
  return lines


def write_report(result: EvalResult, folder: str | pathlib.Path, *, about: dict[str, Any]) -> pathlib.Path:
  """Writes report.md, results.json and confusion-<task>.png into `folder`; returns report.md's path."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  pngs = {}
  for task, info in result.tasks.items():
    report = info["details"].get("classification_report")
    if report:
      pngs[task] = confusion_png(report, folder / f"confusion-{task}.png", f"{task}: accuracy {report['accuracy']:.3f}").name
  results = {
      "about": about,
      "metrics": result.metrics,
      "tasks": result.tasks,
      "samples": [dataclasses.asdict(s) for s in result.samples],
      "choices": result.choices,
      "prompts_truncated": result.prompts_truncated,
  }
  atomic_write_text(folder / RESULTS, json.dumps(results, indent=1, ensure_ascii=False, allow_nan=True) + "\n")

  m = result.metrics
  lines = ["# Evaluation", ""] + [f"- {k}: {_cell(v)}" for k, v in about.items()]
  if result.prompts_truncated:
    cut, answered = result.prompts_truncated, len(result.samples)
    lines += [f"- generation prompts cut to the context: {cut:,} of {answered:,} (their first tokens)"]
  lines += [""]
  lines += ["## All tasks", "", "| metric | value |", "|---|---|"]
  lines += [f"| {k.removeprefix('eval/')} | {_number(v)} |" for k, v in m.items() if k.count("/") == 1]
  columns = [c for c in _COLUMNS if any(c in info["metrics"] for info in result.tasks.values())]
  lines += ["", "## Per task", "", "| task | records | answered | main metric | " + " | ".join(columns) + " |"]
  lines += ["|---" * (4 + len(columns)) + "|"]
  for task, info in result.tasks.items():
    headline = tasks_lib.HEADLINE[task]
    main = f"{headline} {_number(info['metrics'][headline])}" if headline in info["metrics"] else "-"
    cells = [_number(info["metrics"][c]) if c in info["metrics"] else _missing(c, info) for c in columns]
    lines += [f"| {task} | {info['records']:,} | {info['generated']:,} | {main} | " + " | ".join(cells) + " |"]
  lines += [""]
  for task, info in result.tasks.items():
    samples = [s for s in result.samples if s.task == task]
    choices = [c for c in result.choices if c["task"] == task]
    lines += _task_section(task, info, samples, choices, pngs.get(task))
  path = folder / REPORT
  atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
  return path
