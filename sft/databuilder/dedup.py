"""Deduplication of records, exact and near, as plain functions that both runners call; the MinHash
algorithm itself is minhash.py, which knows nothing of records.

Exact duplicates (the same text once lowercased and stripped of punctuation and spacing): records are
grouped by `exact_key` and `keep_first` keeps the smallest id of each group.

Near duplicates: records proposed by MinHash LSH whose whole texts reach `threshold` in Jaccard similarity
of their word `shingle_size`-grams, exactly (MinHash only proposes), and, for chats, whose answers (the
assistant turns) say the same thing too: the same digits in the same order, and word sets that reach
`threshold` as well. A long shared prompt with a short answer ("What is 41 and 66?" / "What is 41 and 79?")
is most of a chat's shingles, so the whole text alone would call two different answers duplicates; the
answers' word sets, unlike their 5-grams, still match when an answer is reworded slightly or reordered. A
chat and a document are never near duplicates (as for exact ones). Each record has `fingerprints`: its
MinHash signature, its shingles, its answer's words and a hash of its kind and its answer's digits;
`verified` is the rule above on pairs of them.

In one process (runner_local.py), over all live records at once:

    drops = near_duplicate_drops(live, params)   # {dropped id: kept id}
    items = mark_near_duplicates(items, drops)

and in pieces over a cluster (runner_beam.py), the way datatrove does it: `signatures_of` a batch of
records on the workers (their fingerprints), `band_keys` of every signature, grouped by key into band
buckets (each member with its sets: verification needs them where the bucket is), the `verified_bucket_pairs`
of each bucket (paired by minhash.bucket_pairs, then `verified`), then only the distinct verified pairs (few)
meet in one place for `drops_from_pairs` (union-find). Both ways give the same drops: the same candidate
pairs, the same verification, the smallest id kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from sft.databuilder import minhash, records, templates

# What a Beam worker emits for one record, its Fingerprints as Python ints: (record id, signature, key,
# its shingles and its answer's words, each sorted and distinct).
Signed = tuple[str, tuple[int, ...], int, tuple[int, ...], tuple[int, ...]]

_NON_WORD = re.compile(r"\W+")
_DIGITS = re.compile(r"\d+")


# What `prepared` attaches to a record for the dedup stages (computed where the record already is, in the
# clean/filter/decontaminate stage's workers): (its exact_key or None, its packed Fingerprints or None).
# `unprepared` takes it off again before the record is formatted and written.
PREPARED = "_dedup"


def prepared(batch: list[records.Record], params: dict[str, Any]) -> list[records.Record]:
  """The live records of the batch with what exact (params["exact"]) and near (params["near"]) dedup will
  need attached; dropped records as they are."""
  live = [i for i, r in enumerate(batch) if not records.is_dropped(r)]
  if not live or not (params["exact"] or params["near"]):
    return batch
  exact = [exact_key(batch[i]) if params["exact"] else None for i in live]
  packed = _packed(fingerprints([batch[i] for i in live], params)) if params["near"] else [None] * len(live)
  out = list(batch)
  for i, key, fingerprint in zip(live, exact, packed, strict=True):
    out[i] = {**batch[i], PREPARED: (key, fingerprint)}
  return out


def unprepared(record: records.Record) -> records.Record:
  return {k: v for k, v in record.items() if k != PREPARED} if PREPARED in record else record


def _packed(f: Fingerprints) -> list[tuple[bytes, int, bytes, bytes]]:
  """Each record's Fingerprints as (signature, key, shingles, answer words): bytes, cheap to send."""
  sets = [(f.shingles.hashes, f.shingles.offsets), (f.answer_words.hashes, f.answer_words.offsets)]
  (sh, so), (ah, ao) = ((h, o.tolist()) for h, o in sets)
  return [
      (f.signatures[k].tobytes(), int(f.keys[k]), sh[so[k]:so[k + 1]].tobytes(), ah[ao[k]:ao[k + 1]].tobytes())
      for k in range(len(f.keys))
  ]


