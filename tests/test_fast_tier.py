"""A resume in seconds, for the fast tier: train, checkpoint, restore into a new state and iterator, go on;
every array and every metric equals the run that was never stopped. (tests/test_resume.py shows the same
of real training processes that are killed, stopped or resized; it is in the slow tier.)"""

import jax
import numpy as np
from test_train import make_trainer

from sft.pipeline import train_dataset
from sft.trainer import sharding
from sft.trainer.checkpoint import Checkpointer
from sft.trainer.state import abstract_with_shardings


def test_a_restored_run_continues_exactly_as_the_uninterrupted_one(tmp_path, tiny_model_config, tokenizer, chat_records):
  def batches():
    return iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=5))

  state, step, batch_sharding, (abstract, shardings, _) = make_trainer(tiny_model_config)

  def train(state, it, steps):
    losses = []
    for _ in range(steps):
      state, metrics = step(state, sharding.global_batch(next(it), batch_sharding))
      losses.append(float(metrics["loss"]))
    return state, losses

  it = batches()
  state, _ = train(state, it, 2)
  checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=1, save_interval_steps=1)
  checkpointer.save(2, state, {"sft": it}, force=True)
  checkpointer.manager.wait_until_finished()  # the step below donates the state's buffers
  through, losses_through = train(state, it, 3)

  fresh = batches()  # a new process's view: a new iterator, the state from disk
  restored, at = checkpointer.restore_latest(abstract_with_shardings(abstract, shardings), {"sft": fresh})
  checkpointer.close()
  resumed, losses_resumed = train(restored, fresh, 3)

  assert at == 2 and int(resumed.step) == int(through.step) == 5
  assert losses_resumed == losses_through
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(through))
