"""Write: every split as ArrayRecord shards (what grain reads) and JSONL (what people read).

    <out>/train-00000-of-00001.array_record    one JSON-encoded chat record per entry
    <out>/train-00000-of-00001.jsonl           the same records, one per line
    <out>/validation-*, <out>/pretrain-*       (pretrain: raw text records)
    <out>/rejected-*.jsonl                     every dropped record with its stage, reason and detail

A record's shard is a stable hash of its id; inside a shard records are sorted by id, so the same
input and config give byte-identical files whichever runner wrote them.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

from sft.databuilder import records

SPLITS = ("train", "validation", "pretrain")


def shard_key(record: records.Record, num_shards: int) -> tuple[str, int]:
  split = "rejected" if records.is_dropped(record) else record["split"]
  return split, records.stable_hash(record["id"]) % num_shards


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}"


def _line(record: records.Record, keep_bookkeeping: bool) -> str:
  body = record if keep_bookkeeping else records.public(record)
  return json.dumps({k: v for k, v in body.items() if k != "split"}, ensure_ascii=False, sort_keys=True)


def write_shard(out_dir: str, num_shards: int, key: tuple[str, int], group: list[records.Record]) -> list[dict[str, Any]]:
  """Writes one shard's files; returns one entry per file: name, records, sha256."""
  from array_record.python import array_record_module  # noqa: PLC0415

  split, shard = key
  folder = pathlib.Path(out_dir)
  base = shard_name(split, shard, num_shards)
  lines = [_line(r, split == "rejected") for r in sorted(group, key=lambda r: r["id"])]
  files = []
  jsonl = folder / f"{base}.jsonl"
  jsonl.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  files.append(jsonl)
  if split != "rejected":
    path = folder / f"{base}.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for line in lines:
      writer.write(line.encode("utf-8"))
    writer.close()
    files.append(path)
  return [{"file": f.name, "split": split, "records": len(lines), "sha256": sha256(f)} for f in files]


def sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_empty_splits(out_dir: pathlib.Path, written: list[dict[str, Any]], num_shards: int) -> list[dict[str, Any]]:
  """A split with no records still gets its (empty) shards, so readers find every split."""
  have = {(e["split"], e["file"]) for e in written}
  extra = []
  for split in SPLITS:
    for shard in range(num_shards):
      base = shard_name(split, shard, num_shards)
      if (split, f"{base}.jsonl") not in have:
        extra += write_shard(str(out_dir), num_shards, (split, shard), [])
  return extra


def split_files(folder: pathlib.Path, split: str) -> list[pathlib.Path]:
  return sorted(folder.glob(f"{split}-*-of-*.array_record"))
