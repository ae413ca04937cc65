"""python experiments/annotate_audit/run.py [--out /tmp/annotate-audit] [--sft_steps 400]

Annotation and the data audit, measured on real text; writes results.md beside this file.

(a) Labelling. Debian's archive files every package under a section (games, net, python, ...). A small
    annotator is trained on the synopses of some packages with their section; the builder then labels the
    synopses of other packages, which come with the label set but without their section (label task,
    log-likelihood ranking), the section kept as the gold answer (`gold_field`). The audit's gold mode
    scores the labels: accuracy with its Wilson interval, and the classification report.
(b) Filters. A raw folder with planted defects (planted/: each record says whether it must be dropped and
    why) is built with the default config; a review file is written from the planted truth and scored
    by the audit: each drop reason's precision and the filters' recall, with intervals.
(c) Cost. The labelling build once more into a fresh folder with the cache cold, then again with it warm:
    records labelled per second, with and without the cache.

The synopses come from apt's Packages list of this machine (`Description:` first line, `Section:`):
see experiments/debian/packages.py for how the lists are found and read.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import shutil
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "experiments" / "debian")]

import packages  # noqa: E402  (experiments/debian/packages.py)

import sft  # noqa: E402
from sft.audit.config import audit_config  # noqa: E402
from sft.config import base_config  # noqa: E402
from sft.databuilder import build_config  # noqa: E402

SECTIONS = ("doc", "fonts", "games", "libdevel", "net", "python", "science", "sound")
# The defaults this study changed, as planted/measure.py measured them on the commit before (742b084).
BEFORE = [
    "Before the language and near-duplicate defaults changed (`planted/measure.py` on commit 742b084, every",
    "record counted): `filter: language` dropped 11 (precision 0.91), `filter: language: low confidence` 11",
    "(precision 0.00: clean English such as \"Spell the word 'bananas' backwards.\" at en 0.26), `dedup: near",
    "duplicate` 11 (precision 0.36: arithmetic and one-word-answer families sharing a template); 19 of the 91",
    "clean records were lost. On (a)'s 400 unlabelled synopses, near-deduplication of the whole rendered chat",
    "dropped 23 distinct packages (\"Python 3 module for ...\": the instruction and its 8 labels outweighed a",
    "5-word synopsis); it now compares what the template's fields hold and drops none.",
    "",
]
TRAIN_PER_SECTION, HELD_OUT_PER_SECTION = 300, 50


def synopses(lists_dir: pathlib.Path | None) -> dict[str, list[str]]:
  """Section -> distinct synopses of its packages, from the Packages lists."""
  folder = lists_dir or packages.find_lists_dir()
  # The synopsis is in the Packages lists themselves: no English descriptions (Translation-en) needed.
  lists = sorted(p for p in folder.iterdir() if p.is_file() and "_Packages" in p.name) if folder.is_dir() else []
  if not lists:
    raise SystemExit(f"no *_Packages list in {folder}: run `apt-get update` as root")
  by_section: dict[str, set[str]] = collections.defaultdict(set)
  seen = set()
  for path in lists:
    for stanza in packages.parse_stanzas(packages.read_list(path)):
      section = packages.last_section(stanza.get("Section", ""))
      text = stanza.get("Description", "").split("\n")[0].strip()
      if section in SECTIONS and text and text.lower() not in seen:
        seen.add(text.lower())
        by_section[section].add(text)
  return {s: sorted(by_section[s]) for s in SECTIONS}


def split(by_section: dict[str, list[str]], seed: int) -> tuple[list[dict], list[dict]]:
  rng = random.Random(seed)
  train, held_out = [], []
  for section, texts in by_section.items():
    texts = list(texts)
    rng.shuffle(texts)
    held_out += [{"text": t, "labels": list(SECTIONS), "section": section} for t in texts[:HELD_OUT_PER_SECTION]]
    train += [{"text": t, "label": section, "labels": list(SECTIONS)} for t in texts[HELD_OUT_PER_SECTION:][:TRAIN_PER_SECTION]]
  return train, held_out


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def annotator_config(raw: pathlib.Path, sft_steps: int):
  c = base_config()
  c.data.build.stdlib = False
  c.data.build.input_dir = str(raw)
  c.data.build.output.validation_fraction = 0.1
  c.tokenizer.vocab_size = 1024
  c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
  c.train.seq_len = 64
  c.train.batch_size = 32
  c.train.pretrain_steps = 0
  c.train.sft_steps = sft_steps
  c.train.lr = 3e-3
  c.eval.every_steps = sft_steps
  c.eval.num_generations = 0
  c.checkpoint.every_steps = sft_steps
  return c


def label_config(raw: pathlib.Path, model: pathlib.Path, cache: bool):
  c = build_config()
  c.input_dir = str(raw)
  c.gold_field = "section"
  c.annotate.model = str(model)
  c.annotate.cache = cache
  c.annotate.label.method = "loglik"
  return c


def audit(build: pathlib.Path, workdir: pathlib.Path, reviews: tuple[str, ...] = ()) -> dict:
  c = audit_config()
  c.build_dir, c.mode, c.reviews = str(build), "score", reviews
  return sft.audit(c, workdir)


def labelling(out: pathlib.Path, args) -> tuple[list[str], dict]:
  by_section = synopses(args.lists_dir)
  train, held_out = split(by_section, args.seed)
  write_jsonl(out / "raw-train" / "sections.jsonl", train)
  write_jsonl(out / "raw-unlabelled" / "packages.jsonl", held_out)
  workdir = out / "annotator"
  start = time.time()
  sft.train_and_evaluate(annotator_config(out / "raw-train", args.sft_steps), workdir)
  train_s = time.time() - start
  timings = {}  # each build opens the annotator afresh: loading and compiling are in every figure but the warm one
  for name, cache, folder in (("off", False, "labelled-nocache"), ("cold", True, "labelled"), ("warm", True, "labelled")):
    start = time.time()
    manifest = sft.build_dataset(label_config(out / "raw-unlabelled", workdir, cache), out / folder, progress=False)
    timings[name] = time.time() - start
  results = audit(out / "labelled", out / "audit-labels")
  gold = {row["kind"]: row for row in results["gold"]["kinds"]}["label"]
  majority = max(collections.Counter(r["section"] for r in held_out).values()) / len(held_out)
  total = manifest["accounting"]["total"]
  md = [
      "## (a) Labelling Debian packages with their section",
      "",
      f"Annotator: {sum(len(v) for v in by_section.values())} distinct synopses in {len(SECTIONS)} sections "
      f"({', '.join(SECTIONS)}); trained on {len(train)} of them with their section ({args.sft_steps} SFT steps, "
      f"{train_s:.0f} s), then asked to label {len(held_out)} others, given the label set only.",
      "",
      f"The build read {total['read']} records and kept {total['kept']}; dropped: "
      + (", ".join(f"{k} {v}" for k, v in _drops(manifest).items()) or "none") + ".",
      "",
      "| figure | value |",
      "|---|---|",
      f"| label accuracy against the archive's section (gold mode) | {gold['value']:.3f} "
      f"[{gold['low']:.3f}, {gold['high']:.3f}] (Wilson 95%, n={gold['n']}) |",
      f"| macro F1 | {gold['classification']['macro']['f1']:.3f} |",
      f"| majority-section baseline | {majority:.3f} |",
      f"| chance (1 of {len(SECTIONS)}) | {1 / len(SECTIONS):.3f} |",
      "",
      "Per section (the audit's classification report):",
      "",
      "| section | precision | recall | F1 | support |",
      "|---|---|---|---|---|",
  ]
  for label, row in gold["classification"]["per_class"].items():
    md.append(f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
  return md + [""] + _cost(len(held_out), timings), results


def _drops(manifest: dict) -> dict[str, int]:
  counts = collections.Counter()
  for row in manifest["accounting"]["by_source"].values():
    counts.update(row["dropped_by_reason"])
  return dict(counts.most_common())


def _cost(n: int, timings: dict) -> list[str]:
  plain = timings["off"]
  return [
      "## (c) The cost of annotation, with and without the cache",
      "",
      f"The labelling build of {n} records ({len(SECTIONS)} log-likelihoods each), the whole build timed "
      "(reading, filters, deduplication and writing included; each build but the last loads the annotator and "
      "compiles its scoring step, the last never loads it):",
      "",
      "| build | wall time | records/s |",
      "|---|---|---|",
      f"| cache off | {plain:.1f} s | {n / plain:.1f} |",
      f"| cache on, first run (every answer computed and stored) | {timings['cold']:.1f} s | {n / timings['cold']:.1f} |",
      f"| cache on, run again (every answer from the cache) | {timings['warm']:.1f} s | {n / timings['warm']:.1f} |",
      "",
      f"The cached rerun is {plain / timings['warm']:.1f}x faster than a build without the cache.",
      "",
  ]


def filters(out: pathlib.Path, per_stratum: int, seed: int) -> list[str]:
  """(b): the planted build, sampled by the audit, its sample filled from the planted truth, scored; beside
  each estimate, the exact figure from every record's truth."""
  planted = HERE / "planted"
  gold = {g["id"]: g for g in (json.loads(x) for x in (planted / "gold.jsonl").read_text().splitlines())}
  config = build_config()
  config.input_dir = str(planted / "raw")
  manifest = sft.build_dataset(config, out / "planted", progress=False)
  c = audit_config()
  c.build_dir, c.per_stratum, c.seed = str(out / "planted"), per_stratum, seed
  sft.audit(c, out / "audit-planted")
  rows = [json.loads(x) for x in (out / "audit-planted" / "review.jsonl").read_text().splitlines()]
  for row in rows:
    truth = gold.get(row["record_id"])
    row["verdict"], row["reviewer"] = ("" if truth is None else truth["expect"]), "planted truth"
  write_jsonl(out / "audit-planted" / "review-planted.jsonl", rows)
  results = audit(out / "planted", out / "audit-planted", (str(out / "audit-planted" / "review-planted.jsonl"),))
  exact = _exact(out / "planted", gold)
  total = manifest["accounting"]["total"]
  md = [
      "## (b) The audit against planted defects",
      "",
      f"`planted/raw`: {len(gold)} records, {sum(g['expect'] == 'drop' for g in gold.values())} of them planted defects "
      f"(foreign language, exact and near copies, refusals, empty answers; `planted/gold.jsonl` says which and why). "
      f"The default build read {total['read']}, kept {total['kept']}, dropped {total['dropped']}. The audit sampled "
      f"{len(rows)} records ({per_stratum} per stratum at most), their verdicts were filled from the planted truth, and "
      "it estimated each figure; the exact figure counts every record.",
      "",
      "| drop reason | dropped | precision, audit estimate (Wilson 95%, n reviewed) | precision, exact |",
      "|---|---|---|---|",
  ]
  for row in results["drop_precision"]:
    reason = row["stratum"].removeprefix("dropped: ")
    md.append(f"| {reason} | {row['size']} | {_figure(row)} | {exact['precision'].get(reason, float('nan')):.3f} |")
  recall = results["recall"]
  md += ["", *BEFORE]
  md += [
      "",
      f"Recall of the filters as a whole (bad records removed / all bad records): audit estimate {_figure(recall)}, "
      f"exact {exact['recall']:.3f}. Error rate of the kept records: audit estimate {_figure(results['kept_error']['overall'])}, "
      f"exact {exact['kept_error']:.3f}. Clean records lost: {exact['lost']} of {exact['clean']}.",
      "",
  ]
  return md


