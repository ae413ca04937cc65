"""Deduplication of records, exact and near, as plain functions that both runners call; the MinHash
algorithm itself is minhash.py, which knows nothing of records.

Exact duplicates (the same text once lowercased and stripped of punctuation and spacing): records are
grouped by `exact_key` and `keep_first` keeps the smallest id of each group.

Near duplicates, in one process (runner_local.py), over all live records at once:

    drops = near_duplicate_drops(live, params)   # {dropped id: kept id}
    items = mark_near_duplicates(items, drops)

and in pieces over a cluster (runner_beam.py), the way datatrove does it: `signatures_of` a batch of
records on the workers, `band_keys` of every signature, grouped by key into band buckets, the
`verified_bucket_pairs` of each bucket (paired by minhash.bucket_pairs, verified by estimated Jaccard),
then only the distinct verified pairs (few) meet in one place for `drops_from_pairs` (union-find). Both
ways give the same drops: the same candidate pairs, the same verification, the smallest id kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from sft.databuilder import minhash, records

# (record id, its MinHash signature as Python ints): what a Beam worker emits for one record.
Signed = tuple[str, tuple[int, ...]]

_NON_WORD = re.compile(r"\W+")


def exact_key(record: records.Record) -> str | None:
  """Hash of the lowercased text with punctuation and spacing collapsed (None for dropped records)."""
  if records.is_dropped(record):
    return None
  if record["kind"] == "chat":
    text = "\x1e".join(f"{m['role']}\x1f{_NON_WORD.sub(' ', m['content'].lower()).strip()}" for m in record["messages"])
  else:
    text = _NON_WORD.sub(" ", record["text"].lower()).strip()
  return hashlib.blake2b(f"{record['kind']}\x1d{text}".encode(), digest_size=16).hexdigest()


def keep_first(key: str, group: list[records.Record]) -> list[records.Record]:
  """Exact duplicates: the smallest id is kept, the others point at it."""
  first, *rest = sorted(group, key=lambda r: r["id"])
  return [first] + [records.drop(r, "dedup", "exact duplicate", f"of {first['id']}", duplicate_of=first["id"]) for r in rest]


def drops_from_pairs(pairs: list[tuple[str, str]]) -> dict[str, str]:
  """{dropped id: kept id}: union-find over the ids in the pairs, the smallest id of a cluster kept."""
  ids = sorted({x for pair in pairs for x in pair})
  index = {x: i for i, x in enumerate(ids)}
  pairs_n2 = np.array([(index[a], index[b]) for a, b in pairs], np.int64).reshape(-1, 2)
  representative = minhash.clusters(len(ids), pairs_n2)
  return {ids[i]: ids[int(rep)] for i, rep in enumerate(representative) if rep != i}


def near_duplicate_drops(live: list[records.Record], params: dict[str, Any]) -> dict[str, str]:
  """{dropped id: kept id} for near duplicates among live records, all at once: MinHash LSH candidate
  pairs verified by estimated Jaccard, clusters by union-find, the smallest id of a cluster kept."""
  live = sorted(live, key=lambda r: r["id"])
  pairs_n2 = minhash.near_duplicate_pairs(
      [records.contents(r) for r in live], num_perm=params["num_perm"], bands=params["bands"], rows=params["rows"],
      shingle_size=params["shingle_size"], threshold=params["threshold"], seed=params["seed"],
  )
  return drops_from_pairs([(live[i]["id"], live[j]["id"]) for i, j in pairs_n2.tolist()])


def mark_near_duplicate(record: records.Record, drops: dict[str, str]) -> records.Record:
  """The record, dropped as a near duplicate if `drops` names it (a record dropped before stays as it is)."""
  if records.is_dropped(record) or record["id"] not in drops:
    return record
  kept = drops[record["id"]]
  return records.drop(record, "dedup", "near duplicate", f"of {kept}", duplicate_of=kept)


def mark_near_duplicates(items: list[records.Record], drops: dict[str, str]) -> list[records.Record]:
  return [mark_near_duplicate(r, drops) for r in items]


def signatures_of(batch: list[records.Record], params: dict[str, Any]) -> list[Signed]:
  """(id, signature) of each record of the batch that has words (one without is nobody's duplicate)."""
  signatures_nd = minhash.signatures(
      [records.contents(r) for r in batch], num_perm=params["num_perm"], shingle_size=params["shingle_size"], seed=params["seed"],
  )
  has_words = np.any(signatures_nd != minhash.EMPTY, axis=1)
  return [(r["id"], tuple(sig.tolist())) for r, sig, keep in zip(batch, signatures_nd, has_words) if keep]


def band_keys(signed: Signed, bands: int, rows: int) -> Iterator[tuple[tuple[int, tuple[int, ...]], Signed]]:
  """((band, the signature's rows in it), (id, signature)) for every band: records sharing a key share a bucket."""
  _, signature = signed
  for band in range(bands):
    yield (band, signature[band * rows:(band + 1) * rows]), signed


def verified_bucket_pairs(bucket: tuple[Any, list[Signed]], threshold: float) -> list[tuple[str, str]]:
  """(smaller id, larger id) pairs of one band bucket that reach `threshold`, paired as candidate_pairs pairs
  a bucket: members by id, as the local path indexes them."""
  members = sorted(bucket[1], key=lambda member: member[0])
  pairs_n2 = minhash.bucket_pairs([len(members)])
  signatures_nd = np.array([signature for _, signature in members], np.uint64)
  return [(members[i][0], members[j][0]) for i, j in minhash.verified_pairs(signatures_nd, pairs_n2, threshold).tolist()]
