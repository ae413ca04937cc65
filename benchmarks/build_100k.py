"""The whole data build on 100,000 short raw records: wall time, records/s and time per stage.

    python benchmarks/build_100k.py [--num_records 100000] [--num_workers 0]

The raw folder (written once into a temporary directory, from a fixed seed) mixes the formats a user
brings: alpaca JSONL, OpenAI-messages JSONL, sharegpt JSON, prompt/completion Parquet and a CSV of
labelled texts (turned into classification examples by the templates). Records are 10-60 words of
English; ~4% are exact copies, ~4% near-duplicates (a word or two changed), ~1% malformed, ~1% have
empty responses, and a few quote an evaluation set. Every stage runs with the default build config
(cleaning, Gopher and SFT filters, language identification, 13-gram decontamination, exact and
MinHash dedup, formatting, ArrayRecord + JSONL shards, report with plots, manifest).

The peer is the floor any builder pays: reading the same files and writing every record once as
JSONL, in this process. The ratio says how much the stages cost on top of plain I/O.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sft.databuilder import build, inputs, readers  # noqa: E402
from sft.databuilder.config import build_config  # noqa: E402
from sft.databuilder.runner_local import LocalRunner  # noqa: E402

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she which do their time "
    "if will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line differ turn cause "
    "much mean before move right boy old too same tell does set three want air well also play small end put home "
    "read hand port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father head stand "
    "own page should country found answer school grow study still learn plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late run "
    "while press close night real life few north open seem together next white children begin got walk example "
    "ease paper group always music those both mark often letter until mile river car feet care second book carry "
    "took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face"
).split()


def sentence(rng: np.random.Generator, low: int, high: int) -> str:
  return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))).capitalize() + "."


def near_copy(rng: np.random.Generator, text: str) -> str:
  words = text.split()
  for _ in range(int(rng.integers(1, 3))):
    words[int(rng.integers(len(words)))] = str(rng.choice(WORDS))
  return " ".join(words)


def make_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  """n (prompt, response) pairs: originals, ~4% exact copies, ~4% near copies, ~1% empty responses."""
  pairs = [(sentence(rng, 6, 16) + " Explain why.", " ".join(sentence(rng, 8, 20) for _ in range(2))) for _ in range(n)]
  for i in rng.choice(n, size=n // 25, replace=False):
    pairs[i] = pairs[int(rng.integers(n))]
  for i in rng.choice(n, size=n // 25, replace=False):
    prompt, response = pairs[int(rng.integers(n))]
    pairs[i] = (prompt, near_copy(rng, response))
  for i in rng.choice(n, size=n // 100, replace=False):
    pairs[i] = (pairs[i][0], "")
  return pairs


def write_raw(folder: pathlib.Path, num_records: int, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
  """The raw folder and an evaluation file; returns (raw dir, eval file)."""
  import pyarrow  # noqa: PLC0415
  import pyarrow.parquet  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  raw = folder / "raw"
  raw.mkdir(parents=True)
  shares = {"alpaca": 0.35, "messages": 0.25, "sharegpt": 0.1, "parquet": 0.15, "csv": 0.15}
  counts = {k: int(num_records * v) for k, v in shares.items()}
  counts["alpaca"] += num_records - sum(counts.values())
  pairs = make_pairs(rng, num_records - counts["csv"])
  eval_items = [{"question": p, "answer": r} for p, r in pairs[:: max(1, len(pairs) // 20)][:20]]
  at = 0

  def take(k):
    nonlocal at
    at += k
    return pairs[at - k:at]

  lines = [json.dumps({"instruction": p, "input": "", "output": r}) for p, r in take(counts["alpaca"])]
  for i in range(0, len(lines), 100):
    lines[i] = lines[i][: len(lines[i]) // 2]  # malformed: cut mid-record
  (raw / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
  lines = [json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}) for p, r in take(counts["messages"])]
  for i in range(0, len(lines), 100):
    lines[i] = json.dumps({"messages": "not a list"})
  (raw / "messages.jsonl").write_text("\n".join(lines) + "\n")
  rows = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]} for p, r in take(counts["sharegpt"])]
  (raw / "sharegpt.json").write_text(json.dumps(rows))
  prompts, completions = zip(*take(counts["parquet"]))
  pyarrow.parquet.write_table(pyarrow.table({"prompt": list(prompts), "completion": list(completions)}), raw / "prompts.parquet")
  labels = ("positive", "negative", "neutral")
  csv_lines = ["text,label"] + [f'"{sentence(rng, 10, 40)}",{labels[int(rng.integers(3))]}' for _ in range(counts["csv"])]
  (raw / "reviews.csv").write_text("\n".join(csv_lines) + "\n")
  eval_file = folder / "eval.jsonl"
  eval_file.write_text("\n".join(json.dumps(e) for e in eval_items) + "\n")
  return raw, eval_file


class TimedRunner(LocalRunner):
  """LocalRunner that adds up wall time per stage name."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.seconds: dict[str, float] = collections.defaultdict(float)

  def _timed(self, method, name, *args):
    start = time.perf_counter()
    out = method(*args, name)
    self.seconds[name] += time.perf_counter() - start
    return out

  def map_chunks(self, coll, fn, name):  # flat_map runs through it
    return self._timed(super().map_chunks, name, coll, fn)

  def group_by(self, coll, key_fn, fn, name):
    return self._timed(super().group_by, name, coll, key_fn, fn)

  def global_apply(self, coll, select, fn, name):
    return self._timed(super().global_apply, name, coll, select, fn)

  def near_duplicates(self, coll, params, name):
    return self._timed(super().near_duplicates, name, coll, params)


