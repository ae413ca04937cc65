"""Near-duplicate detection: MinHash signatures over word n-grams, LSH banding, union-find clusters.

    pairs = near_duplicate_pairs(texts)           # (num_pairs, 2) int64, i < j
    representative = clusters(len(texts), pairs)  # keep texts where representative == index

A text becomes the set of its word `shingle_size`-grams (lowercased `\\w+` words), each a 32-bit hash. Its
signature holds, for each of `num_perm` permutations h_k(x) = (a_k * x + b_k) mod 2**32 (a_k odd: one to
one on 32-bit values), the minimum over its shingles; two texts agree on an entry with probability equal to
the Jaccard similarity of their shingle sets. Banding (`bands` x `rows` entries) proposes candidate pairs,
which are kept when their shingle sets reach `threshold` in exact Jaccard similarity: MinHash only finds
pairs, so a pair is never kept or lost on an estimate's noise (+-0.04 at 0.7 with 112 permutations). The
defaults (5-grams, 28 bands of 4 rows) propose 99.95% of pairs at 0.7, where FineWeb's 14 x 8 proposes 57%.

Everything is vectorised in numpy over many documents at once, down to finding and hashing words. Hashes
are fixed arithmetic on the words' UTF-8 bytes and permutations come from `np.random.RandomState(seed)`,
never Python's salted `hash()`, so signatures are the same on every machine and for every batching.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# The signature of a text without words: no hash can reach it (they are below 2**32).
EMPTY = np.iinfo(np.uint64).max

_WORD = re.compile(r"\w+")
_1, _32, _33 = np.uint64(1), np.uint64(32), np.uint64(33)
# Odd multiplier of the polynomials that fold a word's bytes, and a shingle's words, into one value.
_POLY = np.uint64(0x9E3779B97F4A7C15)
# Words of up to this many bytes are folded in numpy, 8 bytes at a time; longer ones by hashlib.
_FOLDED_BYTES = 64
# _LOW_BYTES[k]: the mask of the low k bytes of a uint64.
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)
# bytes.translate table to 1 for the bytes that make up words (ASCII \w and every byte of a multi-byte UTF-8
# character: see _normalised_bytes), 0 for the others; translate is many times faster than a numpy lookup.
_WORD_BYTE = bytes(int(chr(i).isalnum() or chr(i) == "_" or i >= 128) for i in range(256))
# Texts whose words are hashed together: their shingles' arrays should fit in memory already mapped
# (reallocating fresh pages costs more than the arithmetic).
_CHARS_PER_BATCH = 1 << 18
# Shingles hashed by all permutations at once: (112, 4096) uint32 is 1.8 MB, small enough to stay in
# cache, which is faster than passes over one large array.
_SHINGLES_PER_CHUNK = 4096
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
  """(a, b), each (num_perm,) uint32, a odd: the permutations x -> a * x + b (mod 2**32) of `seed`."""
  rng = np.random.RandomState(seed)  # its stream is fixed across numpy versions and machines
  a = rng.randint(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
  b = rng.randint(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
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
  joined = b" ".join(encoded) + b" "  # a separator after every text
  # Word bytes flip to other bytes and back: edges alternate word start, word end (the last byte is a space).
  edges = np.flatnonzero(np.diff(np.frombuffer(joined.translate(_WORD_BYTE), np.bool_), prepend=False))
  word_start, word_end = edges[0::2], edges[1::2]
  text_end = np.cumsum(np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded)))
  num_words = np.diff(np.searchsorted(word_start, text_end), prepend=0)
  # The 8 bytes from every position, read little-endian whatever the machine: a word is folded 8 bytes at
  # a time (a mask keeps its own bytes of the last 8), then mixed.
  eight = np.ndarray((len(joined) + 1,), "<u8", joined + bytes(8), strides=(1,))
  length = word_end - word_start
  hashes = eight[word_start] & _LOW_BYTES[np.minimum(length, 8)]
  long_words = np.flatnonzero(length > 8)
  for offset in range(8, min(int(length.max(initial=0)), _FOLDED_BYTES), 8):  # one pass per 8 bytes
    long_words = long_words[length[long_words] > offset]
    rest = _LOW_BYTES[np.minimum(length[long_words] - offset, 8)]
    hashes[long_words] = hashes[long_words] * _POLY + (eight[word_start[long_words] + offset] & rest)
  # Longer words (a base64 blob, a run of one letter) are rare: hashed one by one, in time linear in their size.
  for k in np.flatnonzero(length > _FOLDED_BYTES).tolist():
    digest = hashlib.blake2b(joined[word_start[k] : word_end[k]], digest_size=8).digest()
    hashes[k] = int.from_bytes(digest, "little")
  return _fmix64(hashes), num_words


def _shingle_hashes(word_hashes: np.ndarray, num_words: np.ndarray, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
  """All shingles, concatenated: ((num_shingles,) uint32 hashes, (num_texts,) int64 counts).

  A shingle's hash is a polynomial in its words' hashes, so equal shingles hash equally in any batch.
  """
  word_hashes = np.concatenate([word_hashes, np.zeros(shingle_size, np.uint64)])  # reads past the end are masked
  first_word = np.cumsum(num_words) - num_words
  num_shingles = np.where(num_words >= shingle_size, num_words - shingle_size + 1, np.minimum(num_words, 1))
  # Shingle s of text d starts at word first_word[d] + s and has min(num_words[d], shingle_size) words.
  # Every run of shingle_size consecutive words, from contiguous slices; then those within one text.
  poly = word_hashes[: len(word_hashes) - shingle_size + 1].copy()
  for j in range(1, shingle_size):
    poly = poly * _POLY + word_hashes[j : len(word_hashes) - shingle_size + 1 + j]
  offset_in_text = np.arange(num_shingles.sum()) - np.repeat(np.cumsum(num_shingles) - num_shingles, num_shingles)
  poly = poly[np.repeat(first_word, num_shingles) + offset_in_text]
  # A text of fewer words is one shingle of all of them: its polynomial, redone with its own length.
  short = np.flatnonzero((num_words > 0) & (num_words < shingle_size))
  if len(short):
    poly[(np.cumsum(num_shingles) - num_shingles)[short]] = _short_polys(word_hashes, first_word[short], num_words[short])
  return (_fmix64(poly) >> _32).astype(np.uint32), num_shingles


def _short_polys(word_hashes: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
  """The polynomial of each of the `length[k]` words from `start[k]`, as a full shingle's."""
  poly = word_hashes[start]
  for j in range(1, int(length.max(initial=1))):
    poly = np.where(j < length, poly * _POLY + word_hashes[start + j], poly)
  return poly


