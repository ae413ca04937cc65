"""Builds raw/ with the default build config and scores every drop reason against gold.jsonl.

    python experiments/annotate_audit/planted/measure.py [--out /tmp/planted-build]

For each drop reason ("stage: reason"): how many records it dropped, its precision (of those, the share
gold.jsonl says to drop, for any reason) and its recall (of the records gold.jsonl plants for that reason,
the share it dropped). Then the clean records lost, one line each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from sft.databuilder import build_config, build_dataset  # noqa: E402


def build(out: pathlib.Path) -> dict[str, dict]:
  """{id: the record's drop ({} when kept)} of a default build of raw/."""
  config = build_config()
  config.input_dir = str(HERE / "raw")
  build_dataset(config, out, progress=False)
  drops = {}
  for path in sorted(out.glob("*.jsonl")):
    for line in path.read_text(encoding="utf-8").splitlines():
      record = json.loads(line)
      drops[record["id"]] = record.get("dropped", {})
  return drops


def scores(drops: dict[str, dict], gold: list[dict]) -> list[tuple[str, int, float, int, float]]:
  """(reason, dropped, precision, planted, recall) per drop reason, found or planted."""
  bad = {g["id"] for g in gold if g["expect"] == "drop"}
  by_reason = collections.defaultdict(set)
  for record_id, dropped in drops.items():
    if dropped:
      by_reason[f"{dropped['stage']}: {dropped['reason']}"].add(record_id)
  planted = collections.defaultdict(set)
  for g in gold:
    if g["stage"]:
      planted[f"{g['stage']}: {g['reason']}"].add(g["id"])
  rows = []
  for reason in sorted(set(by_reason) | set(planted)):
    found, meant = by_reason[reason], planted[reason]
    rows.append((reason, len(found), len(found & bad) / len(found) if found else float("nan"),
                 len(meant), len(found & meant) / len(meant) if meant else float("nan")))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  gold = [json.loads(line) for line in (HERE / "gold.jsonl").read_text(encoding="utf-8").splitlines()]
  out = pathlib.Path(args.out or os.path.join(tempfile.mkdtemp(), "build"))
  drops = build(out)
  print(f"{'reason':36s} {'dropped':>7s} {'precision':>9s} {'planted':>7s} {'recall':>6s}")
  for reason, found, precision, meant, recall in scores(drops, gold):
    print(f"{reason:36s} {found:7d} {precision:9.2f} {meant:7d} {recall:6.2f}")
  lost = [(g["id"], g["why"], drops.get(g["id"])) for g in gold if g["expect"] == "keep" and drops.get(g["id"])]
  kept_bad = [(g["id"], g["why"]) for g in gold if g["expect"] == "drop" and not drops.get(g["id"])]
  clean = sum(g["expect"] == "keep" for g in gold)
  print(f"clean records: {clean}, lost: {len(lost)}; planted defects kept: {len(kept_bad)}")
  for record_id, why, dropped in lost:
    print(f"  lost {record_id} ({why}): {dropped['stage']}: {dropped['reason']} {dropped.get('detail', '')}")
  for record_id, why in kept_bad:
    print(f"  kept {record_id} ({why})")


if __name__ == "__main__":
  main()