def _figure(row: dict) -> str:
  if row.get("value") is None:
    return "-"
  n = f", n={row['n']}" if "n" in row else ""
  return f"{row['value']:.3f} [{row['low']:.3f}, {row['high']:.3f}{n}]"


def _exact(build: pathlib.Path, gold: dict[str, dict]) -> dict:
  """Every record's fate against its planted truth: precision per drop reason, recall, kept error rate."""
  fate = {}
  for path in build.glob("*.jsonl"):
    for line in path.read_text(encoding="utf-8").splitlines():
      record = json.loads(line)
      dropped = record.get("dropped")
      fate[record["id"]] = f"{dropped['stage']}: {dropped['reason']}" if dropped else ""
  bad = {i for i, g in gold.items() if g["expect"] == "drop"}
  by_reason = collections.defaultdict(list)
  for record_id, reason in fate.items():
    if reason:
      by_reason[reason].append(record_id in bad)
  kept = [i for i, r in fate.items() if not r]
  return {
      "precision": {r: sum(v) / len(v) for r, v in by_reason.items()},
      "recall": sum(1 for i in bad if fate.get(i)) / len(bad),
      "kept_error": sum(1 for i in kept if i in bad) / max(len(kept), 1),
      "lost": sum(1 for i, g in gold.items() if g["expect"] == "keep" and fate.get(i)),
      "clean": sum(1 for g in gold.values() if g["expect"] == "keep"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/annotate-audit"))
  parser.add_argument("--lists_dir", type=pathlib.Path, default=None)
  parser.add_argument("--sft_steps", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--per_stratum", type=int, default=10, help="(b): records the audit samples per stratum")
  args = parser.parse_args()
  if args.out.exists():
    shutil.rmtree(args.out)
  start = time.time()
  md_b = filters(args.out, args.per_stratum, args.seed)
  md_a, _ = labelling(args.out, args)
  md = [
      "# Annotation and the data audit: measured",
      "",
      f"Written by `python experiments/annotate_audit/run.py` ({time.time() - start:.0f} s on this machine).",
      "",
      *md_a[: md_a.index("## (c) The cost of annotation, with and without the cache")],
      *md_b,
      *md_a[md_a.index("## (c) The cost of annotation, with and without the cache"):],
  ]
  (HERE / "results.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
