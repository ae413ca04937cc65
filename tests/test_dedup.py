"""Deduplication: exact keys, and near duplicates found the same way all at once (local) and in
per-bucket pieces (Beam), also when a band bucket is bigger than minhash.MAX_BUCKET."""

from __future__ import annotations

import collections
import itertools
import json
import types

import numpy as np
import pytest

from sft.databuilder import dedup, minhash, records
from sft.databuilder.runner_local import LocalRunner

PARAMS = {"num_perm": 112, "bands": 14, "rows": 8, "shingle_size": 5, "threshold": 0.7, "seed": 1}
NUM_COPIES, NUM_VARIANTS = 70, 30  # copies alone fill every band bucket of the boilerplate past MAX_BUCKET


def _chat(user, assistant, record_id="x:1"):
  return records.chat(record_id, "x", [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def _corpus() -> list[records.Record]:
  """Boilerplate copied NUM_COPIES times (case and punctuation differ: same signature), NUM_VARIANTS
  one-word variants of it, pairs of near-duplicate texts, unrelated texts and a text without words;
  ids are shuffled so that the smallest id of a bucket is a different member in every family."""
  rng = np.random.default_rng(0)
  vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(3000)]
  boilerplate = list(rng.choice(vocab, size=60))
  texts = [" ".join(boilerplate).upper() if i % 2 else ", ".join(boilerplate) for i in range(NUM_COPIES)]
  for i in range(NUM_VARIANTS):
    words = list(boilerplate)
    words[rng.integers(len(words))] = f"variant{i}"
    texts.append(" ".join(words))
  for _ in range(20):
    words = list(rng.choice(vocab, size=rng.integers(120, 160)))
    near = list(words)
    near[rng.integers(len(near))] = "changed"
    texts += [" ".join(words), " ".join(near), " ".join(rng.choice(vocab, size=50))]
  texts.append(" ?! ")
  ids = [f"r{n:04d}" for n in rng.permutation(len(texts))]
  return [records.text(record_id, "corpus", text) for record_id, text in zip(ids, texts)]


def _recording(path):
  """drops_from_pairs that first writes the pairs it is given to `path` (a Beam step's only way out)."""

  def drops_from_pairs(pairs):
    path.write_text(json.dumps(sorted(pairs)))
    return dedup.drops_from_pairs(pairs)

  return drops_from_pairs


def _beam_pairs(items: list[records.Record], batch_size: int, tmp_path, monkeypatch) -> list[tuple[str, str]]:
  """The verified pairs BeamRunner.near_duplicates gathers for union-find, with signature batches of at most
  `batch_size`: batches in whatever order the runner makes them, bucket members in the order they arrive."""
  from sft.databuilder import runner_beam  # noqa: PLC0415 (Beam is optional)

  received = tmp_path / f"pairs-{batch_size}.json"
  monkeypatch.setattr(runner_beam, "_SIGNATURE_BATCH", batch_size)
  monkeypatch.setattr(runner_beam, "dedup", types.SimpleNamespace(**{**vars(dedup), "drops_from_pairs": _recording(received)}))
  beam = runner_beam.BeamRunner([], tmp_path / "beam")
  beam.results(beam.near_duplicates(beam.create(items, "items"), PARAMS, "near"))
  return [tuple(pair) for pair in json.loads(received.read_text())]


def test_exact_key_ignores_case_spacing_and_punctuation():
  a = dedup.exact_key(_chat("What is 2+2?", "Four."))
  assert a == dedup.exact_key(_chat("what  is 2 + 2", "four"))
  assert a != dedup.exact_key(_chat("What is 2+3?", "Four."))
  assert a != dedup.exact_key(_chat("What is 2+2? Four.", ""))  # turns are kept apart
  assert dedup.exact_key(records.drop(_chat("a", "b"), "filter", "x")) is None


def test_exact_dedup_keeps_the_smallest_id():
  group = [_chat("a", "b", "z:2"), _chat("A!", "b", "c:7"), _chat("a", "B", "m:1")]
  kept, *dups = dedup.keep_first("k", group)
  assert kept["id"] == "c:7" and "dropped" not in kept
  assert [(r["id"], r["dropped"]["duplicate_of"], r["dropped"]["reason"]) for r in dups] == [
    ("m:1", "c:7", "exact duplicate"),
    ("z:2", "c:7", "exact duplicate"),
  ]
  # Through a runner: the already dropped pass by, the other texts are untouched.
  dropped = records.drop(_chat("a", "b", "a:0"), "filter", "x")
  out = LocalRunner(1, progress=False).group_by(group + [dropped, _chat("c", "d", "b:0")], dedup.exact_key, dedup.keep_first, "exact")
  assert {r["id"]: r.get("dropped", {}).get("duplicate_of") for r in out} == {"a:0": None, "b:0": None, "c:7": None, "m:1": "c:7", "z:2": "c:7"}


@pytest.mark.slow
def test_beam_bucket_pairs_equal_the_local_vectorised_pairs(tmp_path, monkeypatch):
  pytest.importorskip("apache_beam")
  live = _corpus()
  bands = collections.Counter(key for signed in dedup.signatures_of(live, PARAMS) for key, _ in dedup.band_keys(signed, PARAMS["bands"], PARAMS["rows"]))
  assert max(bands.values()) > minhash.MAX_BUCKET  # the star is exercised
  by_id = sorted(live, key=lambda r: r["id"])
  local_n2 = minhash.near_duplicate_pairs([records.contents(r) for r in by_id], **PARAMS)
  local = {(by_id[i]["id"], by_id[j]["id"]) for i, j in local_n2.tolist()}
  for batch_size in (1, 37, len(live)):
    pairs = _beam_pairs(live[::-1], batch_size, tmp_path, monkeypatch)
    assert len(pairs) == len(set(pairs)) and set(pairs) == local, batch_size
  drops = dedup.near_duplicate_drops(live, PARAMS)
  assert dedup.drops_from_pairs(sorted(local)) == drops
  # The boilerplate family is one cluster kept at its smallest id; each near pair keeps its smaller id.
  family = {r["id"] for r in live[: NUM_COPIES + NUM_VARIANTS]}
  assert {drops.get(x, x) for x in family} == {min(family)} and len(drops) == len(family) - 1 + 20
  for i in range(20):
    first, second = (r["id"] for r in live[NUM_COPIES + NUM_VARIANTS + 3 * i :][:2])
    assert drops[max(first, second)] == min(first, second)


@pytest.mark.parametrize("size", [minhash.MAX_BUCKET, minhash.MAX_BUCKET + 5])
def test_a_big_bucket_verifies_only_pairs_with_its_smallest_id(size):
  # Band 0 is shared by all; the others agree with each other on band 1 but not with the smallest id:
  # estimated Jaccard 1.0 among them, 0.5 with it. All pairs find them, a star does not.
  signatures_nd = np.zeros((size, 16), np.uint64)
  signatures_nd[1:, 8:] = 7
  ids = [f"r{i:03d}" for i in range(size)]
  members = [(record_id, tuple(signature)) for record_id, signature in zip(ids, signatures_nd.tolist())][::-1]
  pairs = dedup.verified_bucket_pairs(((0, (0,) * 8), members), threshold=0.75)
  small = size <= minhash.MAX_BUCKET
  assert pairs == ([(ids[i], ids[j]) for i, j in itertools.combinations(range(1, size), 2)] if small else [])
  local_n2 = minhash.verified_pairs(signatures_nd, minhash.candidate_pairs(signatures_nd[:, :8], bands=1, rows=8), 0.75)
  assert pairs == [(ids[i], ids[j]) for i, j in local_n2.tolist()]


@pytest.mark.parametrize("seed", range(20))
def test_per_bucket_pairing_equals_vectorised_pairing_on_random_signatures(seed):
  # Property: for any signatures and max_bucket, grouping by band in Python and pairing each bucket by
  # bucket_pairs gives candidate_pairs; both match the rule written out here (all pairs, or a star).
  rng = np.random.default_rng(seed)
  bands, rows, max_bucket = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 6))
  signatures_nd = rng.integers(0, 3, size=(int(rng.integers(0, 40)), bands * rows)).astype(np.uint64)
  signatures_nd[rng.random(len(signatures_nd)) < 0.1] = minhash.EMPTY
  expected, per_bucket = set(), set()
  for band in range(bands):
    buckets = collections.defaultdict(list)
    for i, signature in enumerate(signatures_nd.tolist()):
      if signatures_nd[i, 0] != minhash.EMPTY:
        buckets[tuple(signature[band * rows : (band + 1) * rows])].append(i)
    for members in buckets.values():
      rule = itertools.combinations(members, 2) if len(members) <= max_bucket else ((members[0], m) for m in members[1:])
      expected |= set(rule)
      per_bucket |= {(members[i], members[j]) for i, j in minhash.bucket_pairs([len(members)], max_bucket).tolist()}
  vectorised = minhash.candidate_pairs(signatures_nd, bands=bands, rows=rows, max_bucket=max_bucket)
  assert [tuple(p) for p in vectorised.tolist()] == sorted(expected) and per_bucket == expected


