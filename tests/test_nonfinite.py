"""Training that never saves a non-finite state, never trains on nothing, and fails in one line.

A loss that is not finite stops the run naming the step (train.on_nonfinite="stop") or drops the step's
update on the device and counts it ("skip"); a run whose records keep no response token within seq_len
is refused before any step; a full disk or a read-only workdir is a CannotWrite naming the path.
"""

import errno
import json
import logging
import os
import pathlib
import types

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from resume_worker import config as run_config

from sft import pipeline
from sft.errors import CannotWrite, ConfigError, TrainingDiverged, cannot_write
from sft.model import ModelConfig, Transformer
from sft.trainer import finite, lock, loop, sharding
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib
from sft.trainer.checkpoint import Checkpointer

OUT_OF_VOCAB = 10**6  # an input id past the embedding table: jnp.take fills its row with NaN


def tiny_run(data_dir, **overrides):
  """The resume tests' tiny model; a checkpoint every step, no generations: a run takes seconds."""
  small = {
      "train.sft_steps": 4, "train.warmup_steps": 0, "train.log_every": 4, "eval.every_steps": 100,
      "eval.num_generations": 0, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 10,
  }
  return run_config(str(data_dir), {**small, **overrides})


def saved_states(workdir) -> dict[int, dict]:
  folder = pathlib.Path(workdir, "checkpoints").absolute()
  steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  return {s: ocp.PyTreeCheckpointer().restore(folder / str(s) / "state") for s in steps}


def all_finite(tree) -> bool:
  arrays = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
  return all(np.all(np.isfinite(a)) for a in arrays if a.dtype.kind == "f")


def assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def poison_batches(monkeypatch, indices):
  """Train batches number `indices` (0-based) get an out-of-vocabulary input id: a NaN loss, gradients too."""
  real = pipeline.train_dataset

  def poisoned(i, batch):
    if i in indices:
      batch = {**batch, "inputs": batch["inputs"].copy()}
      batch["inputs"][0, 0] = OUT_OF_VOCAB
    return batch

  monkeypatch.setattr(pipeline, "train_dataset", lambda *a, **k: real(*a, **k).map_with_index(poisoned))


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_saves_no_nan(tmp_path, data_dir):
  workdir = tmp_path / "run"
  with pytest.raises(TrainingDiverged) as raised:
    loop.train_and_evaluate(tiny_run(data_dir, **{"train.lr": 1e30}), workdir)
  message = str(raised.value)
  assert isinstance(raised.value, ConfigError) and "\n" not in message  # the CLI's one FATAL line
  assert "not finite at step 2" in message and "step 1 in" in message  # step 1's update made the params ~1e30
  assert "train.lr" in message and 'train.on_nonfinite="skip"' in message
  states = saved_states(workdir)
  assert list(states) == [1]  # a checkpoint every step, none after the first bad one
  assert all(all_finite(s) for s in states.values())


@pytest.mark.slow
def test_skip_drops_the_bad_steps_counts_them_and_finishes(tmp_path, data_dir, monkeypatch, caplog):
  poison_batches(monkeypatch, {1, 2})  # steps 2 and 3
  workdir = tmp_path / "run"
  skip = {"train.on_nonfinite": "skip", "train.max_consecutive_skips": 3}
  config = tiny_run(data_dir, **{"train.sft_steps": 5, "train.log_every": 5, **skip})
  with caplog.at_level(logging.INFO, logger="sft"):
    summary = loop.train_and_evaluate(config, workdir)
  assert summary["skipped_steps"] == 2
  rows = [r for r in metrics_rows(workdir) if "train/loss" in r]
  assert [(r["step"], r["train/skipped_steps"]) for r in rows] == [(5, 2)]
  assert any("skipped 2 |" in r.getMessage() for r in caplog.records)
  states = saved_states(workdir)
  assert list(states) == [1, 2, 3, 4, 5] and all(all_finite(s) for s in states.values())
  assert_bitwise_equal(states[2], states[1])  # a skipped step leaves the whole state as it was
  assert_bitwise_equal(states[3], states[1])
  assert not np.array_equal(states[4]["params"]["embedding"], states[3]["params"]["embedding"])  # then it trains on
  assert int(states[5]["step"]) == 3  # the updates applied


def metrics_rows(workdir):
  return [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]


def test_no_response_token_within_seq_len_is_an_error_before_any_step(tmp_path, data_dir):
  workdir = tmp_path / "run"
  expected = r"none of the \d+ train records has a response token within train.seq_len=8"
  with pytest.raises(ConfigError, match=expected) as raised:
    loop.train_and_evaluate(tiny_run(data_dir, **{"train.seq_len": 8}), workdir)
  assert "raise train.seq_len to at least" in str(raised.value)
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def check_data(config, records, tokenizer):
  data_summary = {"records": {"train": len(records)}, "build": {}}
  model_cfg = types.SimpleNamespace(vocab_size=512)
  loop._check_data(config, data_summary, {"train": records, "pretrain": []}, tokenizer, model_cfg)


