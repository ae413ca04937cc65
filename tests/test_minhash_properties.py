"""Near-duplicate detection on arbitrary texts: signatures are deterministic and independent of their
company, identical texts always collide, reported pairs reach the threshold in exact Jaccard similarity,
and the result does not depend on record order or batch size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.databuilder import minhash
from sft.databuilder.minhash import jaccard, near_duplicate_pairs, shingles, signatures

# Short and long words (past 8 bytes, folded 8 at a time; past 64, hashed whole), non-ASCII ones, separators: the
# byte-level word finder and hash must agree with the `\w+` regex.
VOCAB = ["a", "fox", "Dog", "jumps", "over", "lazy", "extraordinary", "internationalisation", "café", "naïve",
         "日本語", "x_y", "42", "abcdefgh", "abcdefghi", "w" * 64, "w" * 65, "ü" * 40]
SEPARATORS = [" ", "  ", ", ", ". ", "\n", "-", " — ", "!"]
TEXT = st.lists(st.tuples(st.sampled_from(VOCAB), st.sampled_from(SEPARATORS)), max_size=30).map(
  lambda pairs: "".join(word + sep for word, sep in pairs)
)
# Texts from 6 words, so that some pairs reach the threshold and many fall between.
SMALL_VOCAB_TEXT = st.lists(st.sampled_from(["red", "green", "blue", "cat", "dog", "sun"]), min_size=1, max_size=14).map(
  " ".join
)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, max_size=8), shingle_size=st.integers(1, 4))
def test_shingle_hashes_are_the_regex_shingles(texts, shingle_size):
  # One hash per shingle position; as many distinct hashes as distinct shingles (no collision at this size).
  sets = minhash.shingle_sets(texts, shingle_size=shingle_size)
  for k, text in enumerate(texts):
    words = minhash._words(text)
    positions = max(len(words) - shingle_size + 1, min(len(words), 1))
    hashes = sets.hashes[sets.offsets[k] : sets.offsets[k + 1]]
    assert len(hashes) == positions and len(set(hashes.tolist())) == len(shingles(text, shingle_size))


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=8), data=st.data())
def test_signatures_are_deterministic_and_independent_of_company_order_and_batching(texts, data):
  alone = np.concatenate([signatures([text], num_perm=16, shingle_size=3) for text in texts])
  np.testing.assert_array_equal(signatures(texts, num_perm=16, shingle_size=3), alone)
  order = data.draw(st.permutations(range(len(texts))))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(minhash, "_CHARS_PER_BATCH", data.draw(st.integers(1, 300)))
    patch.setattr(minhash, "_SHINGLES_PER_CHUNK", data.draw(st.integers(1, 50)))
    shuffled = signatures([texts[k] for k in order], num_perm=16, shingle_size=3)
  np.testing.assert_array_equal(shuffled, alone[list(order)])


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ça va — très bien, merci; naïve café!", "x" * 100, ""]


def test_signatures_do_not_depend_on_the_interpreter_or_its_hash_seed():
  # A worker process with another PYTHONHASHSEED computes the same signatures.
  code = (
    "import json, sys; from sft.databuilder.minhash import signatures; "
    "print(json.dumps(signatures(json.loads(sys.argv[1]), num_perm=8, shingle_size=2).tolist()))"
  )
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  out = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS)], env=env, capture_output=True, text=True, check=True)
  assert json.loads(out.stdout) == signatures(TEXTS, num_perm=8, shingle_size=2).tolist()


@settings(max_examples=60, deadline=None)
@given(text=TEXT, other=TEXT, bands=st.sampled_from([(1, 16), (4, 4), (16, 1)]))
def test_identical_texts_always_collide(text, other, bands):
  # However the permutations are banded, the same words (whatever their case and spacing) are a pair.
  texts = [text, other, text.upper() + " ", text]
  pairs = near_duplicate_pairs(texts, num_perm=16, bands=bands[0], rows=bands[1], shingle_size=3, threshold=1.0)
  found = {tuple(pair) for pair in pairs.tolist()}
  if minhash._words(text):
    assert {(0, 2), (0, 3), (2, 3)} <= found
  else:
    assert not found & {(0, 2), (0, 3), (2, 3)}


@settings(max_examples=80, deadline=None)
@given(texts=st.lists(SMALL_VOCAB_TEXT, min_size=2, max_size=12), threshold=st.sampled_from([0.3, 0.5, 0.7, 0.9]))
def test_reported_pairs_reach_the_threshold_in_exact_jaccard(texts, threshold):
  # Verification is exact: a pair below the threshold (however close its signatures) is never reported,
  # and every candidate at or above it is. 28 bands of 4 rows propose many pairs below the threshold.
  kwargs = {"num_perm": 112, "shingle_size": 2, "seed": 3}
  pairs = near_duplicate_pairs(texts, bands=28, rows=4, threshold=threshold, **kwargs)
  candidates = minhash.candidate_pairs(signatures(texts, **kwargs), bands=28, rows=4)
  above = {(i, j) for i, j in candidates.tolist() if jaccard(texts[i], texts[j], 2) >= threshold}
  assert {tuple(pair) for pair in pairs.tolist()} == above


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(SMALL_VOCAB_TEXT, min_size=1, max_size=12), data=st.data())
def test_set_jaccard_is_the_exact_jaccard(texts, data):
  sets = minhash.shingle_sets(texts, shingle_size=2)
  pairs = np.array(data.draw(st.lists(st.tuples(*[st.integers(0, len(texts) - 1)] * 2), max_size=20)), np.int64)
  expected = [jaccard(texts[i], texts[j], 2) for i, j in pairs.reshape(-1, 2).tolist()]
  np.testing.assert_allclose(minhash.set_jaccard(sets, pairs.reshape(-1, 2)), expected)


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(SMALL_VOCAB_TEXT, min_size=2, max_size=16), data=st.data())
def test_pairs_do_not_depend_on_record_order_or_batch_size(texts, data):
  pairs = {tuple(pair) for pair in near_duplicate_pairs(texts).tolist()}
  order = data.draw(st.permutations(range(len(texts))))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(minhash, "_CHARS_PER_BATCH", data.draw(st.integers(1, 200)))
    patch.setattr(minhash, "_SHINGLES_PER_CHUNK", data.draw(st.integers(1, 30)))
    shuffled = near_duplicate_pairs([texts[k] for k in order])
  assert {tuple(sorted((order[i], order[j]))) for i, j in shuffled.tolist()} == pairs
