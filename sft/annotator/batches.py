"""How the local annotator (`local`) shapes its work. Prompts are batched by length bucket (the server's
buckets: powers of two from 16, then the prompt room), up to `batch_size` of one bucket per batch, whose
KV cache holds that bucket plus the new tokens. A batch's prompts are prefilled PREFILL_ROWS at a time,
each padded to its own length rounded up to PREFILL_STEP, into that cache (`Programs`), then decoded
together; on a one-device CPU, CPU_LANES batches run at once (`in_lanes`). A row's bucket, prefill width
and batch shape are functions of its own prompt, and its sampling key of its own tokens (`row_keys`), so
its numbers never depend on the prompts beside it: a rerun that generates only what a cache lacks answers
as the whole run did.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sft.errors import ConfigError
from sft.evaluator.generate import constrain_cache, decode, prefill_into
from sft.evaluator.sampling import Sampler
from sft.model.transformer import init_cache
from sft.serve.engine import bucket_of, buckets  # noqa: F401  (the server's buckets: one set of shapes)

# Batches generated at once on a one-device CPU mesh. XLA:CPU multiplies a 32-row decoding step's small
# products on one thread, so a second batch in flight keeps the second core busy: 1.25-1.3x on 2 cores.
# Each batch runs the program it runs alone: no answer changes.
CPU_LANES = 2
# A batch's prompts are prefilled PREFILL_ROWS at a time, each padded to its length rounded up to
# PREFILL_STEP (within its bucket): on the benchmark's prompts, 1.3x fewer prompt tokens than padding
# every row of a batch to the bucket, and no prefill of the rows a batch lacks.
PREFILL_ROWS = 8
PREFILL_STEP = 32


def by_bucket(lengths: Sequence[int], room: int, batch_size: int) -> Iterator[tuple[int, list[int]]]:
  """(bucket, indices of at most `batch_size` rows) batches: the indices grouped by the bucket of their
  length, shortest first. A row's bucket is its own length's, whoever it is batched with."""
  groups: dict[int, list[int]] = {}
  for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
    groups.setdefault(bucket_of(lengths[i], room), []).append(i)
  for bucket, members in sorted(groups.items()):
    for start in range(0, len(members), batch_size):
      yield bucket, members[start:start + batch_size]


def prefill_width(length: int, bucket: int) -> int:
  """The width a prompt of `length` tokens is prefilled at: rounded up to PREFILL_STEP, at most its bucket."""
  return min(bucket, -(-length // PREFILL_STEP) * PREFILL_STEP)


def prefill_groups(lengths: Sequence[int], bucket: int, rows: int) -> Iterator[tuple[int, list[int]]]:
  """(width, at most `rows` indices into `lengths`) groups: the prompts of one batch by prefill width."""
  groups: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    groups.setdefault(prefill_width(n, bucket), []).append(i)
  for width, members in sorted(groups.items()):
    for start in range(0, len(members), rows):
      yield width, members[start:start + rows]


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of one decoding setting: `empty(batch, length)` a zeroed stacked cache and
  (batch, V) logits; `prefill` (sft.evaluator.generate.prefill_into) writes prompts into them; `decode`
  (generate.decode) answers from them. Each compiles once per shape."""

  empty: Any
  prefill: Any
  decode: Any


def make_programs(model, *, max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int, sampler: Sampler) -> Programs:
  """The Programs of `model` for one decoding setting; the prefill writes into the cache it is given."""
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def empty(batch: int, length: int):
    return constrain_cache(init_cache(model.cfg, batch, length)), jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)

  answer = functools.partial(
      decode, model=model, max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), pad_id=pad_id, sampler=sampler
  )
  return Programs(
      empty, jax.jit(functools.partial(prefill_into, model=model), donate_argnums=(1, 2)),
      jax.jit(answer),
  )


def row_key_data(tokens: Sequence[int]) -> tuple[int, int]:
  """Two 32-bit words of the digest of a prompt's tokens: what its sampling key is folded from."""
  digest = hashlib.sha256(np.asarray(tokens, np.int32).tobytes()).digest()
  return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def row_keys(seed: int, prompts: Sequence[Sequence[int]]) -> jax.Array:
  """(B,) keys, each from `seed` and its row's prompt alone: a sampled answer is the same in any batch."""
  data = jnp.asarray([row_key_data(p) for p in prompts], jnp.uint32)
  base = jax.random.key(seed)
  return jax.vmap(lambda d: jax.random.fold_in(jax.random.fold_in(base, d[0]), d[1]))(data)


def fill_rows(rows: Sequence[Sequence[int]], width: int, batch_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(batch_size, width) right-padded tokens and (batch_size,) lengths; missing rows copy the first."""
  rows = [*rows, *[rows[0]] * (batch_size - len(rows))]
  tokens = np.full((batch_size, width), pad_id, np.int32)
  for r, row in enumerate(rows):
    tokens[r, : len(row)] = row
  return tokens, np.asarray([len(r) for r in rows], np.int32)


def score_rows(encoded: Sequence[tuple[np.ndarray, np.ndarray]], width: int, batch_size: int) -> dict[str, np.ndarray]:
  """One whole (unpacked) row per (tokens, loss mask), laid out as the evaluator's choice rows
  (sft.evaluator.choices.choice_rows): inputs, targets, loss_mask, segment_ids, positions; `width`
  columns, `batch_size` rows (the missing ones all padding)."""
  keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
  batch = {k: np.zeros((batch_size, width), np.int32) for k in keys}
  for r, (tokens, mask) in enumerate(encoded):
    n = len(tokens) - 1
    batch["inputs"][r, :n], batch["targets"][r, :n], batch["loss_mask"][r, :n] = tokens[:-1], tokens[1:], mask[1:]
    batch["segment_ids"][r, :n] = 1
    batch["positions"][r, :n] = np.arange(n)
  return batch


def dedup(items: Sequence[Any], key) -> tuple[list[Any], list[int]]:
  """(the distinct items by `key`, first seen first; each item's index among them): equal prompts are
  computed once, which changes no answer (a row's answer depends on its own tokens only)."""
  seen: dict[Any, int] = {}
  distinct, index = [], []
  for item in items:
    k = key(item)
    if k not in seen:
      seen[k] = len(distinct)
      distinct.append(item)
    index.append(seen[k])
  return distinct, index


def in_lanes(fn: Callable, items: Iterable, lanes: int, context: Callable[[], ContextManager]) -> Iterator:
  """fn(item) for each item, results in order, `lanes` items at a time, each in a thread of its own
  under `context()` (with one lane, in this thread as it is). An error (or a consumer that stops) leaves
  no item queued behind it: what has not started never does."""
  if lanes == 1:
    yield from map(fn, items)
    return

  def in_context(item):
    with context():
      return fn(item)

  pool = concurrent.futures.ThreadPoolExecutor(lanes, thread_name_prefix="sft-annotate")
  try:
    pending: list[concurrent.futures.Future] = []
    for item in items:
      pending.append(pool.submit(in_context, item))
      if len(pending) > lanes:
        yield pending.pop(0).result()
    for future in pending:
      yield future.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
