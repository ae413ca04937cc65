"""Save -> restore round trip of the train state and the grain iterator."""

import jax
import numpy as np
import pytest
from test_train import make_trainer

from sft.pipeline import train_dataset
from sft.trainer import sharding
from sft.trainer.checkpoint import Checkpointer
from sft.trainer.state import abstract_with_shardings


@pytest.mark.slow  # tests/test_fast_tier.py resumes in the fast tier
def test_restore_gives_the_same_state_and_the_batches_that_came_next(tmp_path, tiny_model_config, tokenizer, chat_records):
  def batches():
    return iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=3))

  state, step, batch_sharding, (abstract, shardings, _) = make_trainer(tiny_model_config)
  it = batches()
  for _ in range(3):
    state, _ = step(state, sharding.global_batch(next(it), batch_sharding))
  checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1)
  checkpointer.save(3, state, {"sft": it}, force=True)
  saved = jax.device_get(state)
  expected = [next(it) for _ in range(4)]

  fresh = batches()  # a new run: its iterator starts at the beginning until restored
  assert not np.array_equal(next(batches())["inputs"], expected[0]["inputs"])
  restored = checkpointer.restore(3, abstract_with_shardings(abstract, shardings), {"sft": fresh})
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding == jax.tree.leaves(shardings.params)[0]

  # Serving reads the parameters alone: no optimizer state, no data iterators, the same values.
  params = Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1).restore_params(
      3, abstract_with_shardings(abstract.params, shardings.params)
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved.params)
  assert jax.tree.leaves(params)[0].sharding == leaf.sharding

  # Training goes on from the restored state exactly as from the saved one.
  state_a, metrics_a = step(restored, sharding.global_batch(expected[0], batch_sharding))
  checkpointer.close()
  assert np.isfinite(float(metrics_a["loss"])) and int(state_a.step) == 4


@pytest.mark.slow
def test_keeps_only_the_last_checkpoints(tmp_path, tiny_model_config, tokenizer, chat_records):
  state, _, _, _ = make_trainer(tiny_model_config)
  it = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=0))
  checkpointer = Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2)
  for step in range(1, 8):
    next(it)
    checkpointer.save(step, state, {"sft": it})
  checkpointer.save(7, state, {"sft": it}, force=True)
  checkpointer.close()
  assert sorted(checkpointer.manager.all_steps()) == [6, 7]
  assert checkpointer.latest_step() == 7


def test_checkpoints_of_earlier_versions_restore(tmp_path, tiny_model_config, tokenizer, chat_records):
  """Earlier checkpoints kept one grain state file per process instead of the global `data` item."""
  import grain
  import orbax.checkpoint as ocp

  state, _, _, (abstract, shardings, _) = make_trainer(tiny_model_config)
  it = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=1))
  next(it)
  manager = ocp.CheckpointManager((tmp_path / "ckpt").absolute())
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), sft=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  manager.close()
  expected = next(it)

  fresh = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=1))
  checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1)
  restored, step = checkpointer.restore_latest(abstract_with_shardings(abstract, shardings), {"sft": fresh})
  checkpointer.close()
  assert step == 1
  np.testing.assert_array_equal(next(fresh)["inputs"], expected["inputs"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
