"""Near-duplicate detection: MinHash signatures over word n-grams, LSH banding, union-find clusters.

    pairs = near_duplicate_pairs(texts)           # (num_pairs, 2) int64, i < j
    representative = clusters(len(texts), pairs)  # keep texts where representative == index

A text becomes the set of its word `shingle_size`-grams (lowercased `\\w+` words). Its signature holds,
for each of `num_perm` hash functions h_k(x) = (a_k * x + b_k) mod (2**61 - 1), the minimum over its
shingles; two texts agree on an entry with probability equal to the Jaccard similarity of their shingle
sets. Banding (`bands` x `rows` entries) proposes candidate pairs, which are kept when the fraction of
equal entries reaches `threshold`. The defaults (5-grams, 14 bands of 8 rows) are FineWeb's (datatrove).

Everything is vectorised in numpy over many documents at once, down to finding and hashing words. Hashes
are fixed arithmetic on the words' UTF-8 bytes and permutations come from `np.random.RandomState(seed)`,
never Python's salted `hash()`, so signatures are the same on every machine and for every batching.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

MERSENNE_PRIME = (1 << 61) - 1
# The signature of a text without words: no hash can reach it (they are at most MERSENNE_PRIME + 7).
EMPTY = np.iinfo(np.uint64).max

_WORD = re.compile(r"\w+")
_P = np.uint64(MERSENNE_PRIME)
_61 = np.uint64(61)
_32 = np.uint64(32)
# Odd multiplier of the polynomials that fold a word's bytes, and a shingle's words, into one value.
_POLY = np.uint64(0x9E3779B97F4A7C15)
_POLY_INVERSE = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))
# Bytes that make up words: ASCII \w and every byte of a multi-byte UTF-8 character (see _normalised_bytes).
_WORD_BYTE = np.array([chr(i).isalnum() or chr(i) == "_" if i < 128 else True for i in range(256)])
# Texts whose words are hashed together: their bytes make a few uint64 arrays 8x their size, which
# should fit in memory already mapped (reallocating fresh pages costs more than the arithmetic).
_CHARS_PER_BATCH = 1 << 18
# Shingles hashed by all permutations at once: (112, 4096) uint64 is 3.7 MB, small enough to stay in
# cache, which is faster than passes over one large array.
_SHINGLES_PER_CHUNK = 4096
_PAIRS_PER_CHUNK = 1 << 16
# A band bucket of more texts than this (boilerplate copied thousands of times) pairs each member with
# its first only: output linear in the bucket's size, and still one cluster.
MAX_BUCKET = 64


def _words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def shingles(text: str, size: int) -> set[str]:
  """Word `size`-grams of `text`, joined by spaces; a shorter non-empty text is one shingle of all its words."""
  tokens = _words(text)
  if len(tokens) < size:
    return {" ".join(tokens)} if tokens else set()
  return {" ".join(tokens[i : i + size]) for i in range(len(tokens) - size + 1)}


def jaccard(a: str, b: str, shingle_size: int) -> float:
  """Exact Jaccard similarity of the shingle sets of two texts; 0.0 when either has no words."""
  shingles_a, shingles_b = shingles(a, shingle_size), shingles(b, shingle_size)
  if not shingles_a or not shingles_b:
    return 0.0
  return len(shingles_a & shingles_b) / len(shingles_a | shingles_b)


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(a, b), each (num_perm,) uint64 in [1, p) and [0, p): the universal hash functions of `seed`."""
  rng = np.random.RandomState(seed)  # its stream is fixed across numpy versions and machines
  a = rng.randint(1, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
  b = rng.randint(0, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
  return a, b


def _fmix64(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's finalizer: spreads every input bit over the output so its top bits are usable."""
  h = h ^ (h >> np.uint64(33))
  h = h * np.uint64(0xFF51AFD7ED558CCD)
  h = h ^ (h >> np.uint64(33))
  h = h * np.uint64(0xC4CEB9FE1A85EC53)
  return h ^ (h >> np.uint64(33))


def _normalised_bytes(text: str) -> bytes:
  """The lowercased text as UTF-8 in which exactly the `\\w+` words are runs of word bytes (_WORD_BYTE)."""
  lowered = text.lower()
  if lowered.isascii():  # ASCII \w is [a-z0-9_] after lower(): the bytes already say where words are
    return lowered.encode("ascii")
  return " ".join(_WORD.findall(lowered)).encode()


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """All words of `texts`, concatenated: ((num_words,) uint64 hashes, (num_texts,) int64 word counts).

  Words are found and hashed in numpy over the bytes of all texts at once; making a Python string per
  word would cost more than everything else together.
  """
  encoded = [_normalised_bytes(text) for text in texts]
  bytes_n = np.frombuffer(b" ".join(encoded) + b" ", np.uint8)  # a separator after every text
  is_word = _WORD_BYTE[bytes_n]
  edge = np.diff(is_word.astype(np.int8), prepend=np.int8(0))
  word_start, word_end = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
  text_length = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
  text_start = np.cumsum(text_length) - text_length
  text_of_word = np.searchsorted(text_start, word_start, side="right") - 1
  num_words = np.bincount(text_of_word, minlength=len(texts)).astype(np.int64)
  # Word hash: sum of byte[t] * M**(t - start) over the word, from prefix sums of byte[t] * M**t scaled
  # back by M**-start (M is odd, so invertible modulo 2**64), then mixed.
  power = np.cumprod(np.full(len(bytes_n), _POLY)) * _POLY_INVERSE  # M**t, wrapping
  inverse_power = np.cumprod(np.full(len(bytes_n), _POLY_INVERSE)) * _POLY
  prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(bytes_n * power, dtype=np.uint64)])
  return _fmix64((prefix[word_end] - prefix[word_start]) * inverse_power[word_start]), num_words


def _shingle_hashes(word_hashes: np.ndarray, num_words: np.ndarray, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
  """All shingles, concatenated: ((num_shingles,) uint64 32-bit hashes, (num_texts,) int64 counts).

  A shingle's hash is a polynomial in its words' hashes, so equal shingles hash equally in any batch.
  """
  word_hashes = np.concatenate([word_hashes, np.zeros(shingle_size, np.uint64)])  # reads past the end are masked
  first_word = np.cumsum(num_words) - num_words
  num_shingles = np.where(num_words >= shingle_size, num_words - shingle_size + 1, np.minimum(num_words, 1))
  # Shingle s of text d starts at word first_word[d] + s and has min(num_words[d], shingle_size) words.
  offset_in_text = np.arange(num_shingles.sum()) - np.repeat(np.cumsum(num_shingles) - num_shingles, num_shingles)
  start = np.repeat(first_word, num_shingles) + offset_in_text
  length = np.repeat(np.minimum(num_words, shingle_size), num_shingles)
  poly = np.zeros(len(start), np.uint64)
  for j in range(shingle_size):
    poly = np.where(j < length, poly * _POLY + word_hashes[start + j], poly)
  return _fmix64(poly) >> _32, num_shingles


def _min_hashes(shingle_hashes: np.ndarray, num_shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(num_texts, num_perm) uint64: per text, the minimum of every permutation over its shingles."""
  num_perm = len(a)
  signatures_nd = np.full((len(num_shingles), num_perm), EMPTY, np.uint64)
  has_shingles = np.flatnonzero(num_shingles)
  text_start = (np.cumsum(num_shingles) - num_shingles)[has_shingles]  # strictly increasing
  a_col, b_col = a[:, None], b[:, None]
  buffer = np.empty(num_perm * _SHINGLES_PER_CHUNK, np.uint64)
  high_bits = np.empty_like(buffer)
  for chunk_start in range(0, len(shingle_hashes), _SHINGLES_PER_CHUNK):
    x = shingle_hashes[chunk_start : chunk_start + _SHINGLES_PER_CHUNK]
    # (num_perm, chunk) so that the per-text minimum below reduces along contiguous memory.
    phv = buffer[: num_perm * len(x)].reshape(num_perm, len(x))
    high = high_bits[: phv.size].reshape(phv.shape)
    # a * x + b wraps modulo 2**64 before the reduction, as in datasketch and datatrove; with x < 2**32
    # the wrapped a * x is still one-to-one unless a has 32 trailing zero bits. (y & p) + (y >> 61) is
    # congruent to y mod p and equals it but for a 2**-58 fraction of y (where it lands in [p, p + 7]):
    # as good a hash, and 2.5x cheaper than numpy's %.
    np.multiply(a_col, x, out=phv)
    phv += b_col
    np.right_shift(phv, _61, out=high)
    phv &= _P
    phv += high
    # Texts that overlap this chunk, and where each begins in it (a text may span several chunks).
    first = np.searchsorted(text_start, chunk_start, side="right") - 1
    last = np.searchsorted(text_start, chunk_start + len(x), side="left")
    segment_start = np.maximum(text_start[first:last], chunk_start) - chunk_start
    minima = np.minimum.reduceat(phv, segment_start, axis=1).T  # (num_segments, num_perm)
    rows = has_shingles[first:last]
    signatures_nd[rows] = np.minimum(signatures_nd[rows], minima)
  return signatures_nd


def _batches(texts: Sequence[str], max_chars: int) -> list[tuple[int, int]]:
  """Consecutive (start, stop) ranges of texts of about max_chars characters (a longer text on its own)."""
  ranges, start, chars = [], 0, 0
  for i, text in enumerate(texts):
    if chars and chars + len(text) > max_chars:
      ranges.append((start, i))
      start, chars = i, 0
    chars += len(text) + 1
  return ranges + [(start, len(texts))] if texts else ranges


def signatures(texts: Sequence[str], *, num_perm: int, shingle_size: int, seed: int = 1) -> np.ndarray:
  """(num_texts, num_perm) uint64 MinHash signatures; a text without words gets all EMPTY.

  A text's signature depends only on the text, `num_perm`, `shingle_size` and `seed`, not on the others.
  """
  if num_perm < 1 or shingle_size < 1:
    raise ValueError(f"num_perm and shingle_size must be positive, got {num_perm} and {shingle_size}")
  a, b = _permutations(num_perm, seed)
  batches = [
    _min_hashes(*_shingle_hashes(*_word_hashes(texts[start:stop]), shingle_size), a, b)
    for start, stop in _batches(texts, _CHARS_PER_BATCH)
  ]
  return np.concatenate(batches) if batches else np.empty((0, num_perm), np.uint64)


def _check_bands(num_perm: int, bands: int, rows: int) -> None:
  if bands < 1 or rows < 1 or bands * rows != num_perm:
    raise ValueError(f"bands * rows must equal num_perm: {bands} * {rows} = {bands * rows} != {num_perm}")


def _row_keys(band_nr: np.ndarray) -> np.ndarray:
  """(n,) uint64 hash of each row of an (n, rows) uint64 band."""
  keys = np.zeros(len(band_nr), np.uint64)
  for column in band_nr.T:
    keys = _fmix64(keys * _POLY + column)
  return keys


def bucket_pairs(bucket_sizes: np.ndarray, max_bucket: int = MAX_BUCKET) -> np.ndarray:
  """(num_pairs, 2) int64 positions i < j in the same bucket, for buckets of consecutive positions with
  these sizes (in order, from 0): all pairs of a bucket of up to `max_bucket`, else each member with its first.

  The one place the pairing rule lives: candidate_pairs calls it on all buckets of a band at once, a
  distributed runner on one bucket at a time (`bucket_pairs([len(members)])`).
  """
  run_length = np.asarray(bucket_sizes, np.int64).reshape(-1)
  run_start = np.cumsum(run_length) - run_length
  run_of = np.repeat(np.arange(len(run_length)), run_length)
  position = np.arange(len(run_of))
  small = run_length[run_of] <= max_bucket
  # In a small bucket, each member pairs with every later member.
  partners = np.where(small, run_start[run_of] + run_length[run_of] - position - 1, 0)
  left = np.repeat(position, partners)
  right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(partners) - partners, partners)
  # In a big bucket (e.g. thousands of copies of a boilerplate text), each member pairs only with its first.
  spoke = np.flatnonzero(~small & (position > run_start[run_of]))
  return np.stack([np.concatenate([left, run_start[run_of[spoke]]]), np.concatenate([right, spoke])], axis=1)


def _band_pairs(band_nr: np.ndarray, max_bucket: int) -> np.ndarray:
  """(num_pairs, 2) int64 row pairs i < j with equal band rows, paired by bucket_pairs."""
  order = np.argsort(_row_keys(band_nr), kind="stable")  # equal rows end up adjacent, by index
  sorted_nr = band_nr[order]
  # Buckets are runs of exactly equal rows: a 64-bit key collision can split a bucket (odds ~n**2 / 2**64),
  # never merge two.
  new_run = np.ones(len(order), bool)
  new_run[1:] = np.any(sorted_nr[1:] != sorted_nr[:-1], axis=1)
  run_length = np.diff(np.append(np.flatnonzero(new_run), len(order)))
  return order[bucket_pairs(run_length, max_bucket)]


def candidate_pairs(signatures: np.ndarray, *, bands: int, rows: int, max_bucket: int = MAX_BUCKET) -> np.ndarray:
  """(num_pairs, 2) int64 sorted unique pairs i < j whose signatures agree on all rows of some band.

  A bucket of up to `max_bucket` texts gives all its pairs; a bigger one gives each member paired with
  its smallest index only, which keeps the output linear in its size and still joins it into one cluster.
  Texts without words (EMPTY signatures) are in no pair.
  """
  signatures_nd = np.asarray(signatures)
  _check_bands(signatures_nd.shape[1], bands, rows)
  has_words = np.flatnonzero(np.any(signatures_nd != EMPTY, axis=1))
  live_nd = signatures_nd[has_words]
  pairs = [_band_pairs(live_nd[:, band * rows : (band + 1) * rows], max_bucket) for band in range(bands)]
  pairs_n2 = has_words[np.concatenate(pairs)] if len(has_words) else np.empty((0, 2), np.int64)
  # One int64 code per pair: sorting and deduplicating it orders pairs by (i, j).
  codes = np.unique(pairs_n2[:, 0] * len(signatures_nd) + pairs_n2[:, 1])
  return np.stack([codes // len(signatures_nd), codes % len(signatures_nd)], axis=1).astype(np.int64)


def estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  """(num_pairs,) float64 fraction of equal signature entries of each pair."""
  estimates = [
    np.mean(signatures[chunk[:, 0]] == signatures[chunk[:, 1]], axis=1)
    for chunk in np.split(pairs, range(_PAIRS_PER_CHUNK, len(pairs), _PAIRS_PER_CHUNK))
  ]
  return np.concatenate(estimates) if len(pairs) else np.empty(0)


def verified_pairs(signatures: np.ndarray, pairs: np.ndarray, threshold: float) -> np.ndarray:
  """The rows of `pairs` whose estimated Jaccard similarity is >= threshold."""
  return pairs[estimated_jaccard(signatures, pairs) >= threshold]


def near_duplicate_pairs(
  texts: Sequence[str],
  *,
  num_perm: int = 112,
  bands: int = 14,
  rows: int = 8,
  shingle_size: int = 5,
  threshold: float = 0.7,
  seed: int = 1,
) -> np.ndarray:
  """(num_pairs, 2) int64 sorted pairs i < j of texts whose estimated Jaccard similarity is >= threshold."""
  _check_bands(num_perm, bands, rows)
  signatures_nd = signatures(texts, num_perm=num_perm, shingle_size=shingle_size, seed=seed)
  return verified_pairs(signatures_nd, candidate_pairs(signatures_nd, bands=bands, rows=rows), threshold)


def clusters(num_items: int, pairs: np.ndarray) -> np.ndarray:
  """(num_items,) int64: each item's representative, the smallest index of its connected component."""
  pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
  if len(pairs) and (pairs.min() < 0 or pairs.max() >= num_items):
    raise ValueError(f"pairs must index items in [0, {num_items}), got [{pairs.min()}, {pairs.max()}]")
  parent = list(range(num_items))

  def find(item: int) -> int:
    root = item
    while parent[root] != root:
      root = parent[root]
    while parent[item] != root:  # path compression
      parent[item], item = root, parent[item]
    return root

  for i, j in pairs.tolist():
    root_i, root_j = find(i), find(j)
    # Hanging the larger root under the smaller keeps every root its component's smallest index.
    parent[max(root_i, root_j)] = min(root_i, root_j)
  return np.array([find(item) for item in range(num_items)], dtype=np.int64)
