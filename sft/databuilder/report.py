"""Measure the data: the manifest's accounting and a Markdown report with PNG plots.

Both are computed from one small "fact" per record (kept or dropped), which the runners bring back
to this process: the records themselves stay in the output files. With a tokenizer configured, the
report links a page of the first train chats with their loss masks (read back from those files).
"""

from __future__ import annotations

import collections
import json
import logging
import pathlib
from typing import Any

from sft.databuilder import records, write

log = logging.getLogger("sft")

# In plots/, which the build moves into place whole, beside report.md.
INSPECT_PAGE = "plots/inspect.html"
INSPECT_CHATS = 8  # chats the page renders
_INSPECT_COMMAND = "`sft inspect --config=<the train config> --workdir=<its workdir>`"
STAGES = ("read", "annotate", "clean", "filter", "decontaminate", "dedup", "judge")
GENERATED = "self-instruct"  # the `annotated` mark of a record a model wrote whole: counted as generated, not read


def fact(record: records.Record, tokenizer: str = "") -> list[dict[str, Any]]:
  """What the report needs of one record; its token count too when a tokenizer is given."""
  text = records.contents(record)
  out = {"id": record["id"], "source": record["source"], "kind": record["kind"], "chars": len(text), "words": len(text.split())}
  if record.get("edits"):
    out["edits"] = record["edits"]
  for name in ("annotated", "judge_score", "label_confidence"):
    if name in record:
      out[name] = record[name]
  if records.is_dropped(record):
    out.update(record["dropped"])
    out["excerpt"] = text[:200]
  else:
    out["split"] = record["split"]
    if record["kind"] == "chat":
      out["task"] = record.get("task", "chat")
    if tokenizer:
      from sft.databuilder.stages import token_counter  # noqa: PLC0415

      out["tokens"] = token_counter(tokenizer)(text)
    if "lang" in record:  # judged by the language filter
      out["lang"] = record["lang"]
    elif record["kind"] == "chat" or len(text) >= 20:
      from sft.databuilder import quality  # noqa: PLC0415

      out["lang"] = quality.identify_language(text)[0]
  return [out]


def accounting(facts: list[dict[str, Any]]) -> dict[str, Any]:
  """Per source: read (or generated, for what a model wrote whole), kept by split, dropped by "stage:
  reason"; raises unless read + generated = kept + dropped."""
  table: dict[str, dict[str, Any]] = {}
  for f in facts:
    row = table.setdefault(f["source"], {
        "read": 0, "generated": 0, "kept": 0, "kept_by_split": collections.Counter(), "dropped": 0,
        "dropped_by_reason": collections.Counter(),
    })
    row["generated" if f.get("annotated") == GENERATED else "read"] += 1
    if "stage" in f:
      row["dropped"] += 1
      row["dropped_by_reason"][f"{f['stage']}: {f['reason']}"] += 1
    else:
      row["kept"] += 1
      row["kept_by_split"][f["split"]] += 1
  for source, row in table.items():
    came = row["read"] + row["generated"]
    if came != row["kept"] + sum(row["dropped_by_reason"].values()) or row["kept"] != sum(row["kept_by_split"].values()):
      raise RuntimeError(f"accounting does not add up for source {source!r}: {row}")
    row["kept_by_split"] = dict(sorted(row["kept_by_split"].items()))
    row["dropped_by_reason"] = dict(sorted(row["dropped_by_reason"].items()))
  total = {
      "read": sum(r["read"] for r in table.values()),
      "generated": sum(r["generated"] for r in table.values()),
      "kept": sum(r["kept"] for r in table.values()),
      "dropped": sum(r["dropped"] for r in table.values()),
  }
  return {"by_source": dict(sorted(table.items())), "total": total}