def test_mark_near_duplicates_leaves_earlier_drops_alone():
  dropped = records.drop(_chat("a", "b", "a:2"), "filter", "x")
  items = [_chat("a", "b", "a:1"), dropped, _chat("a", "b", "a:3"), _chat("c", "d", "a:4")]
  out = dedup.mark_near_duplicates(items, {"a:2": "a:1", "a:3": "a:1"})
  assert out[0] == items[0] and out[1] == dropped and out[3] == items[3]
  assert out[2]["dropped"] == {"stage": "dedup", "reason": "near duplicate", "detail": "of a:1", "duplicate_of": "a:1"}
  assert dedup.drops_from_pairs([]) == {}


@pytest.mark.slow
def test_beam_runner_marks_the_same_near_duplicates_as_the_local_runner(tmp_path):
  pytest.importorskip("apache_beam")
  from sft.databuilder.runner_beam import BeamRunner  # noqa: PLC0415 (Beam is optional)

  items = _corpus() + [records.drop(_chat("a", "b", "r9999"), "filter", "x")]
  local = LocalRunner(1, progress=False).near_duplicates(items, PARAMS, "near")
  beam = BeamRunner([], tmp_path / "beam")
  (on_beam,) = beam.results(beam.near_duplicates(beam.create(items, "items"), PARAMS, "near"))
  assert sorted(on_beam, key=lambda r: r["id"]) == sorted(local, key=lambda r: r["id"])
  assert sum(r.get("dropped", {}).get("reason") == "near duplicate" for r in local) == NUM_COPIES + NUM_VARIANTS - 1 + 20
