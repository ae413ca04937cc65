"""An evaluation written down: `eval/report.md` for people, `eval/results.json` for programs, and a
confusion-matrix PNG per classification task. The eval job and the end of a training run write it.

    write_report(result, workdir / "eval", about={"model": ..., "data": ..., "step": ...})

Every generation and choice figure comes with its 95% interval and the number of items it rests on
(`evaluate.intervals_of`): "0.750 [0.505, 0.898]" beside n = 16, marked "few items" under stats.FEW_ITEMS.
results.json keeps "metrics" as metrics.jsonl has them and puts each one's {"low", "high", "n", "method"}
under the same key in "intervals" (and per task, beside the task's "metrics").

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
from sft.evaluator.evaluate import EvalResult, Sample, intervals_of
from sft.evaluator.stats import FEW_ITEMS

REPORT, RESULTS = "report.md", "results.json"
EXAMPLES = 3  # best and worst answers shown per task
QUOTE_CHARS = 600  # an example's prompt is cut to its first and last characters beyond this

# Columns of the per-task table, in order, when any task has them.
_COLUMNS = (
    "loss", "perplexity", "exact_match", "token_f1", "accuracy", "macro_f1", "rouge1", "rouge2", "rougeL",
    "bleu", "chrf", "choice_accuracy", "gold_rank",
)


def number(value: Any) -> str:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return str(value)
  if math.isnan(value) or math.isinf(value):
    return str(value)
  return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1000 else f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"


def _interval(interval: dict[str, Any] | None) -> str:
  return f"[{number(interval['low'])}, {number(interval['high'])}]" if interval else ""


def _items(interval: dict[str, Any] | None) -> str:
  """The item count behind a figure, marked under FEW_ITEMS: '16, few items'."""
  if not interval:
    return ""
  return f"{interval['n']:,}" + (", few items" if interval["n"] < FEW_ITEMS else "")


def _figure(value: Any, interval: dict[str, Any] | None, *, items: bool = True) -> str:
  """'0.750 [0.505, 0.898] (n=16, few items)': the value, its interval and (with `items`) its item count."""
  if not interval:
    return number(value)
  return f"{number(value)} {_interval(interval)}" + (f" (n={_items(interval)})" if items else "")


def _metric_rows(metrics: dict[str, Any], intervals: dict[str, Any]) -> list[str]:
  """A "metric | value | 95% interval | n" table."""
  rows = ["| metric | value | 95% interval | n |", "|---|---|---|---|"]
  for key, value in metrics.items():
    rows.append(f"| {key} | {number(value)} | {_interval(intervals.get(key))} | {_items(intervals.get(key))} |")
  return rows


def _of_task(intervals: dict[str, Any], task: str, metrics: dict[str, Any]) -> dict[str, Any]:
  """A task's intervals, keyed as its metrics."""
  return {k: intervals[f"eval/{task}/{k}"] for k in metrics if f"eval/{task}/{k}" in intervals}


def _how(result: EvalResult) -> str:
  how = result.resampling
  return (
      f"- intervals: {tasks_lib.CONFIDENCE:.0%}; Wilson's for proportions (exact match, accuracy, choice accuracy), "
      f"else a percentile bootstrap over items ({how.samples:,} resamples, seed {how.seed}); n is the items a figure "
      f"rests on, \"few items\" under {FEW_ITEMS}"
  )


def _missing(column: str, info: dict[str, Any]) -> str:
  """A table cell without a value: "no tokens" where a loss was not measured, else empty."""
  return "no tokens" if column in ("loss", "perplexity") and "loss" in info["details"] else ""


def fence(text: str) -> str:
  longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
  marks = "`" * max(3, longest + 1)
  return f"{marks}text\n{text}\n{marks}"


def cut(text: str, limit: int = QUOTE_CHARS) -> str:
  return text if len(text) <= limit else f"{text[: limit // 2]} [... {len(text) - limit} characters ...] {text[-limit // 2:]}"


def cell(text: str) -> str:
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
  ax.set_xticks(range(len(columns)), [cut(c, 24) for c in columns], rotation=45, ha="right")
  ax.set_yticks(range(len(rows)), [cut(r, 24) for r in rows])
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
      "", "prompt:", fence(cut(sample.prompt)), "reference:", fence(cut(sample.reference)),
      "answer:", fence(cut(sample.prediction)), "",
  ]


def _task_section(task: str, info: dict[str, Any], samples: list[Sample], choices: list[dict[str, Any]], png: str | None) -> list[str]:
  lines = [f"## {task}", "", f"{info['records']:,} records; {info['generated']:,} answered by greedy generation.", ""]
  lines += _metric_rows(info["metrics"], info["intervals"]) + [""]
  details = info["details"]
  if "loss" in details:
    lines += [f"No loss or perplexity: {cell(details['loss'])}.", ""]
  if "error" in details:
    lines += [f"No classification report: {cell(details['error'])}", ""]
  report = details.get("classification_report")
  if report:
    lines += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [
        f"| {cell(label)} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        for label, c in report["per_class"].items()
    ]
    lines += ["", f"Answers that are no label: {report['no_label']['count']}."]
    for text in report["no_label"]["examples"]:
      lines += [fence(cut(text, 200))]
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
  intervals = intervals_of(result)
  tasks = {task: {**info, "intervals": _of_task(intervals, task, info["metrics"])}
           for task, info in result.tasks.items()}
  results = {
      "about": about,
      "metrics": result.metrics,
      "intervals": intervals,
      "interval_method": {
          "confidence": tasks_lib.CONFIDENCE, "bootstrap_samples": result.resampling.samples,
          "seed": result.resampling.seed, "few_items": FEW_ITEMS,
      },
      "tasks": tasks,
      "samples": [dataclasses.asdict(s) for s in result.samples],
      "choices": result.choices,
      "prompts_truncated": result.prompts_truncated,
  }
  atomic_write_text(folder / RESULTS, json.dumps(results, indent=1, ensure_ascii=False, allow_nan=True) + "\n")

  m = result.metrics
  lines = ["# Evaluation", ""] + [f"- {k}: {cell(v)}" for k, v in about.items()]
  if result.prompts_truncated:
    cut, answered = result.prompts_truncated, len(result.samples)
    lines += [f"- generation prompts cut to the context: {cut:,} of {answered:,} (their first tokens)"]
  lines += [_how(result), ""]
  lines += ["## All tasks", ""]
  overall = ({k.removeprefix("eval/"): v for k, v in d.items() if k.count("/") == 1} for d in (m, intervals))
  lines += _metric_rows(*overall)
  columns = [c for c in _COLUMNS if any(c in info["metrics"] for info in tasks.values())]
  lines += ["", "## Per task", "", "| task | records | answered | main metric | " + " | ".join(columns) + " |"]
  lines += ["|---" * (4 + len(columns)) + "|"]
  for task, info in tasks.items():
    headline, figures, spans = tasks_lib.HEADLINE[task], info["metrics"], info["intervals"]
    main = f"{headline} {_figure(figures[headline], spans.get(headline))}" if headline in figures else "-"
    cells = [_figure(figures[c], spans.get(c), items=False) if c in figures else _missing(c, info) for c in columns]
    lines += [f"| {task} | {info['records']:,} | {info['generated']:,} | {main} | " + " | ".join(cells) + " |"]
  lines += [""]
  for task, info in tasks.items():
    samples = [s for s in result.samples if s.task == task]
    choices = [c for c in result.choices if c["task"] == task]
    lines += _task_section(task, info, samples, choices, pngs.get(task))
  path = folder / REPORT
  atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
  return path
