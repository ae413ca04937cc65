"""Deduplication: exact keys, and near duplicates found the same way all at once (local) and in
per-bucket pieces (Beam), also when a band bucket is bigger than minhash.MAX_BUCKET; chats that share a
long prompt template but not their answers are never near duplicates, reworded copies still are."""

from __future__ import annotations

import collections
import itertools
import json
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sft.databuilder import dedup, minhash, records
from sft.databuilder.runner_local import LocalRunner

PARAMS = {"num_perm": 112, "bands": 14, "rows": 8, "shingle_size": 5, "threshold": 0.7, "seed": 1}
NUM_COPIES, NUM_VARIANTS = 70, 30  # copies alone fill every band bucket of the boilerplate past MAX_BUCKET
NUM_CHAT_COPIES = 4  # chats of _chats() with a copy whose answer is reworded slightly
TEMPLATE = (
    "Answer the arithmetic question below with the final number only, no words and no working. What is {} and {}?"
)
QUIZ = "You are a quiz assistant. "
AUTHOR = QUIZ + "Reply with the name of the author only, with no title, no dates and no other words. "
ONE_WORD = QUIZ + "Answer with one word, and do not explain your answer or add any other words at all. "
LONG_ANSWER = (
    "Photosynthesis is how green plants make their own food. Their leaves catch sunlight and use its energy to "
    "turn water from the soil and carbon dioxide from the air into sugar, which the plant uses to grow. Along "
    "the way the plant gives off oxygen, which is the air that people and animals need to breathe."
)


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


def _chats() -> list[records.Record]:
  """An arithmetic family (one long prompt template, different sums), a one-word-answer family, and
  NUM_CHAT_COPIES long chats each with a copy whose answer has one word changed (ids c0..: after _corpus's)."""
  chats = [_chat(TEMPLATE.format(a, b), str(a + b)) for a, b in [(41, 66), (41, 79), (41, 12), (58, 17), (58, 30)]]
  question = "Reply with a single word and no punctuation or explanation. What is the capital city of {}?"
  capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]
  chats += [_chat(question.format(country), city) for country, city in capitals]
  rng = np.random.default_rng(1)
  for topic in range(NUM_CHAT_COPIES):
    prompt = f"Write about topic {topic} in sixty words."
    answer = ["".join(w) for w in rng.choice(list("abcdefghij"), size=(60, 6))]
    chats += [_chat(prompt, " ".join(answer)), _chat(prompt, " ".join(answer[:30] + ["changed"] + answer[31:]))]
  return [{**chat, "id": f"c{n:04d}"} for n, chat in enumerate(chats)]


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
  live = _corpus() + _chats()
  bands = collections.Counter(key for signed in dedup.signatures_of(live, PARAMS) for key, _ in dedup.band_keys(signed, PARAMS["bands"], PARAMS["rows"]))
  assert max(bands.values()) > minhash.MAX_BUCKET  # the star is exercised
  local = dedup.near_duplicate_pairs(live, PARAMS)
  for batch_size in (1, 37, len(live)):
    pairs = _beam_pairs(live[::-1], batch_size, tmp_path, monkeypatch)
    assert len(pairs) == len(set(pairs)) and set(pairs) == set(local), batch_size
  drops = dedup.near_duplicate_drops(live, PARAMS)
  assert dedup.drops_from_pairs(local) == drops
  # The boilerplate family is one cluster kept at its smallest id; each near pair keeps its smaller id.
  family = {r["id"] for r in live[: NUM_COPIES + NUM_VARIANTS]}
  assert {drops.get(x, x) for x in family} == {min(family)} and len(drops) == len(family) - 1 + 20 + NUM_CHAT_COPIES
  for i in range(20):
    first, second = (r["id"] for r in live[NUM_COPIES + NUM_VARIANTS + 3 * i :][:2])
    assert drops[max(first, second)] == min(first, second)
  # Of the chats, only the reworded copies go; the families with different answers stay whole.
  copies = {f"c{9 + 2 * i:04d}": f"c{8 + 2 * i:04d}" for i in range(NUM_CHAT_COPIES)}
  assert {x: y for x, y in drops.items() if x.startswith("c")} == copies