def _min_hashes(
  shingle_hashes: np.ndarray, num_shingles: np.ndarray, a: np.ndarray, b: np.ndarray, signatures_nd: np.ndarray
) -> None:
  """Lowers each row of the (num_texts, num_perm) uint64 `signatures_nd` (all EMPTY to start with) to its
  text's minimum of every permutation over its shingles."""
  num_perm = len(a)
  has_shingles = np.flatnonzero(num_shingles)
  text_start = (np.cumsum(num_shingles) - num_shingles)[has_shingles]  # strictly increasing
  a_col, b_col = a[:, None], b[:, None]
  buffer = np.empty(num_perm * _SHINGLES_PER_CHUNK, np.uint32)
  for chunk_start in range(0, len(shingle_hashes), _SHINGLES_PER_CHUNK):
    x = shingle_hashes[chunk_start : chunk_start + _SHINGLES_PER_CHUNK]
    # (num_perm, chunk) so that the per-text minimum below reduces along contiguous memory. With a odd,
    # a * x + b wrapping modulo 2**32 maps the 32-bit shingle hashes one to one (no two shingles tie),
    # and numpy does it in 32-bit SIMD lanes: 4x cheaper than 64-bit arithmetic modulo a prime.
    phv = buffer[: num_perm * len(x)].reshape(num_perm, len(x))
    np.multiply(a_col, x, out=phv)
    phv += b_col
    # Texts that overlap this chunk, and where each begins in it (a text may span several chunks).
    first = np.searchsorted(text_start, chunk_start, side="right") - 1
    last = np.searchsorted(text_start, chunk_start + len(x), side="left")
    segment_start = np.maximum(text_start[first:last], chunk_start) - chunk_start
    minima = np.minimum.reduceat(phv, segment_start, axis=1).T  # (num_segments, num_perm)
    rows = has_shingles[first:last]
    signatures_nd[rows] = np.minimum(signatures_nd[rows], minima)