def funnel(facts: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Records in and out of each stage, in stage order: what was read enters at "read", what a model wrote
  whole (self-instruct, `added`) at "annotate"."""
  dropped = collections.Counter(f["stage"] for f in facts if "stage" in f)
  generated = sum(1 for f in facts if f.get("annotated") == GENERATED)
  remaining, rows = len(facts) - generated, []
  for stage in STAGES:
    added = generated if stage == "annotate" else 0
    remaining += added
    rows.append({"stage": stage, "in": remaining, "added": added, "dropped": dropped[stage], "out": remaining - dropped[stage]})
    remaining -= dropped[stage]
  return rows


def _clusters(facts: list[dict[str, Any]]) -> dict[str, list[str]]:
  members: dict[str, list[str]] = collections.defaultdict(list)
  for f in facts:
    if f.get("duplicate_of"):
      members[f["duplicate_of"]].append(f["id"])
  return members


def _plot(path: pathlib.Path, kind: str, data: dict[str, Any], title: str, xlabel: str) -> str:
  # A Figure with no pyplot: the caller's backend (a notebook's inline plots) is left as it was.
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(7, 3.5), dpi=100)
  ax = fig.subplots()
  if kind == "hist":
    for label, values in data.items():
      if values:
        ax.hist(values, bins=40, alpha=0.6, label=f"{label} ({len(values)})")
    ax.set_yscale("log")
    if any(data.values()):  # an empty build draws no histogram, so there is nothing to label
      ax.legend()
  else:
    labels = list(data)
    ax.barh(labels[::-1], [data[k] for k in labels][::-1])
    ax.tick_params(axis="y", labelsize=7)
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  fig.tight_layout()
  fig.savefig(path, metadata={"Software": None})  # no timestamp: same data, same bytes
  return path.name


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in row) + " |" for row in rows]
  return "\n".join(lines)


# A build of at least this many records draws its plots in a second process while this one writes the shards
# (drawing takes seconds, whatever the size); a smaller build draws them here, after its few records.
BACKGROUND_PLOTS_MIN_RECORDS = 20_000


def plot_jobs(facts: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any], str, str]]:
  """Every plot of the report as (file name in plots/, kind, data, title, x label), from the facts alone."""
  facts = sorted(facts, key=lambda f: f["id"])
  kept = [f for f in facts if "stage" not in f]
  jobs = [("stages.png", "bar", {r["stage"]: r["out"] for r in funnel(facts)}, "records remaining after each stage", "records")]
  by_reason = _by_reason(facts)
  if by_reason:
    order = _reason_order(by_reason)
    jobs.append(("drop_reasons.png", "bar", {f"{s}: {r}": len(by_reason[(s, r)]) for s, r in order[:25]}, "dropped records by reason", "records"))
  for unit in _length_units(kept):
    by_split = collections.defaultdict(list)
    for f in kept:
      by_split[f["split"]].append(f[unit])
    jobs.append((f"length_{unit}.png", "hist", dict(sorted(by_split.items())), f"{unit} per record", unit))
  langs, sources = _mix(kept)
  jobs.append(("languages.png", "bar", dict(langs.most_common(15)), "language of kept records", "records"))
  jobs.append(("sources.png", "bar", dict(sources.most_common(25)), "source of kept records", "records"))
  return jobs


def draw_plots(plots: pathlib.Path, jobs: list[tuple[str, str, dict[str, Any], str, str]]) -> None:
  plots.mkdir(parents=True, exist_ok=True)
  for name, kind, data, title, xlabel in jobs:
    _plot(plots / name, kind, data, title, xlabel)


class BackgroundPlots:
  """The report's plots drawn by a spawned process (spawn: the parent may hold JAX's threads) while the
  build goes on; `wait` joins it, and draws them here should that process have failed."""

  def __init__(self, out_dir: pathlib.Path, facts: list[dict[str, Any]]):
    import multiprocessing  # noqa: PLC0415

    self.plots, self.jobs = out_dir / "plots", plot_jobs(facts)
    self.process = multiprocessing.get_context("spawn").Process(target=draw_plots, args=(self.plots, self.jobs), daemon=True)
    self.process.start()

  def wait(self) -> None:
    self.process.join()
    if self.process.exitcode != 0:
      log.warning("drawing the report's plots in a second process failed (exit code %s): drawing them here", self.process.exitcode)
      draw_plots(self.plots, self.jobs)

  def cancel(self) -> None:
    if self.process.is_alive():
      self.process.kill()
    self.process.join()


def _by_reason(facts: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict]]:
  by_reason: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
  for f in facts:
    if "stage" in f:
      by_reason[(f["stage"], f["reason"])].append(f)
  return by_reason


def _reason_order(by_reason: dict[tuple[str, str], list[dict]]) -> list[tuple[str, str]]:
  return sorted(by_reason, key=lambda k: (STAGES.index(k[0]) if k[0] in STAGES else 99, -len(by_reason[k])))


def _length_units(kept: list[dict[str, Any]]) -> tuple[str, ...]:
  return ("chars", "words", "tokens") if any("tokens" in f for f in kept) else ("chars", "words")


def _mix(kept: list[dict[str, Any]]) -> tuple[collections.Counter, collections.Counter]:
  return collections.Counter(f.get("lang", "not judged (short)") for f in kept), collections.Counter(f["source"] for f in kept)


def write_report(
    out_dir: pathlib.Path, facts: list[dict[str, Any]], manifest: dict[str, Any], examples_per_reason: int,
    plots: BackgroundPlots | None = None,
) -> pathlib.Path:
  """report.md and its plots (plots/*.png) in `out_dir`; `plots`: the plots already being drawn."""
  (out_dir / "plots").mkdir(exist_ok=True)
  facts = sorted(facts, key=lambda f: f["id"])
  kept = [f for f in facts if "stage" not in f]
  acc = manifest["accounting"]
  total = acc["total"]
  generated = f", {total['generated']} generated by the annotator" if total.get("generated") else ""
  md = [f"# Data build report\n\n{total['read']} records read{generated}, {total['kept']} kept, {total['dropped']} dropped.\n"]

  md.append("## Sources\n")
  md.append(_table(["source", "read", "generated", "kept", "dropped", "kept by split"], [
      [s, r["read"], r.get("generated", 0), r["kept"], r["dropped"], ", ".join(f"{k} {v}" for k, v in r["kept_by_split"].items())]
      for s, r in acc["by_source"].items()
  ]))
  md.append("\n## Stages\n")
  rows = funnel(facts)
  md.append(_table(
      ["stage", "in", "of them generated here", "dropped", "out"],
      [[r["stage"], r["in"], r["added"] or "", r["dropped"], r["out"]] for r in rows],
  ))
  if manifest.get("eval_sets"):
    from sft.databuilder import decontaminate  # noqa: PLC0415 (its reasons only)

    decon = collections.Counter(f["reason"] for f in facts if f.get("stage") == "decontaminate")
    num_items = sum(n["items"] for n in manifest["eval_sets"].values())
    md.append(
        f"\nDecontamination against {num_items} eval items: {decon[decontaminate.NGRAM_REASON]} dropped for a shared n-gram, "
        f"{decon[decontaminate.EXACT_REASON]} for holding a short eval item whole (exact).\n"
    )
  md.append("\n![stages](plots/stages.png)\n")

  md += annotation_section(facts, manifest.get("annotation"))
  md.append("## Drop reasons, with examples\n")
  by_reason = _by_reason(facts)
  order = _reason_order(by_reason)
  md.append(_table(["stage", "reason", "records"], [[s, r, len(by_reason[(s, r)])] for s, r in order]))
  for stage, reason in order:
    md.append(f"\n**{stage}: {reason}** ({len(by_reason[(stage, reason)])})\n")
    for f in by_reason[(stage, reason)][:examples_per_reason]:
      excerpt = " ".join(f.get("excerpt", "").split())[:160]
      md.append(f"- `{f['id']}` {f.get('detail', '')} — “{excerpt}”")
  if by_reason:
    md.append("\n![drop reasons](plots/drop_reasons.png)\n")

  edits = collections.Counter()
  for f in facts:
    edits.update(f.get("edits", {}))
  md.append("\n## Cleaning\n")
  md.append(_table(["change", "texts or matches"], [[k, v] for k, v in sorted(edits.items())]) if edits else "Nothing changed.")

  clusters = _clusters(facts)
  md.append("\n## Duplicate clusters\n")
  if clusters:
    sizes = collections.Counter(len(m) + 1 for m in clusters.values())
    md.append(f"{len(clusters)} clusters; size: count " + ", ".join(f"{s}: {n}" for s, n in sorted(sizes.items())) + "\n")
    biggest = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:5]
    md.append(_table(["kept", "size", "dropped (first 5)"], [[k, len(m) + 1, ", ".join(sorted(m)[:5])] for k, m in biggest]))
  else:
    md.append("No duplicates.")

  md.append("\n## Lengths of kept records\n")
  units = _length_units(kept)
  for unit in units:
    md.append(f"![{unit}](plots/length_{unit}.png)\n")
  if "tokens" not in units:
    md.append("Token counts: set filter.length.tokenizer (a SentencePiece .model or a Hugging Face folder) to count tokens.\n")

  langs, sources = _mix(kept)
  md.append("## Language and source mix of kept records\n")
  md.append(_table(["language", "records"], [[k, v] for k, v in langs.most_common(15)]))
  md.append("\n" + _table(["source", "records"], [[k, v] for k, v in sources.most_common()]))
  md.append("\n![languages](plots/languages.png) ![sources](plots/sources.png)\n")
  tasks = collections.Counter((f["task"], f["split"]) for f in kept if "task" in f)
  if tasks:
    splits = sorted({split for _, split in tasks})
    md.append("## Tasks of kept chats\n\nEvaluation scores each task by its own metrics (sft/evaluator/tasks.py).\n")
    names = sorted({task for task, _ in tasks}, key=lambda t: -sum(tasks[t, s] for s in splits))
    md.append(_table(["task", *splits], [[t, *(tasks[t, s] for s in splits)] for t in names]))
  # A manifest made by hand (tests) may have no config: then there is no tokenizer either.
  md += inspect_section(out_dir, manifest.get("config", {}).get("filter", {}).get("length", {}).get("tokenizer", ""))
  if plots is None:
    draw_plots(out_dir / "plots", plot_jobs(facts))
  else:
    plots.wait()
  path = out_dir / "report.md"
  write.atomic_write_text(path, "\n".join(md) + "\n")
  return path


def annotation_section(facts: list[dict[str, Any]], annotation: dict[str, Any] | None) -> list[str]:
  """What the annotator did: who it was and how it decoded, per task what it was given, kept and dropped
  (by reason), the judge's score distribution and the labels' confidence; [] when nothing was annotated."""
  handled = [f for f in facts if f.get("annotated") or "judge_score" in f or f.get("stage") in ("annotate", "judge")]
  if not handled and not annotation:
    return []
  md = ["## Annotation\n"]
  if annotation:
    who = annotation.get("annotator") or {}
    md.append(f"Annotator: `{who.get('model', '')}` ({who.get('backend', '')}, fingerprint {who.get('fingerprint', '')}); "
              f"decoding {json.dumps(annotation.get('decoding', {}), sort_keys=True)}.")
    cache = annotation.get("cache")
    if cache:
      md.append(f"Cache `{cache['path']}`: {cache['hits']} answers reused, {cache['misses']} computed.")
    md.append("")
  kinds = collections.Counter(f.get("annotated") for f in handled if f.get("annotated"))
  rows = []
  for kind in sorted(kinds):
    of_kind = [f for f in facts if f.get("annotated") == kind]
    dropped = collections.Counter(f["reason"] for f in of_kind if f.get("stage") == "annotate")
    later = sum(1 for f in of_kind if "stage" in f and f["stage"] != "annotate")
    rows.append([kind, len(of_kind), len(of_kind) - sum(dropped.values()) - later, later,
                 ", ".join(f"{r} {n}" for r, n in dropped.most_common()) or "-"])
  if rows:
    md.append(_table(["annotation", "records", "kept", "dropped later (filters, dedup, judge)", "dropped by annotation"], rows))
  scores = collections.Counter(f["judge_score"] for f in facts if "judge_score" in f)
  unreadable = sum(1 for f in facts if f.get("stage") == "judge" and f["reason"] == "unreadable score")
  if scores or unreadable:
    md.append("\nJudge scores (1-5): " + ", ".join(f"{s}: {scores[s]}" for s in range(1, 6)) + f"; unreadable: {unreadable}.")
  confidence = sorted(f["label_confidence"] for f in facts if "label_confidence" in f)
  if confidence:
    quartiles = [confidence[int(q * (len(confidence) - 1))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    md.append("\nLabel confidence (probability margin over the runner-up), min / quartiles / max: "
              + " / ".join(f"{x:.3f}" for x in quartiles) + ".")
  return [*md, ""]


def first_chats(out_dir: pathlib.Path, split: str, limit: int) -> list[dict[str, Any]]:
  """The first `limit` chat records of a split's JSONL files (in file order; records sorted by id in each)."""
  chats = []
  for path in sorted(out_dir.glob(f"{split}-*-of-*.jsonl")):
    with path.open(encoding="utf-8") as lines:
      for line in lines:
        record = json.loads(line)
        if "messages" in record:
          chats.append(record)
          if len(chats) == limit:
            return chats
  return chats


def inspect_section(out_dir: pathlib.Path, tokenizer_path: str) -> list[str]:
  """The report's "What training sees": with a tokenizer, INSPECT_PAGE renders the first train chats with
  their loss masks (linked, its warnings listed); without one, how to see them."""
  md = ["\n## What training sees\n"]
  if not tokenizer_path:
    md.append(
        "Set filter.length.tokenizer to render the first train chats here with their loss masks, or see the packed "
        f"rows the model receives with {_INSPECT_COMMAND}.\n"
    )
    return md
  from sft.pipeline import inspect as view  # noqa: PLC0415 (a configured tokenizer only)
  from sft.tokenizer import load_tokenizer  # noqa: PLC0415

  tokenizer = load_tokenizer(tokenizer_path)
  chats, refused = [], []
  for record in first_chats(out_dir, "train", INSPECT_CHATS):
    try:
      tokenizer.tokenize_chat(record["messages"])
      chats.append(record)
    except ValueError as err:  # the chat template refused it, or the tokenizer library failed on it
      refused.append(f"`{record.get('id')}`: {' '.join(str(err).split())[:200]}")
  if not chats and not refused:
    md.append("The train split holds no chat to render.\n")
    return md
  batch, turns = view.chat_batch(chats, tokenizer)
  examples = view.examples_of(batch, turns)
  names = [str(record.get("id")) for record in chats]
  notes = [
      "Whole chats, one per row, as the tokenizer renders them; training packs them into rows of train.seq_len "
      "and cuts longer ones (`sft inspect` shows those rows).",
      *(f"not rendered: {line}" for line in refused),
  ]
  title = f"The first {len(chats)} train chats"
  page = view.render_html(batch, tokenizer, examples, title=title, notes=notes, row_names=names)
  (out_dir / INSPECT_PAGE).parent.mkdir(exist_ok=True)
  write.atomic_write_text(out_dir / INSPECT_PAGE, page)
  md.append(
      f"[The first {len(chats)} train chats]({INSPECT_PAGE}) with the tokens training learns marked "
      f"(tokenizer {tokenizer_path}): {view.summary(examples)}. Training packs chats into rows of train.seq_len: "
      f"{_INSPECT_COMMAND} shows those rows.\n"
  )
  md += [f"- WARNING `{names[e.row]}` {e.warning}" for e in examples if e.warning]
  md += [f"- not rendered: {line}" for line in refused]
  return md


def write_json(path: pathlib.Path, value: Any) -> None:
  write.atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
