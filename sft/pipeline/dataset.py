"""grain pipelines: records -> packed, batched, per-process token arrays.

Train:  source -> shuffle -> repeat -> tokenize + shift -> first-fit packing -> global batch -> this
        process's rows. Deterministic for a seed; its iterator state (a position in the global
        stream, the same on every process) is checkpointed with the model.
Eval:   the same without shuffle or repeat, the last batch padded, so one pass sees every example once.

Batches are dicts of int32 arrays of shape (batch_size, seq_len): inputs, targets, loss_mask,
segment_ids (0 is padding) and positions (restarting at 0 for every packed example).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from sft.pipeline.transforms import TokenizeAndShift, tokenize_record, unpack_features
from sft.tokenizer.chat import ChatTokenizer

PACKED_FEATURES = ("inputs", "targets", "loss_mask")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def _shard(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return ds[process_index::process_count]


def _packed(it: grain.IterDataset, *, seq_len: int, batch_size: int, seed: int, shuffle: bool) -> grain.IterDataset:
  return grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct={name: seq_len for name in PACKED_FEATURES},
      num_packing_bins=batch_size,
      shuffle_bins=shuffle,
      seed=seed,
  )


def train_dataset(
    records: Sequence[dict[str, Any]],
    *,
    tokenizer: ChatTokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    rows: slice | None = None,
) -> grain.IterDataset:
  """Endless packed global batches of `batch_size` rows; with `rows`, only those rows of each batch
  (the ones this process feeds to its devices).

  Every process runs the same global stream and keeps its rows, so the iterator's state is the
  position in the global stream: a checkpoint resumes on any number of processes or devices with
  the same global batches. (Each process tokenizes every record: cheap beside a training step.)
  """
  if not records:
    raise ValueError("there are no records to train on")
  ds = grain.MapDataset.source(records)
  # shuffle-then-repeat draws a fresh permutation every epoch.
  ds = ds.shuffle(seed=seed).repeat(None).map(TokenizeAndShift(tokenizer=tokenizer, max_len=seq_len))
  it = _packed(ds.to_iter_dataset(), seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=True)
  it = it.batch(batch_size, drop_remainder=True).map(unpack_features)
  if rows is not None and rows != slice(0, batch_size):
    it = it.map(_RowSlice(rows))
  return it


class _RowSlice(grain.transforms.Map):
  def __init__(self, rows: slice):
    self.rows = rows

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[self.rows] for k, v in batch.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Adds all-padding rows (segment 0, loss mask 0) up to `batch_size` rows."""
  missing = batch_size - batch["inputs"].shape[0]
  if missing < 0:
    raise ValueError(f"batch has {batch['inputs'].shape[0]} rows, more than {batch_size}")
  return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((batch_size, seq_len), np.int32) for k in BATCH_KEYS}


def eval_batches(
    records: Sequence[dict[str, Any]],
    *,
    tokenizer: ChatTokenizer,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """One pass over this process's share of `records`, packed, every batch `batch_size` rows."""
  ds = _shard(grain.MapDataset.source(records), process_index, process_count)
  ds = ds.map(TokenizeAndShift(tokenizer=tokenizer, max_len=seq_len))
  it = _packed(ds.to_iter_dataset(), seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False)
  it = it.batch(batch_size, drop_remainder=False).map(unpack_features)
  return [pad_batch(b, batch_size) for b in it]


@dataclasses.dataclass(frozen=True)
class SplitFit:
  """How a split's records fit train.seq_len (tokens after the shift to next-token pairs)."""

  records: int
  cut: int  # longer than seq_len: their tails are cut
  empty: int  # no loss token within seq_len: they train nothing
  loss_tokens: int  # loss tokens within seq_len, all records together
  seq_len_needed: int | None  # the least seq_len at which some record keeps a loss token (None: none has any)


def split_fit(records: Sequence[dict[str, Any]], tokenizer: ChatTokenizer, seq_len: int) -> SplitFit:
  """Tokenizes every record once, as the train pipeline will (see transforms.shift_and_truncate)."""
  cut = empty = loss_tokens = 0
  needed = None
  for record in records:
    tokens, mask = tokenize_record(record, tokenizer)
    kept = int(np.sum(mask[1 : seq_len + 1]))  # target i is token i + 1; seq_len pairs keep tokens 1..seq_len
    cut += len(tokens) > seq_len + 1
    empty += kept == 0
    loss_tokens += kept
    if np.any(mask[1:]):
      first = 1 + int(np.argmax(mask[1:]))  # the first learned token needs seq_len >= its index
      needed = first if needed is None else min(needed, first)
  return SplitFit(len(records), cut, empty, loss_tokens, needed)