def plain_io(raw: pathlib.Path, out: pathlib.Path) -> int:
  """The peer: read every file with the same readers and write each record once as JSONL."""
  count = 0
  with open(out, "w") as f:
    for path in inputs.list_files(raw):
      for item in readers.read_file(path, path.name):
        f.write(json.dumps(item, default=str) + "\n")
        count += 1
  return count


def time_build(raw: pathlib.Path, eval_file: pathlib.Path, num_workers: int, work: pathlib.Path) -> None:
  """Times plain I/O and the whole build of `raw` (default config, `eval_file` to decontaminate against,
  outputs under `work`) and prints the figures."""
  config = build_config()
  config.input_dir = str(raw)
  config.decontaminate.eval_files = (str(eval_file),)
  config.num_workers = num_workers

  start = time.perf_counter()
  plain_io(raw, work / "plain.jsonl")
  io_seconds = time.perf_counter() - start

  runner = TimedRunner(num_workers, progress=False)
  build.make_runner = lambda *a, **k: runner
  start = time.perf_counter()
  manifest = build.build_dataset(config, work / "out", progress=False)
  build_seconds = time.perf_counter() - start

  total = manifest["accounting"]["total"]
  reasons = collections.Counter()
  for source in manifest["accounting"]["by_source"].values():
    reasons.update(source["dropped_by_reason"])
  print(f"cpus: {os.cpu_count()}  workers: {runner.num_workers}  records read: {total['read']}  kept: {total['kept']}  dropped: {total['dropped']}")
  for reason, n in reasons.most_common():
    print(f"  dropped  {n:>6}  {reason}")
  stages = sorted(runner.seconds.items(), key=lambda kv: -kv[1])
  other = build_seconds - sum(runner.seconds.values())  # the evaluation index, the report and its plots, the manifest
  print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stages) + f"; outside the stages {other:.1f}")
  print(f"plain read + write JSONL: {io_seconds:.1f} s")
  print(f"whole build:              {build_seconds:.1f} s  ({total['read'] / build_seconds:,.0f} records/s, {build_seconds / total['read'] * 1e6:.0f} us per record; {build_seconds / io_seconds:.1f}x plain I/O)")
  print(f"target: 100,000 records under 120 s -> {'met' if build_seconds / total['read'] * 100_000 < 120 else 'NOT met'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_records", type=int, default=100_000)
  parser.add_argument("--num_workers", type=int, default=0, help="0: one per CPU")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    raw, eval_file = write_raw(tmp, args.num_records)
    time_build(raw, eval_file, args.num_workers, tmp)


if __name__ == "__main__":
  main()
