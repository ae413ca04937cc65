"""Near-duplicate detection: MinHash signatures, LSH candidate pairs, clusters."""

from __future__ import annotations

import numpy as np
import pytest

from sft.databuilder import minhash
from sft.databuilder.minhash import (
  EMPTY,
  candidate_pairs,
  clusters,
  jaccard,
  near_duplicate_pairs,
  shingles,
  signatures,
)

# 60 words, 56 distinct 5-word shingles.
BASE = (
  "The quick brown fox jumps over the lazy dog while the farmer watches from the porch of his old "
  "wooden house. Later that evening the fox returns to the field, looking for the chickens that "
  "wander near the fence, but the dog is awake now and barks loudly until the fox runs back into "
  "the dark forest beyond the river."
)
ONE_WORD_CHANGED = BASE.replace("chickens", "ducks")
UNRELATED = (
  "Gradient descent updates the parameters of a model in the direction that lowers the loss, and "
  "the learning rate sets how far each step goes; too large a rate makes training diverge, too small "
  "a rate makes it crawl, so schedules warm the rate up and then decay it over many thousands of steps."
)
# The first three entries of signatures(["short text"], num_perm=24, shingle_size=5, seed=1).
SHORT_TEXT_FIRST_3 = [4081144990, 1946581081, 576158549]
OTHER = (
  "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept alive with regular "
  "feedings of flour and water, and bakers use it instead of commercial yeast to leaven bread with a "
  "slower rise, a more open crumb and a tangy flavour that many people prefer to ordinary loaves."
)


def test_shingles_are_lowercased_word_ngrams():
  assert shingles("A b, C! d", 3) == {"a b c", "b c d"}
  assert shingles("Hello, World", 5) == {"hello world"}  # shorter than a shingle: one of all its words
  assert shingles(" ... ", 5) == set()


def test_jaccard_is_exact():
  assert jaccard("a b c d", "a b c e", 2) == pytest.approx(2 / 4)  # {ab, bc, cd} vs {ab, bc, ce}
  assert jaccard(BASE, BASE.upper(), 5) == 1.0
  assert jaccard("", "", 5) == 0.0


def test_identical_and_one_word_changed_are_paired_unrelated_are_not():
  texts = [BASE, UNRELATED, ONE_WORD_CHANGED, OTHER, BASE]
  assert jaccard(BASE, ONE_WORD_CHANGED, 5) == pytest.approx(51 / 61)  # 5 of 56 shingles replaced
  assert near_duplicate_pairs(texts).tolist() == [[0, 2], [0, 4], [2, 4]]


def test_empty_texts_are_never_paired():
  texts = ["", BASE, "", "  ?!  ", BASE, ""]
  assert near_duplicate_pairs(texts).tolist() == [[1, 4]]
  signatures_nd = signatures(texts, num_perm=16, shingle_size=5)
  assert (signatures_nd[[0, 2, 3, 5]] == EMPTY).all()
  assert candidate_pairs(signatures_nd, bands=4, rows=4).tolist() == [[1, 4]]


def test_signatures_depend_only_on_the_words():
  texts = [
    "Ça va — très bien, merci; naïve café!",  # non-ASCII: words found by the regex
    "ça va très bien merci naïve café",
    "foo_bar baz-qux 123abc",  # ASCII: words found in the bytes; `_` is a word character, `-` is not
    "FOO_BAR  baz qux\n123ABC.",
    "foo bar baz qux 123abc",
  ]
  signatures_nd = signatures(texts, num_perm=32, shingle_size=2)
  np.testing.assert_array_equal(signatures_nd[0], signatures_nd[1])
  np.testing.assert_array_equal(signatures_nd[2], signatures_nd[3])
  assert (signatures_nd[2] != signatures_nd[4]).any()
  assert (signatures_nd != EMPTY).all() and signatures_nd.dtype == np.uint64


