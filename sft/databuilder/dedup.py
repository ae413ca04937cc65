"""Deduplication of records, exact and near, as plain functions that both runners call; the MinHash
algorithm itself is minhash.py, which knows nothing of records.

Exact duplicates (the same text once lowercased and stripped of punctuation and spacing): records are
grouped by `exact_key` and `keep_first` keeps the smallest id of each group.

Near duplicates: records whose whole texts reach `threshold` in estimated Jaccard similarity of their word
`shingle_size`-grams, and, for chats, whose answers (the assistant turns) say the same thing too: the same
digits in the same order, and word sets that reach `threshold` as well. A long shared prompt with a short
answer ("What is 41 and 66?" / "What is 41 and 79?") is most of a chat's shingles, so the whole text alone
would call two different answers duplicates; the answers' word sets, unlike their 5-grams, still match when
an answer is reworded slightly or reordered. A chat and a document are never near duplicates (as for exact
ones). Each record becomes one row of `fingerprints`: its MinHash signature, its answer's word-set signature
and a hash of its kind and its answer's digits; `verified` is the rule above on pairs of rows.

In one process (runner_local.py), over all live records at once:

    drops = near_duplicate_drops(live, params)   # {dropped id: kept id}
    items = mark_near_duplicates(items, drops)

and in pieces over a cluster (runner_beam.py), the way datatrove does it: `signatures_of` a batch of
records on the workers (their fingerprints), `band_keys` of every signature, grouped by key into band
buckets, the `verified_bucket_pairs` of each bucket (paired by minhash.bucket_pairs, then `verified`), then
only the distinct verified pairs (few) meet in one place for `drops_from_pairs` (union-find). Both ways
give the same drops: the same candidate pairs, the same verification, the smallest id kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from sft.databuilder import minhash, records, templates

# (record id, its fingerprint as Python ints): what a Beam worker emits for one record.
Signed = tuple[str, tuple[int, ...]]

_NON_WORD = re.compile(r"\W+")
_DIGITS = re.compile(r"\d+")


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


def answer(record: records.Record) -> str:
  """A chat's assistant turns, joined by newlines ("" for a document)."""
  if record["kind"] != "chat":
    return ""
  return "\n".join(m["content"] for m in record["messages"] if m["role"] == "assistant")


def fingerprints(batch: list[records.Record], params: dict[str, Any]) -> np.ndarray:
  """(len(batch), 2 * num_perm + 1) uint64: each record's MinHash signature of its whole text (a templated
  chat's without the template's own words: templates.own_text), the signature
  of its answer's set of words without digits (1-word shingles; minhash.EMPTY for a document or an answer
  without such words) and a 64-bit hash of its kind and its answer's digits, in order. Each row depends on its
  record and `params` only."""
  num_perm, seed = params["num_perm"], params["seed"]
  texts = [templates.own_text(r) for r in batch]
  whole_nd = minhash.signatures(texts, num_perm=num_perm, shingle_size=params["shingle_size"], seed=seed)
  answers = [answer(r) for r in batch]
  chats = [i for i, r in enumerate(batch) if r["kind"] == "chat"]
  answer_nd = np.full((len(batch), num_perm), minhash.EMPTY, np.uint64)
  # Numbers are compared by the key alone: "1,070" and "1070" are the same answer, "107" and "120" are not.
  words = [_DIGITS.sub(" ", answers[i]) for i in chats]
  answer_nd[chats] = minhash.signatures(words, num_perm=num_perm, shingle_size=1, seed=seed)
  keys = [records.stable_hash(f"{r['kind']}\x1f{''.join(_DIGITS.findall(a))}") for r, a in zip(batch, answers)]
  return np.concatenate([whole_nd, answer_nd, np.array(keys, np.uint64).reshape(-1, 1)], axis=1)