def unpacked(packed: list[tuple[bytes, int, bytes, bytes]], num_perm: int) -> Fingerprints:
  """The Fingerprints of records from their packed forms, in order."""
  def sets(members: list[bytes]) -> minhash.Sets:
    lengths = np.fromiter((len(m) // 4 for m in members), np.int64, count=len(members))
    return minhash.Sets(np.frombuffer(b"".join(members), np.uint32), np.concatenate([[0], np.cumsum(lengths)]))

  signatures, keys, shingles, answer_words = zip(*packed) if packed else ((), (), (), ())
  signatures_nd = np.frombuffer(b"".join(signatures), np.uint64).reshape(len(packed), num_perm)
  return Fingerprints(signatures_nd, np.array(keys, np.uint64), sets(list(shingles)), sets(list(answer_words)))


def exact_key(record: records.Record) -> str | None:
  """Hash of the lowercased text with punctuation and spacing collapsed (None for dropped records)."""
  if records.is_dropped(record):
    return None
  if (ready := record.get(PREPARED)) and ready[0] is not None:
    return ready[0]
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


class Fingerprints(NamedTuple):
  """What near-duplicate detection knows of records, entry k for record k; each depends on its record and
  the params only."""

  signatures: np.ndarray  # (num_records, num_perm) uint64 MinHash signatures of the whole texts
  keys: np.ndarray  # (num_records,) uint64 hash of the kind and the answer's digits
  shingles: minhash.Sets  # the whole texts' shingles
  answer_words: minhash.Sets  # the answers' words without digits (none for a document)


def fingerprints(batch: list[records.Record], params: dict[str, Any]) -> Fingerprints:
  """The Fingerprints of the records: each one's whole text (a templated chat's without the template's own
  words: templates.own_text) as a MinHash signature and as its set of shingles, its answer's set of words
  without digits (1-word shingles), and a 64-bit hash of its kind and its answer's digits."""
  texts = [templates.own_text(r) for r in batch]
  signatures_nd, shingles = minhash.sketches(
    texts, num_perm=params["num_perm"], shingle_size=params["shingle_size"], seed=params["seed"]
  )
  answers = [answer(r) for r in batch]
  # Numbers are compared by the key alone: "1,070" and "1070" are the same answer, "107" and "120" are not.
  answer_words = minhash.shingle_sets([_DIGITS.sub(" ", a) for a in answers], shingle_size=1)
  keys = [records.stable_hash(f"{r['kind']}\x1f{''.join(_DIGITS.findall(a))}") for r, a in zip(batch, answers)]
  return Fingerprints(signatures_nd, np.array(keys, np.uint64), shingles, answer_words)


def verified(fingerprints_: Fingerprints, pairs_n2: np.ndarray, threshold: float) -> np.ndarray:
  """The rows of `pairs_n2` that are near duplicates: whole texts' shingle sets and answers' word sets at or
  above `threshold` in Jaccard similarity (two answers without such words are alike), and the same kind and
  answer digits."""
  same_key = fingerprints_.keys[pairs_n2[:, 0]] == fingerprints_.keys[pairs_n2[:, 1]]
  pairs_n2 = pairs_n2[same_key]  # most candidates that fail, fail here (a shared prompt, other numbers)
  whole = minhash.set_jaccard(fingerprints_.shingles, pairs_n2)
  answers = minhash.set_jaccard(fingerprints_.answer_words, pairs_n2)
  return pairs_n2[(whole >= threshold) & (answers >= threshold)]


def near_duplicate_pairs(live: list[records.Record], params: dict[str, Any], fingerprints_: Fingerprints | None = None) -> list[tuple[str, str]]:
  """(smaller id, larger id) near-duplicate pairs among live records, all at once: MinHash LSH candidate
  pairs, then `verified`. `fingerprints_`: those of `live` sorted by id, when the caller has them."""
  live = sorted(live, key=lambda r: r["id"])
  fingerprints_ = fingerprints(live, params) if fingerprints_ is None else fingerprints_
  candidates_n2 = minhash.candidate_pairs(fingerprints_.signatures, bands=params["bands"], rows=params["rows"])
  pairs_n2 = verified(fingerprints_, candidates_n2, params["threshold"])
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
  """The Signed form of each record of the batch that has words (one without is nobody's duplicate)."""
  fingerprints_ = fingerprints(batch, params)
  signed = []
  for k, record in enumerate(batch):
    signature = fingerprints_.signatures[k]
    if signature[0] != minhash.EMPTY:
      shingles, words = (_set_of(sets, k) for sets in (fingerprints_.shingles, fingerprints_.answer_words))
      signed.append((record["id"], tuple(signature.tolist()), int(fingerprints_.keys[k]), shingles, words))
  return signed


def _set_of(sets: minhash.Sets, k: int) -> tuple[int, ...]:
  return tuple(sorted(set(sets.hashes[sets.offsets[k] : sets.offsets[k + 1]].tolist())))


def band_keys(signed: Signed, bands: int, rows: int) -> Iterator[tuple[tuple[int, tuple[int, ...]], Signed]]:
  """((band, the signature's rows in it), signed) for every band: records sharing a key share a bucket."""
  signature = signed[1]
  for band in range(bands):
    yield (band, signature[band * rows:(band + 1) * rows]), signed


def verified_bucket_pairs(bucket: tuple[Any, list[Signed]], threshold: float) -> list[tuple[str, str]]:
  """(smaller id, larger id) pairs of one band bucket that are `verified`, paired as candidate_pairs pairs
  a bucket: members by id, as the local path indexes them."""
  members = sorted(bucket[1], key=lambda member: member[0])
  pairs_n2 = minhash.bucket_pairs([len(members)])
  ids, signatures, keys, shingles, words = zip(*members) if members else ((),) * 5
  fingerprints_ = Fingerprints(
    np.array(signatures, np.uint64), np.array(keys, np.uint64), minhash.sets_of(shingles), minhash.sets_of(words)
  )
  return [(ids[i], ids[j]) for i, j in verified(fingerprints_, pairs_n2, threshold).tolist()]