def _batches(texts: Sequence[str], max_chars: int) -> list[tuple[int, int]]:
  """Consecutive (start, stop) ranges of texts of about max_chars characters (a longer text on its own)."""
  ranges, start, chars = [], 0, 0
  for i, text in enumerate(texts):
    if chars and chars + len(text) > max_chars:
      ranges.append((start, i))
      start, chars = i, 0
    chars += len(text) + 1
  return ranges + [(start, len(texts))] if texts else ranges


class Sets(NamedTuple):
  """Texts' shingle sets as 32-bit hashes, text after text: text k's are hashes[offsets[k]:offsets[k + 1]]
  (in text order, repeats included)."""

  hashes: np.ndarray  # (total,) uint32
  offsets: np.ndarray  # (num_texts + 1,) int64


def sets_of(members: Sequence[Sequence[int]]) -> Sets:
  """The Sets of texts given as sequences of their shingle hashes."""
  lengths = np.fromiter((len(m) for m in members), np.int64, count=len(members))
  hashes = np.fromiter((h for m in members for h in m), np.uint32, count=int(lengths.sum()))
  return Sets(hashes, np.concatenate([[0], np.cumsum(lengths)]))


def sketches(texts: Sequence[str], *, num_perm: int, shingle_size: int, seed: int = 1) -> tuple[np.ndarray, Sets]:
  """(signatures(texts, ...), the texts' shingle Sets), from one pass over the texts."""
  if num_perm < 1 or shingle_size < 1:
    raise ValueError(f"num_perm and shingle_size must be positive, got {num_perm} and {shingle_size}")
  a, b = _permutations(num_perm, seed)
  signatures_nd = np.full((len(texts), num_perm), EMPTY, np.uint64)
  hashes, counts = [np.empty(0, np.uint32)], [np.empty(0, np.int64)]
  for start, stop in _batches(texts, _CHARS_PER_BATCH):
    shingle_hashes, num_shingles = _shingle_hashes(*_word_hashes(texts[start:stop]), shingle_size)
    _min_hashes(shingle_hashes, num_shingles, a, b, signatures_nd[start:stop])
    hashes.append(shingle_hashes)
    counts.append(num_shingles)
  offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
  return signatures_nd, Sets(np.concatenate(hashes), offsets)


def shingle_sets(texts: Sequence[str], *, shingle_size: int) -> Sets:
  """The texts' shingle Sets alone (no signatures)."""
  if shingle_size < 1:
    raise ValueError(f"shingle_size must be positive, got {shingle_size}")
  hashes, counts = [np.empty(0, np.uint32)], [np.empty(0, np.int64)]
  for start, stop in _batches(texts, _CHARS_PER_BATCH):
    shingle_hashes, num_shingles = _shingle_hashes(*_word_hashes(texts[start:stop]), shingle_size)
    hashes.append(shingle_hashes)
    counts.append(num_shingles)
  return Sets(np.concatenate(hashes), np.concatenate([[0], np.cumsum(np.concatenate(counts))]))


def signatures(texts: Sequence[str], *, num_perm: int, shingle_size: int, seed: int = 1) -> np.ndarray:
  """(num_texts, num_perm) uint64 MinHash signatures; a text without words gets all EMPTY.

  A text's signature depends only on the text, `num_perm`, `shingle_size` and `seed`, not on the others.
  """
  return sketches(texts, num_perm=num_perm, shingle_size=shingle_size, seed=seed)[0]


def _check_bands(num_perm: int, bands: int, rows: int) -> None:
  if bands < 1 or rows < 1 or bands * rows != num_perm:
    raise ValueError(f"bands * rows must equal num_perm: {bands} * {rows} = {bands * rows} != {num_perm}")


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