@pytest.mark.parametrize("size", [minhash.MAX_BUCKET, minhash.MAX_BUCKET + 5])
def test_a_big_bucket_verifies_only_pairs_with_its_smallest_id(size):
  # Band 0 is shared by all; the others agree with each other on band 1 but not with the smallest id, and
  # so do their shingle sets: Jaccard 1.0 among them, 2 / 6 with it. All pairs find them, a star does not.
  # The fingerprints are documents': no answer words, one key.
  signatures_nd = np.zeros((size, 16), np.uint64)
  signatures_nd[1:, 8:] = 7
  shingles = [(1, 2, 3, 4)] + [(1, 2, 5, 6)] * (size - 1)
  ids = [f"r{i:03d}" for i in range(size)]
  members = [(ids[k], tuple(signatures_nd[k].tolist()), 1, shingles[k], ()) for k in range(size)][::-1]
  pairs = dedup.verified_bucket_pairs(((0, (0,) * 8), members), threshold=0.75)
  small = size <= minhash.MAX_BUCKET
  assert pairs == ([(ids[i], ids[j]) for i, j in itertools.combinations(range(1, size), 2)] if small else [])
  fingerprints = dedup.Fingerprints(signatures_nd, np.ones(size, np.uint64), minhash.sets_of(shingles), minhash.sets_of([()] * size))
  local_n2 = dedup.verified(fingerprints, minhash.candidate_pairs(signatures_nd[:, :8], bands=1, rows=8), 0.75)
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

  items = _corpus() + _chats() + [records.drop(_chat("a", "b", "r9999"), "filter", "x")]
  local = LocalRunner(1, progress=False).near_duplicates(items, PARAMS, "near")
  beam = BeamRunner([], tmp_path / "beam")
  (on_beam,) = beam.results(beam.near_duplicates(beam.create(items, "items"), PARAMS, "near"))
  assert sorted(on_beam, key=lambda r: r["id"]) == sorted(local, key=lambda r: r["id"])
  near = sum(r.get("dropped", {}).get("reason") == "near duplicate" for r in local)
  assert near == NUM_COPIES + NUM_VARIANTS - 1 + 20 + NUM_CHAT_COPIES


def _pair(first: records.Record, second: records.Record) -> dict[str, str]:
  return dedup.near_duplicate_drops([{**first, "id": "x:1"}, {**second, "id": "x:2"}], PARAMS)


@pytest.mark.parametrize("first, second", [
    (_chat(TEMPLATE.format(41, 66), "107"), _chat(TEMPLATE.format(41, 79), "120")),
    (_chat(TEMPLATE.format(41, 66), "The answer is 107."), _chat(TEMPLATE.format(41, 66), "The answer is 108.")),
    (_chat("Reply with a single word and no punctuation or explanation. What is the capital city of France?", "Paris"),
     _chat("Reply with a single word and no punctuation or explanation. What is the capital city of Italy?", "Rome")),
    (_chat(AUTHOR + "Who wrote Hamlet?", "William Shakespeare"),
     _chat(AUTHOR + "Who wrote Don Quixote?", "Miguel de Cervantes")),
    (_chat(ONE_WORD + "Is 17 odd?", "Yes."), _chat(ONE_WORD + "Is 42 odd?", "No.")),
    # A long answer whose words are the same but one number.
    (_chat("How long does a leaf take to make sugar?", LONG_ANSWER + " A leaf needs about 12 hours of light."),
     _chat("How long does a leaf take to make sugar?", LONG_ANSWER + " A leaf needs about 14 hours of light.")),
])
def test_a_shared_template_with_different_answers_is_not_a_near_duplicate(first, second):
  # The whole texts alone reach the threshold: the prompt template is most of them.
  assert minhash.jaccard(records.contents(first), records.contents(second), 5) >= 0.7
  assert _pair(first, second) == {}