@hypothesis.settings(max_examples=15, deadline=None)  # each example tokenizes 20 records
@hypothesis.given(seq_len=st.integers(1, 160), start=st.integers(0, 60))
def test_split_fit_counts_what_the_pipeline_keeps(tokenizer, chat_records, seq_len, start):
  records = chat_records[start : start + 20]
  fit = pipeline.split_fit(records, tokenizer, seq_len)
  pairs = [pipeline.shift_and_truncate(*pipeline.tokenize_record(r, tokenizer), seq_len) for r in records]
  kept = [p["loss_mask"].sum() for p in pairs]
  assert fit.loss_tokens == sum(kept) and fit.empty == sum(k == 0 for k in kept)
  assert pipeline.split_fit(records, tokenizer, fit.seq_len_needed).loss_tokens > 0
  if fit.seq_len_needed > 1:
    assert pipeline.split_fit(records, tokenizer, fit.seq_len_needed - 1).loss_tokens == 0


def test_records_that_keep_no_response_token_are_a_counted_warning(tokenizer, chat_records, caplog):
  config = tiny_run("unused")
  fit = pipeline.split_fit(chat_records, tokenizer, config.train.seq_len)
  assert 0 < fit.empty < fit.records  # some records' prompts fill seq_len=64
  with caplog.at_level(logging.INFO, logger="sft"):
    check_data(config, chat_records, tokenizer)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert f"{fit.empty} of {fit.records} train records have no response token within train.seq_len=64" in warnings[0]


def test_warmup_longer_than_a_phase_is_a_warning_naming_both_keys(tokenizer, chat_records, caplog):
  config = tiny_run("unused", **{"train.seq_len": 512, "train.sft_steps": 30, "train.warmup_steps": 50})
  with caplog.at_level(logging.WARNING, logger="sft"):
    check_data(config, chat_records, tokenizer)
    assert [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()] == [
        "train.warmup_steps=50 exceeds train.sft_steps=30: the learning rate rises for the whole phase and never "
        "decays; lower train.warmup_steps"
    ]
    caplog.clear()
    config.train.warmup_steps = 30
    check_data(config, chat_records, tokenizer)
  assert not [r for r in caplog.records if "warmup" in r.getMessage()]


class _Saved:
  directory = pathlib.Path("/w/checkpoints")

  def latest_step(self):
    return 7


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    bad=st.lists(st.booleans(), min_size=1, max_size=30), skip=st.booleans(), max_in_a_row=st.integers(1, 4),
    reads=st.lists(st.integers(1, 30), max_size=5),
)
def test_the_guard_stops_at_the_first_bad_step_or_after_enough_skips_in_a_row(bad, skip, max_in_a_row, reads):
  """Whenever the flags are read, the run stops at the same step: the first bad one ("stop"), the one that
  makes max_consecutive_skips in a row ("skip"); otherwise every bad step is counted as skipped."""
  mode = {"train.on_nonfinite": "skip" if skip else "stop", "train.max_consecutive_skips": max_in_a_row}
  config = tiny_run("unused", **mode)
  guard = finite.FiniteGuard(config, _Saved())
  run, expected_stop = 0, None
  for step, b in enumerate(bad, 1):
    run = run + 1 if b else 0
    if expected_stop is None and b and (not skip or run >= max_in_a_row):
      expected_stop = step
  stopped = None
  try:
    for step, b in enumerate(bad, 1):
      guard.add(step, {"nonfinite": np.float32(b), "nonfinite_params": np.float32(0)})
      if step in reads:
        guard.check()
    guard.check()
  except TrainingDiverged as err:
    stopped = str(err)
  if expected_stop is None:
    assert stopped is None and guard.skipped == sum(bad)
  else:
    assert stopped is not None and "step 7 in /w/checkpoints" in stopped
    assert (f"-{expected_stop}, all skipped" if skip else f"at step {expected_stop};") in stopped


def test_parameters_that_overflow_stop_the_run_in_either_mode():
  for mode in ("stop", "skip"):
    guard = finite.FiniteGuard(tiny_run("unused", **{"train.on_nonfinite": mode}), _Saved())
    guard.add(1, {"nonfinite": np.float32(0), "nonfinite_params": np.float32(0)})
    guard.add(2, {"nonfinite": np.float32(0), "nonfinite_params": np.float32(1)})
    with pytest.raises(TrainingDiverged, match="the parameters are not finite after the update of step 2"):
      guard.check()


def tiny_step(*, pmap=False, grad_accum_steps=1, seq_len=32):
  cfg = ModelConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  rules = sharding.logical_rules((("batch", ("data", "fsdp")),), mesh)
  model = Transformer(cfg)
  schedule = state_lib.phase_schedule(3e-3, 10, 2, 0.1)
  optimizer = state_lib.make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
  dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
  _, shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)
  state = state_lib.create_train_state(model, optimizer, dummy, shardings, jax.random.key(0))
  kwargs = dict(grad_accum_steps=grad_accum_steps, skip_nonfinite=True)
  if pmap:
    step = step_lib.pmap_train_step(model.apply, optimizer, schedule, **kwargs)
    return sharding.replicate_for_pmap(state), step, lambda b: sharding.per_device_batch(b, 1)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = step_lib.jit_train_step(model.apply, optimizer, schedule, shardings, batch_sharding, replicated, **kwargs)
  return state, step, lambda b: sharding.global_batch(b, batch_sharding)