def verified(fingerprints_nd: np.ndarray, pairs_n2: np.ndarray, threshold: float) -> np.ndarray:
  """The rows of `pairs_n2` that are near duplicates: whole texts and answers' word sets at or above
  `threshold` in estimated Jaccard similarity, and the same kind and answer digits."""
  num_perm = (fingerprints_nd.shape[1] - 1) // 2
  whole = minhash.estimated_jaccard(fingerprints_nd[:, :num_perm], pairs_n2)
  answers = minhash.estimated_jaccard(fingerprints_nd[:, num_perm:-1], pairs_n2)
  same_key = fingerprints_nd[pairs_n2[:, 0], -1] == fingerprints_nd[pairs_n2[:, 1], -1]
  return pairs_n2[(whole >= threshold) & (answers >= threshold) & same_key]


def near_duplicate_pairs(live: list[records.Record], params: dict[str, Any]) -> list[tuple[str, str]]:
  """(smaller id, larger id) near-duplicate pairs among live records, all at once: MinHash LSH candidate
  pairs, then `verified`."""
  live = sorted(live, key=lambda r: r["id"])
  fingerprints_nd = fingerprints(live, params)
  signatures_nd = fingerprints_nd[:, :params["num_perm"]]
  candidates_n2 = minhash.candidate_pairs(signatures_nd, bands=params["bands"], rows=params["rows"])
  pairs_n2 = verified(fingerprints_nd, candidates_n2, params["threshold"])
  return [(live[i]["id"], live[j]["id"]) for i, j in pairs_n2.tolist()]


def near_duplicate_drops(live: list[records.Record], params: dict[str, Any]) -> dict[str, str]:
  """{dropped id: kept id} for near duplicates among live records: clusters of their near_duplicate_pairs
  by union-find, the smallest id of a cluster kept."""
  return drops_from_pairs(near_duplicate_pairs(live, params))


def mark_near_duplicate(record: records.Record, drops: dict[str, str]) -> records.Record:
  """The record, dropped as a near duplicate if `drops` names it (a record dropped before stays as it is)."""
  if records.is_dropped(record) or record["id"] not in drops:
    return record
  kept = drops[record["id"]]
  return records.drop(record, "dedup", "near duplicate", f"of {kept}", duplicate_of=kept)


def mark_near_duplicates(items: list[records.Record], drops: dict[str, str]) -> list[records.Record]:
  return [mark_near_duplicate(r, drops) for r in items]


def signatures_of(batch: list[records.Record], params: dict[str, Any]) -> list[Signed]:
  """(id, fingerprint) of each record of the batch that has words (one without is nobody's duplicate)."""
  fingerprints_nd = fingerprints(batch, params)
  has_words = np.any(fingerprints_nd[:, :params["num_perm"]] != minhash.EMPTY, axis=1)
  return [(r["id"], tuple(row.tolist())) for r, row, keep in zip(batch, fingerprints_nd, has_words) if keep]


def band_keys(signed: Signed, bands: int, rows: int) -> Iterator[tuple[tuple[int, tuple[int, ...]], Signed]]:
  """((band, the signature's rows in it), (id, fingerprint)) for every band: records sharing a key share a bucket."""
  _, fingerprint = signed
  for band in range(bands):
    yield (band, fingerprint[band * rows:(band + 1) * rows]), signed


def verified_bucket_pairs(bucket: tuple[Any, list[Signed]], threshold: float) -> list[tuple[str, str]]:
  """(smaller id, larger id) pairs of one band bucket that are `verified`, paired as candidate_pairs pairs
  a bucket: members by id, as the local path indexes them."""
  members = sorted(bucket[1], key=lambda member: member[0])
  pairs_n2 = minhash.bucket_pairs([len(members)])
  fingerprints_nd = np.array([fingerprint for _, fingerprint in members], np.uint64)
  return [(members[i][0], members[j][0]) for i, j in verified(fingerprints_nd, pairs_n2, threshold).tolist()]
