"""python experiments/write_results.py --workdir=/tmp/debian-cloze --study=experiments/debian/cloze \
     --title="Cloze on Debian package descriptions" --command="python launch.py ..." [--log=run.log]

Writes <study>/results.md from a finished training workdir: the commands, the data build's
accounting, the model and schedule, held-out metrics at every evaluation and per task at the end
(with the eval report's intervals and item counts), and copies of the run's curves.png, eval report
and confusion matrices beside it.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import shutil

# Metrics shown per evaluation step, when the run has them.
_STEP_COLUMNS = (
    "eval/loss", "eval/exact_match", "eval/token_f1", "eval/classification/accuracy", "eval/classification/macro_f1",
    "eval/summarisation/rouge1", "eval/summarisation/rougeL", "eval/cloze/choice_accuracy", "eval/qa/token_f1",
    "eval/extraction/exact_match",
)


def _fmt(value) -> str:
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _metric_table(metrics: dict, intervals: dict, few_items: int) -> list[str]:
  """metric | value | 95% interval | n; a results.json from before intervals gives the value alone."""
  if not intervals:
    return _table(["metric", "value"], [[k, v] for k, v in metrics.items()])
  rows = []
  for key, value in metrics.items():
    span = intervals.get(key)
    interval = f"[{_fmt(span['low'])}, {_fmt(span['high'])}]" if span else ""
    items = f"{span['n']:,}" + (", few items" if span["n"] < few_items else "") if span else ""
    rows.append([key, value, interval, items])
  return _table(["metric", "value", "95% interval", "n"], rows)


def results_markdown(workdir: pathlib.Path, title: str, commands: list[str], log_text: str = "") -> str:
  config = json.loads((workdir / "config.json").read_text())
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().split("\n") if line.strip()]
  results = json.loads((workdir / "eval" / "results.json").read_text())
  manifest = json.loads((workdir / "data" / "manifest.json").read_text())
  lines = [f"# {title}", "", "Commands:", "", *[f"    {c}" for c in commands], ""]
  total = manifest["accounting"]["total"]
  splits, reasons = collections.Counter(), collections.Counter()
  for row in manifest["accounting"]["by_source"].values():
    splits.update(row["kept_by_split"])
    reasons.update(row["dropped_by_reason"])
  lines += [
      f"Data: the build read {total['read']:,} records and kept {total['kept']:,} "
      f"({', '.join(f'{k} {v:,}' for k, v in sorted(splits.items()))}); dropped: "
      + (", ".join(f"{k} {v:,}" for k, v in reasons.most_common()) or "none") + ".",
      "",
  ]
  m, t = config["model"], config["train"]
  params = re.search(r"model: ([\d,]+) parameters", log_text)
  done = re.search(r"done in ([0-9hms]+)", log_text)
  lines += [
      f"Model: {params.group(1) + ' parameters, ' if params else ''}d_model {m['d_model']}, {m['num_layers']} layers, "
      f"{m['num_heads']} heads ({m['num_kv_heads']} KV), MLP {m['mlp_dim']}, vocabulary {config['tokenizer']['vocab_size']}; "
      f"{t['pretrain_steps']} pretraining + {t['sft_steps']} SFT steps of {t['batch_size']} x {t['seq_len']} tokens, lr {t['lr']}."
      + (f" Wall time on this machine: {done.group(1)}." if done else ""),
      "",
  ]
  evals = [r for r in rows if "eval/loss" in r]
  columns = [c for c in _STEP_COLUMNS if any(c in r for r in evals)]
  lines += ["## Held-out metrics during training", ""]
  lines += _table(["step", *[c.removeprefix("eval/") for c in columns]], [[r["step"], *[r.get(c, "") for c in columns]] for r in evals])
  lines += ["", "## Per task at the end", ""]
  method = results.get("interval_method")
  if method:
    lines += [
        f"With {method['confidence']:.0%} intervals (Wilson's for proportions, else a bootstrap over items, "
        f"{method['bootstrap_samples']:,} resamples) and the items each figure rests on, \"few items\" under "
        f"{method['few_items']}.", "",
    ]
  for task, info in results["tasks"].items():
    lines += [f"**{task}** ({info['records']:,} records, {info['generated']:,} answered)", ""]
    lines += _metric_table(info["metrics"], info.get("intervals", {}), (method or {}).get("few_items", 0)) + [""]
  lines += ["Curves (train and eval loss, learning rate, tokens/s):", "", "![curves](curves.png)", ""]
  for png in sorted((workdir / "eval").glob("confusion-*.png")):
    lines += [f"![{png.stem}]({png.name})", ""]
  lines += ["Best and worst answers per task: [report.md](report.md) (the run's eval/report.md).", ""]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--study", required=True, type=pathlib.Path)
  parser.add_argument("--title", required=True)
  parser.add_argument("--command", action="append", required=True, help="a command that reproduces the run (repeatable)")
  parser.add_argument("--log", type=pathlib.Path, help="the run's log, for its parameter count and wall time")
  parser.add_argument("--notes", default="", help="Markdown appended under 'Notes'")
  args = parser.parse_args()
  log_text = args.log.read_text() if args.log else ""
  text = results_markdown(args.workdir, args.title, args.command, log_text)
  if args.notes:
    text += "\n## Notes\n\n" + args.notes.strip() + "\n"
  args.study.mkdir(parents=True, exist_ok=True)
  (args.study / "results.md").write_text(text)
  shutil.copy2(args.workdir / "curves.png", args.study / "curves.png")
  shutil.copy2(args.workdir / "eval" / "report.md", args.study / "report.md")
  for png in (args.workdir / "eval").glob("confusion-*.png"):
    shutil.copy2(png, args.study / png.name)
  print(f"wrote {args.study / 'results.md'}")


if __name__ == "__main__":
  main()
