"""Write: every split as ArrayRecord shards (what grain reads) and JSONL (what people read).

    <out>/train-00000-of-00001.array_record    one JSON-encoded chat record per entry
    <out>/train-00000-of-00001.jsonl           the same records, one per line
    <out>/validation-*, <out>/pretrain-*       (pretrain: raw text records)
    <out>/rejected-*.jsonl                     every dropped record with its stage, reason and detail

A record's shard is a stable hash of its id; inside a shard records are sorted by id, so the same
input and config give byte-identical files whichever runner wrote them. Every file is written beside
its name and renamed into place, so a reader never sees half a file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def _partial(path: pathlib.Path) -> pathlib.Path:
  """Where `path` is written before it is renamed into place: same folder (so the rename is atomic),
  hidden, and private to this process (worker processes write distinct shards side by side)."""
  return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
  with tmp.open("rb") as f:
    os.fsync(f.fileno())  # the data is on disk before the name points at it
  os.replace(tmp, path)


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  """Writes `path` whole or not at all: a crash leaves the old file (or none), never a torn one."""
  path = pathlib.Path(path)
  tmp = _partial(path)
  try:
    tmp.write_bytes(data)
    _replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def write_shard(out_dir: str, num_shards: int, key: tuple[str, int], group: list[records.Record]) -> list[dict[str, Any]]:
  """Writes one shard's files; returns one entry per file: name, split, records, bytes, sha256."""
  from array_record.python import array_record_module  # noqa: PLC0415

  split, shard = key
  folder = pathlib.Path(out_dir)
  base = shard_name(split, shard, num_shards)
  lines = [_line(r, split == "rejected") for r in sorted(group, key=lambda r: r["id"])]
  files = []
  jsonl = folder / f"{base}.jsonl"
  atomic_write_text(jsonl, "".join(line + "\n" for line in lines))
  files.append(jsonl)
  if split != "rejected":
    path = folder / f"{base}.array_record"
    tmp = _partial(path)
    try:
      writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
      for line in lines:
        writer.write(line.encode("utf-8"))
      writer.close()
      _replace(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)
    files.append(path)
  return [{"file": f.name, "split": split, "records": len(lines), "bytes": f.stat().st_size, "sha256": sha256(f)} for f in files]


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


def output_names(num_shards: int) -> set[str]:
  """Every shard file a build with `num_shards` may write."""
  names = set()
  for split in (*SPLITS, "rejected"):
    for shard in range(num_shards):
      base = shard_name(split, shard, num_shards)
      names |= {f"{base}.jsonl"} if split == "rejected" else {f"{base}.jsonl", f"{base}.array_record"}
  return names


def split_files(folder: pathlib.Path, split: str) -> list[pathlib.Path]:
  return sorted(folder.glob(f"{split}-*-of-*.array_record"))