@pytest.mark.slow
def test_a_skipped_step_leaves_the_state_bitwise_as_it_was(tokenizer, chat_records):
  """Under pmap with 2 micro-batches (the jit step with one is the skip run's above): the update of a
  step whose loss is NaN is dropped on the device, the step counter too."""
  state, step, place = tiny_step(pmap=True, grad_accum_steps=2)
  batch = next(iter(pipeline.train_dataset(chat_records, tokenizer=tokenizer, seq_len=32, batch_size=4, seed=0)))
  bad = {**batch, "inputs": batch["inputs"].copy()}
  bad["inputs"][3, 5] = OUT_OF_VOCAB  # one token of one row of the second micro-batch
  before = jax.device_get(state)
  state, metrics = step(state, place(bad))
  assert float(np.ravel(metrics["nonfinite"])[0]) == 1.0 and not np.isfinite(np.ravel(metrics["loss"])[0])
  assert_bitwise_equal(jax.device_get(state), before)
  state, metrics = step(state, place(batch))
  assert float(np.ravel(metrics["nonfinite"])[0]) == 0.0 and float(np.ravel(metrics["nonfinite_params"])[0]) == 0.0
  assert int(np.ravel(jax.device_get(state).step)[0]) == 1  # the good step is the first update


def small_checkpointer(tmp_path):
  import grain

  checkpointer = Checkpointer(tmp_path / "checkpoints", max_to_keep=1, save_interval_steps=1)
  iterators = {"sft": iter(grain.MapDataset.range(10).to_iter_dataset())}
  return checkpointer, iterators, {"w": jnp.arange(4.0)}


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    # what tensorstore (orbax's array writer) raises for the same
    ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/": Failed writing: '
               '"/x/d/1a2b": Failed to write 189678 bytes to file 11: No space left on device [os_error_code=\'28\']'),
])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_saved_checkpoints(tmp_path, monkeypatch, failure):
  checkpointer, iterators, state = small_checkpointer(tmp_path)
  checkpointer.save(1, state, iterators)
  checkpointer.manager.wait_until_finished()

  def full(*args, **kwargs):
    raise failure

  monkeypatch.setattr(checkpointer.manager, "save", full)
  with pytest.raises(CannotWrite) as raised:
    checkpointer.save(2, state, iterators)
  message = str(raised.value)
  assert "\n" not in message and "No space left on device (ENOSPC)" in message and "free some space" in message
  assert "checkpoint of step 2" in message and "intact (latest: step 1)" in message
  assert ("/x/d/1a2b" if isinstance(failure, ValueError) else str(checkpointer.directory)) in message
  checkpointer.close()
  restored, step = Checkpointer(tmp_path / "checkpoints", max_to_keep=1, save_interval_steps=1).restore_latest(
      jax.eval_shape(lambda: state), iterators
  )
  assert step == 1 and np.array_equal(restored["w"], state["w"])


def test_a_read_only_workdir_is_one_line_naming_the_path(tmp_path, data_dir, monkeypatch):
  """As root a chmod'ed folder stays writable, so the filesystem's answer is injected where the run
  first writes: the workdir's lock."""
  workdir = tmp_path / "run"

  def read_only(path, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(pathlib.Path(path) / "run.lock"))

  monkeypatch.setattr(lock, "workdir_lock", read_only)
  with pytest.raises(CannotWrite) as raised:
    loop.train_and_evaluate(tiny_run(data_dir), workdir)
  assert str(raised.value) == (
      f"cannot write the run's files: {workdir}/run.lock: Read-only file system (EROFS); make it writable "
      "(or choose another --workdir), then run the same command again"
  )


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_disk_errors_are_found_behind_other_exceptions(code):
  try:
    try:
      raise OSError(code, "os says no", "/w/f")
    except OSError as inner:
      raise RuntimeError("a library's wrapper") from inner
  except RuntimeError as outer:
    failed = cannot_write(outer, "x")
  assert isinstance(failed, CannotWrite)
  assert f"/w/f: {os.strerror(code)} ({errno.errorcode[code]})" in str(failed)
  assert cannot_write(OSError(errno.ENOENT, "missing"), "x") is None
  assert cannot_write(ValueError("bad value"), "x") is None


def test_the_summary_line_takes_missing_and_non_finite_values(tmp_path, caplog):
  from sft.trainer.metrics_log import MetricsLog

  metrics_log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=0, enabled=False)
  metrics_log.history = [{"step": 0, "eval/loss": "nan"}, {"step": 4, "eval/loss": 1.5}]
  with caplog.at_level(logging.INFO, logger="sft"):
    summary = loop._summary(metrics_log, 4, 1.0, skipped_steps=2)
  assert summary["skipped_steps"] == 2
  line = caplog.records[-1].getMessage()
  assert "held-out response loss nan -> 1.500, exact match n/a -> n/a; 2 non-finite steps skipped" in line
