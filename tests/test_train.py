"""Real training steps on CPU: the loss falls, a tiny batch is overfit, the schedule is as configured."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sft.model import Transformer
from sft.pipeline import train_dataset
from sft.trainer import sharding
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib


def make_trainer(cfg, *, lr=3e-3, steps=40, seq_len=64, mesh_shape=None, rules=(("batch", ("data", "fsdp")),), devices=None):
  """(state, jitted step, batch sharding) for `cfg` on a mesh (all devices on `data` by default)."""
  mesh = sharding.make_mesh(mesh_shape or {"data": -1}, devices=devices)
  rules = sharding.logical_rules(rules, mesh)
  model = Transformer(cfg)
  schedule = state_lib.phase_schedule(lr, steps, 2, 0.1)
  optimizer = state_lib.make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
  dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
  abstract, shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)
  state = state_lib.create_train_state(model, optimizer, dummy, shardings, jax.random.key(0))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = step_lib.jit_train_step(model.apply, optimizer, schedule, shardings, batch_sharding, NamedSharding(mesh, PartitionSpec()))
  return state, step, batch_sharding, (abstract, shardings, mesh)


@pytest.fixture
def real_batch(tokenizer, chat_records):
  it = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=0))
  return next(it)


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny_model_config, real_batch):
  state, step, batch_sharding, _ = make_trainer(tiny_model_config)
  batch = sharding.global_batch(real_batch, batch_sharding)
  state, before = step(state, batch)
  assert int(state.step) == 1
  _, after = step(state, batch)
  assert float(after["loss"]) < float(before["loss"])
  for key in ("loss", "accuracy", "grad_norm", "param_norm", "learning_rate", "loss_tokens", "tokens"):
    assert np.isfinite(float(before[key])), key
  assert float(before["loss_tokens"]) == real_batch["loss_mask"].sum()
  assert float(before["tokens"]) == (real_batch["segment_ids"] > 0).sum()


@pytest.mark.slow
def test_a_few_dozen_steps_overfit_a_tiny_batch(tiny_model_config, real_batch):
  state, step, batch_sharding, _ = make_trainer(tiny_model_config, lr=1e-2, steps=60)
  batch = sharding.global_batch(real_batch, batch_sharding)
  state, first = step(state, batch)
  for _ in range(59):
    state, metrics = step(state, batch)
  assert float(metrics["loss"]) < 0.25 * float(first["loss"])
  assert float(metrics["accuracy"]) > 0.8


def test_schedule_restarts_warmup_for_each_phase():
  schedule = state_lib.joined_schedule([
      (10, state_lib.phase_schedule(1.0, 10, 2, 0.1)),
      (20, state_lib.phase_schedule(0.5, 20, 4, 0.1)),
  ])
  lrs = [float(schedule(i)) for i in range(30)]
  assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # the first update already moves
  assert lrs[9] == pytest.approx(0.1)  # decayed to final_lr_fraction at the phase's last update
  assert lrs[10] == pytest.approx(0.125) and lrs[13] == pytest.approx(0.5)  # phase two warms up again
  assert lrs[29] == pytest.approx(0.05)


def test_no_steps_is_a_clear_error():
  with pytest.raises(ValueError, match="no training steps"):
    state_lib.joined_schedule([(0, state_lib.phase_schedule(1.0, 0, 0, 0.1))])


@pytest.mark.slow
def test_norm_scales_are_not_decayed(tiny_model_config):
  params = Transformer(tiny_model_config).init(jax.random.key(0), *(jnp.zeros((1, 4), jnp.int32),) * 3)["params"]
  mask = state_lib._decay_mask(nn.unbox(params))
  assert mask["layers"]["attn_norm"]["scale"] is False and mask["final_norm"]["scale"] is False
  assert mask["layers"]["mlp"]["gate"] is True and mask["embedding"] is True


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh({"dat": 1})
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh({"data": 2, "fsdp": 2})
  mesh = sharding.make_mesh({"data": -1})
  with pytest.raises(ValueError, match="no such mesh axis"):
    sharding.logical_rules([("batch", "dta")], mesh)
  with pytest.raises(ValueError, match="unknown logical axis"):
    sharding.logical_rules([("btch", "data")], mesh)
  with pytest.raises(ValueError, match="appears twice"):
    sharding.logical_rules([("batch", "data"), ("batch", None)], mesh)


def test_grain_batches_are_steady_shapes(tokenizer, chat_records):
  it = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=0))
  shapes = {tuple(b["inputs"].shape) for b in itertools.islice(it, 10)}
  assert shapes == {(4, 64)}  # one compiled step for the whole run


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32_training(tiny_model_config, tokenizer, chat_records):
  """Mixed precision as the finetune configs run it: float32 master weights and optimizer state,
  bfloat16 activations and matmuls, a float32 loss. Eight steps on the same batches stay within 0.01
  nats of the float32 run (bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding)."""
  import dataclasses

  batches = list(itertools.islice(iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=64, batch_size=4, seed=0)), 8))
  losses = {}
  for dtype in ("float32", "bfloat16"):
    cfg = dataclasses.replace(tiny_model_config, dtype=dtype, param_dtype="float32")
    state, step, batch_sharding, _ = make_trainer(cfg, steps=8, devices=jax.devices()[:1])
    losses[dtype] = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
      losses[dtype].append(float(metrics["loss"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))  # master weights stay float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if hasattr(leaf, "dtype") and leaf.ndim)
  assert losses["float32"][-1] < losses["float32"][0] and losses["bfloat16"][-1] < losses["bfloat16"][0]
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.01)
  assert losses["bfloat16"] != losses["float32"]  # the bfloat16 path really ran in bfloat16