@pytest.mark.parametrize("first, second", [
    # The same long answer, one word changed; the prompt reworded over the same answer.
    (_chat("Explain photosynthesis to a curious ten-year-old.", LONG_ANSWER),
     _chat("Explain photosynthesis to a curious ten-year-old.", LONG_ANSWER.replace("people", "humans"))),
    (_chat("Explain photosynthesis to a curious ten-year-old.", LONG_ANSWER),
     _chat("Can you explain photosynthesis to a curious ten-year-old?", LONG_ANSWER)),
    # Spacing, case and punctuation (exact deduplication would take these first, when it is on).
    (_chat(TEMPLATE.format(41, 66), "107"), _chat(TEMPLATE.format(41, 66).upper().replace(",", " ;"), " 107. ")),
    (_chat(TEMPLATE.format(41, 66), "1,070"), _chat(TEMPLATE.format(41, 66), "1070")),
    # The same short answer under a prompt with one word changed.
    (_chat(TEMPLATE.format(41, 66), "107"), _chat(TEMPLATE.format(41, 66).replace("Answer", "Give"), "107")),
    # Documents that differ in a few words, numbers included.
    (records.text("t", "t", LONG_ANSWER * 2), records.text("t", "t", (LONG_ANSWER * 2).replace("sugar", "glucose 12"))),
])
def test_real_near_duplicates_are_still_found(first, second):
  assert _pair(first, second) == {"x:2": "x:1"}


def test_a_chat_and_a_document_are_never_near_duplicates():
  chat = _chat("Explain photosynthesis.", LONG_ANSWER)
  assert _pair(chat, records.text("t", "t", records.contents(chat))) == {}


@given(
    words=st.lists(st.sampled_from("the a what is sum of and please answer final".split()), min_size=40, max_size=80),
    numbers=st.lists(st.integers(0, 10**6), min_size=2, max_size=2, unique=True),
    prefix=st.sampled_from(["", "The answer is ", "Result: "]),
)
def test_chats_with_different_numeric_answers_are_never_near_duplicates(words, numbers, prefix):
  # Property: however long the shared prompt (long enough that the whole texts reach the threshold), two
  # answers with other digits are two records; a copy differing in case and punctuation is one.
  prompt = " ".join(words) + " {}?"
  first, second = (_chat(prompt.format(n), f"{prefix}{n}") for n in numbers)
  assert _pair(first, second) == {}
  assert _pair(first, _chat(prompt.format(numbers[0]), f" {prefix.upper()}{numbers[0]}!")) == {"x:2": "x:1"}


def test_templated_records_are_compared_by_what_their_fields_hold_not_by_the_instruction_they_share():
  """Debian synopses labelled by section: the paraphrased instruction and its 8 labels outweigh a 5-word
  synopsis, so the whole texts look alike; the fields do not. The same fields under two ids (two
  paraphrases, so no exact duplicate) are still near duplicates."""
  from sft.databuilder import readers, templates

  sections = ["doc", "fonts", "games", "libdevel", "net", "python", "science", "sound"]
  synopses = ["Python 3 module for parsing TOML files", "Python 3 module for reading EXIF tags",
              "Python 3 module for the Redis key-value store", "Python 3 module for colored terminal output"]
  rows = [readers.to_record({"text": t, "label": "python", "labels": sections}, f"p:{i}", "p") for i, t in enumerate(synopses)]
  assert minhash.jaccard(records.contents(rows[0]), records.contents(rows[1]), 5) >= 0.5  # the template's shingles
  assert dedup.near_duplicate_pairs(rows, PARAMS) == []
  assert "Classify" not in templates.own_text(rows[0]) and "libdevel" not in templates.own_text(rows[0])
  twins = [readers.to_record({"text": synopses[0], "label": "python", "labels": sections}, f"t:{i}", "t") for i in range(40)]
  assert len({t["messages"][0]["content"] for t in twins}) > 1  # different paraphrases: not exact duplicates
  assert len(dedup.near_duplicate_drops(twins, PARAMS)) == 39