def test_signatures_are_deterministic_and_independent_of_batching(monkeypatch):
  texts = [BASE, UNRELATED, "", ONE_WORD_CHANGED, OTHER, "short text"]
  signatures_nd = signatures(texts, num_perm=24, shingle_size=5)
  np.testing.assert_array_equal(signatures(texts, num_perm=24, shingle_size=5), signatures_nd)
  # Values pinned so that a change of hashing (which would invalidate stored signatures) is noticed.
  assert signatures_nd[5, :3].tolist() == SHORT_TEXT_FIRST_3
  alone = np.concatenate([signatures([text], num_perm=24, shingle_size=5) for text in texts])
  np.testing.assert_array_equal(alone, signatures_nd)
  # Tiny batches and chunks: texts spread over several chunks, in any order and company.
  monkeypatch.setattr(minhash, "_CHARS_PER_BATCH", 400)
  monkeypatch.setattr(minhash, "_SHINGLES_PER_CHUNK", 7)
  reordered = signatures(texts[::-1] + [OTHER], num_perm=24, shingle_size=5)
  np.testing.assert_array_equal(reordered[:-1][::-1], signatures_nd)


def test_other_seeds_give_other_signatures():
  assert (
    signatures([BASE], num_perm=8, shingle_size=5, seed=2) != signatures([BASE], num_perm=8, shingle_size=5)
  ).all()


@pytest.mark.parametrize(
  "a, b",
  [
    (BASE, ONE_WORD_CHANGED),
    (BASE, BASE.replace("fox", "cat")),  # three words changed
    (BASE, BASE[: len(BASE) // 2]),  # half of it
    (BASE, UNRELATED),
  ],
)
def test_estimated_jaccard_is_close_to_exact(a, b):
  signatures_nd = signatures([a, b], num_perm=112, shingle_size=5)
  estimate = np.mean(signatures_nd[0] == signatures_nd[1])
  assert abs(estimate - jaccard(a, b, 5)) < 0.1


def test_candidate_pairs_need_a_whole_band():
  signatures_nd = np.array(
    [
      [1, 2, 3, 4],
      [1, 2, 9, 9],  # band 0 as text 0
      [9, 2, 3, 4],  # band 1 as text 0
      [1, 9, 3, 9],  # half of each band: no pair
    ],
    dtype=np.uint64,
  )
  assert candidate_pairs(signatures_nd, bands=2, rows=2).tolist() == [[0, 1], [0, 2]]


def test_big_buckets_give_a_star():
  signatures_nd = np.zeros((5, 2), np.uint64)
  all_pairs = [[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4], [2, 3], [2, 4], [3, 4]]
  assert candidate_pairs(signatures_nd, bands=1, rows=2, max_bucket=5).tolist() == all_pairs
  assert candidate_pairs(signatures_nd, bands=1, rows=2, max_bucket=4).tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]


def test_bucket_pairs_pair_within_consecutive_buckets():
  # Buckets [0, 1, 2], [3], [4, 5, 6, 7, 8]: all pairs of the first, a star of the last (above max_bucket).
  assert minhash.bucket_pairs([3, 1, 5], max_bucket=4).tolist() == [[0, 1], [0, 2], [1, 2], [4, 5], [4, 6], [4, 7], [4, 8]]
  assert minhash.bucket_pairs([minhash.MAX_BUCKET + 1]).tolist() == [[0, j] for j in range(1, minhash.MAX_BUCKET + 1)]
  assert minhash.bucket_pairs([1, 1]).shape == minhash.bucket_pairs([]).shape == (0, 2)


def test_clusters_take_the_smallest_index():
  assert clusters(7, np.array([(3, 1), (1, 4), (5, 6)])).tolist() == [0, 1, 2, 1, 1, 5, 5]
  assert clusters(6, np.array([(4, 5), (2, 3), (3, 5), (0, 0)])).tolist() == [0, 1, 2, 2, 2, 2]
  assert clusters(3, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2]
  with pytest.raises(ValueError, match="pairs must index items"):
    clusters(3, np.array([(0, 3)]))


def test_bands_times_rows_must_be_num_perm():
  with pytest.raises(ValueError, match="bands \\* rows must equal num_perm: 10 \\* 8 = 80 != 112"):
    near_duplicate_pairs([BASE], num_perm=112, bands=10, rows=8)
  with pytest.raises(ValueError, match="bands \\* rows must equal num_perm"):
    candidate_pairs(np.zeros((2, 12), np.uint64), bands=2, rows=5)
