"""Properties of the grain pipeline: packing, masks, determinism, per-process shards, eval coverage."""

import itertools

import numpy as np
import pytest

from sft.pipeline import eval_batches, pad_batch, split_fit, tokenize_record, train_dataset

SEQ_LEN, ROWS = 64, 4


def _segments(batch, row):
  """(segment id, slice) of every packed example in one row."""
  seg = batch["segment_ids"][row]
  for sid in sorted(set(seg.tolist()) - {0}):
    idx = np.flatnonzero(seg == sid)
    assert np.all(np.diff(idx) == 1), "a packed example must be contiguous"
    yield sid, slice(idx[0], idx[-1] + 1)


def test_packed_rows_hold_whole_examples_with_restarting_positions(tokenizer, chat_records):
  it = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=ROWS, seed=0))
  by_first_tokens = {}
  for record in chat_records:
    tokens, mask = tokenize_record(record, tokenizer)
    by_first_tokens.setdefault(tuple(tokens[:SEQ_LEN + 1]), mask[:SEQ_LEN + 1])
  packed_examples = 0
  for batch in itertools.islice(it, 3):
    assert {k: v.shape for k, v in batch.items()} == {k: (ROWS, SEQ_LEN) for k in batch}
    assert all(v.dtype == np.int32 for v in batch.values())
    pad = batch["segment_ids"] == 0
    assert not batch["loss_mask"][pad].any(), "padding is never in the loss"
    for row in range(ROWS):
      for _, span in _segments(batch, row):
        packed_examples += 1
        np.testing.assert_array_equal(batch["positions"][row, span], np.arange(span.stop - span.start))
        # inputs/targets of the segment are one tokenized record shifted by one, with its mask.
        tokens = tuple(batch["inputs"][row, span]) + (batch["targets"][row, span][-1],)
        assert tokens in by_first_tokens
        np.testing.assert_array_equal(batch["targets"][row, span][:-1], batch["inputs"][row, span][1:])
        np.testing.assert_array_equal(batch["loss_mask"][row, span], by_first_tokens[tokens][1:])
  assert packed_examples > 3 * ROWS, "short chats should be packed several to a row"


def test_same_seed_same_batches_other_seed_other_batches(tokenizer, chat_records):
  def first(seed, n=3):
    it = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=ROWS, seed=seed))
    return [b["inputs"] for b in itertools.islice(it, n)]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_process_shards_are_disjoint_and_cover_the_data(tokenizer, chat_records):
  records = [dict(r, id=f"r{i}") for i, r in enumerate(chat_records[:40])]
  seen = []
  for index in range(2):
    batches = eval_batches(records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=ROWS, process_index=index, process_count=2)
    n = sum(len(list(_segments(b, r))) for b in batches for r in range(ROWS))
    seen.append(n)
  assert seen == [20, 20]
  with pytest.raises(ValueError, match="process_index"):
    eval_batches(records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=ROWS, process_index=2, process_count=2)


def test_eval_batches_see_every_record_once(tokenizer, chat_records):
  batches = eval_batches(chat_records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=ROWS)
  expected_tokens = 0
  for record in chat_records:
    _, mask = tokenize_record(record, tokenizer)
    expected_tokens += int(mask[1 : SEQ_LEN + 1].sum())
  assert sum(int(b["loss_mask"].sum()) for b in batches) == expected_tokens
  segments = sum(len(list(_segments(b, r))) for b in batches for r in range(ROWS))
  assert segments == len(chat_records)
  assert all(b["inputs"].shape == (ROWS, SEQ_LEN) for b in batches)


def test_pad_batch_adds_empty_rows():
  batch = {"inputs": np.ones((1, 3), np.int32), "segment_ids": np.ones((1, 3), np.int32)}
  padded = pad_batch(batch, 3)
  np.testing.assert_array_equal(padded["segment_ids"], [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
  with pytest.raises(ValueError):
    pad_batch(padded, 2)


def test_split_fit_counts_cut_records(tokenizer):
  short = {"text": "a b"}
  long = {"text": " ".join(["word"] * 200)}
  fit = split_fit([short, long, long], tokenizer, seq_len=32)
  assert (fit.records, fit.cut, fit.empty) == (3, 2, 0)


@pytest.mark.parametrize("processes", [2, 4])
def test_every_process_feeds_its_rows_of_one_global_stream(tokenizer, chat_records, processes):
  """Process i's rows of each batch are rows i*b..(i+1)*b of the global batch, and the iterator state
  is a position in the global stream: saved by 4 processes, it resumes 2 (or 1) on the same batches."""
  rows = 8

  def stream(rows_slice=None):
    return iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=rows, seed=5, rows=rows_slice))

  whole = stream()
  globals_ = [next(whole) for _ in range(4)]
  per = rows // processes
  parts = [stream(slice(i * per, (i + 1) * per)) for i in range(processes)]
  for batch in globals_[:2]:
    got = [next(p) for p in parts]
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), batch[key])
  states = [p.get_state() for p in parts]
  assert all(s == states[0] for s in states), "the data position is the same on every process"
  for other in (1, 2):
    each = rows // other
    resumed = [stream(slice(i * each, (i + 1) * each)) for i in range(other)]
    for r in resumed:
      r.set_state(states[0])
    for batch in globals_[2:]:
      got = [next(r) for r in resumed]
      np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), batch["inputs"])