def _band_keys(signatures_nd: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """(num_texts * bands,) uint64 hash of each band's rows, band by band (all texts' band 0 first)."""
  band_nbr = signatures_nd.reshape(len(signatures_nd), bands, rows)
  keys_nb = np.full(band_nbr.shape[:2], np.arange(bands, dtype=np.uint64))  # the band is part of the key
  for row in range(rows):
    keys_nb = keys_nb * _POLY + band_nbr[:, :, row]
  return _fmix64(keys_nb.T.ravel())


def candidate_pairs(signatures: np.ndarray, *, bands: int, rows: int, max_bucket: int = MAX_BUCKET) -> np.ndarray:
  """(num_pairs, 2) int64 sorted unique pairs i < j whose signatures agree on all rows of some band.

  A bucket of up to `max_bucket` texts gives all its pairs; a bigger one gives each member paired with
  its smallest index only, which keeps the output linear in its size and still joins it into one cluster.
  Texts without words (EMPTY signatures: their first entry tells) are in no pair.
  """
  signatures_nd = np.asarray(signatures)
  _check_bands(signatures_nd.shape[1], bands, rows)
  has_words = np.flatnonzero(signatures_nd[:, 0] != EMPTY)
  live_nd = signatures_nd[has_words] if len(has_words) < len(signatures_nd) else signatures_nd
  band_nbr = live_nd.reshape(len(live_nd), bands, rows)
  # All bands in one sort; a position in it is band * num_live + text.
  keys = _band_keys(live_nd, bands, rows)
  order = np.argsort(keys)
  sorted_keys = keys[order]
  # Buckets are runs of exactly equal rows of one band: a 64-bit key collision can split a bucket (odds
  # ~n**2 / 2**64), never merge two. Most keys are unique: rows are compared where keys repeat only.
  repeat = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
  band, text = np.divmod(order, max(len(live_nd), 1))
  equal = (band[repeat] == band[repeat + 1]) & np.all(
    band_nbr[text[repeat], band[repeat]] == band_nbr[text[repeat + 1], band[repeat + 1]], axis=1
  )
  joined = repeat[equal] + 1  # positions that continue the bucket before them
  new_run = np.ones(len(order), bool)
  new_run[joined] = False
  run_start = np.flatnonzero(new_run)
  run_length = np.diff(np.append(run_start, len(order)))
  # Members of buckets of two or more, bucket by bucket, by index within a bucket (the sort is not stable).
  shared = np.repeat(run_length >= 2, run_length)
  run_of = np.cumsum(new_run)[shared]
  members = np.sort(run_of * len(order) + order[shared]) % len(order)
  pairs_n2 = has_words[members[bucket_pairs(run_length[run_length >= 2], max_bucket)] % max(len(live_nd), 1)]
  # One int64 code per pair: sorting and deduplicating it orders pairs by (i, j).
  codes = _sorted_unique(pairs_n2[:, 0] * len(signatures_nd) + pairs_n2[:, 1])
  return np.stack([codes // len(signatures_nd), codes % len(signatures_nd)], axis=1).astype(np.int64)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
  """np.unique(values) of a 1-d array, from np.sort (numpy 2.4's np.unique is many times slower)."""
  values = np.sort(values)
  return values[np.append(True, values[1:] != values[:-1])] if len(values) else values


def set_jaccard(sets: Sets, pairs: np.ndarray) -> np.ndarray:
  """(num_pairs,) float64 exact Jaccard similarity of each pair's shingle sets; 1.0 for two empty sets.

  All pairs at once, in one sort of (pair, hash, side) codes: a code that is there for both sides is shared.
  """
  pairs_n2 = np.asarray(pairs, np.int64).reshape(-1, 2)
  counts = np.diff(sets.offsets)
  codes = []
  for side, texts in enumerate(pairs_n2.T):
    length = counts[texts]
    position = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    members = sets.hashes[np.repeat(sets.offsets[texts], length) + position].astype(np.uint64)
    codes.append(np.repeat(np.arange(len(texts), dtype=np.uint64) << _33, length) | members << _1 | np.uint64(side))
  distinct = _sorted_unique(np.concatenate(codes))  # each (pair, hash, side) once
  shared = distinct[1:][(distinct[1:] >> _1) == (distinct[:-1] >> _1)]
  common = np.bincount((shared >> _33).astype(np.int64), minlength=len(pairs_n2))
  union = np.bincount((distinct >> _33).astype(np.int64), minlength=len(pairs_n2)) - common
  return np.where(union > 0, common / np.maximum(union, 1), 1.0)


def near_duplicate_pairs(
  texts: Sequence[str],
  *,
  num_perm: int = 112,
  bands: int = 28,
  rows: int = 4,
  shingle_size: int = 5,
  threshold: float = 0.7,
  seed: int = 1,
) -> np.ndarray:
  """(num_pairs, 2) int64 sorted pairs i < j of texts that are LSH candidates and whose shingle sets reach
  `threshold` in exact Jaccard similarity."""
  _check_bands(num_perm, bands, rows)
  signatures_nd, sets = sketches(texts, num_perm=num_perm, shingle_size=shingle_size, seed=seed)
  candidates_n2 = candidate_pairs(signatures_nd, bands=bands, rows=rows)
  return candidates_n2[set_jaccard(sets, candidates_n2) >= threshold]


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
