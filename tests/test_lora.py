"""LoRA: zero-initialised adapters leave the model unchanged, only adapters train, merging is exact."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sft.errors import ConfigError
from sft.model import ModelConfig, Transformer, lora
from sft.trainer import sharding
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
RNG = np.random.default_rng(0)
TOKENS = jnp.asarray(RNG.integers(0, 64, (2, 12)), jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(12), (2, 12))
SEGMENTS = jnp.ones((2, 12), jnp.int32)


def logits(cfg, params):
  return Transformer(cfg).apply({"params": params}, TOKENS, POSITIONS, SEGMENTS)


def init(cfg):
  return nn.unbox(Transformer(cfg).init(jax.random.key(0), TOKENS, POSITIONS, SEGMENTS)["params"])


@pytest.mark.slow
def test_zero_initialised_adapters_leave_the_model_unchanged():
  params = init(LORA)
  assert params["layers"]["attn"]["q_lora_a"].shape == (2, 32, 4)
  assert params["layers"]["attn"]["q_lora_b"].shape == (2, 4, 4, 8)
  assert params["layers"]["attn"]["o_lora_a"].shape == (2, 4, 8, 4)
  assert params["layers"]["mlp"]["down_lora_b"].shape == (2, 4, 32)
  np.testing.assert_array_equal(logits(LORA, params), logits(BASE, lora.base_params(params)))


@pytest.mark.slow
def test_only_adapters_train_and_merging_is_exact():
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.logical_rules([("batch", "data")], mesh)
  model = Transformer(LORA, train=True)
  schedule = state_lib.phase_schedule(1e-2, 20, 1, 1.0)
  trainable = lambda p: lora.trainable_mask(p, LORA)
  optimizer = state_lib.make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, trainable=trainable)
  dummy = (jnp.zeros((1, 12), jnp.int32),) * 3
  _, shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)
  state = state_lib.create_train_state(model, optimizer, dummy, shardings, jax.random.key(0))
  before = jax.device_get(state.params)

  # Optimizer moments exist for the adapters only.
  adapters = sum(x.size for x, t in zip(jax.tree.leaves(before), jax.tree.leaves(trainable(before))) if t)
  moment_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moment_sizes == 2 * adapters

  step = step_lib.jit_train_step(
      model.apply, optimizer, schedule, shardings, sharding.batch_sharding(mesh, rules),
      NamedSharding(mesh, PartitionSpec()), trainable=trainable,
  )
  batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, 1), "loss_mask": SEGMENTS, "segment_ids": SEGMENTS, "positions": POSITIONS}
  state, first = step(state, batch)
  for _ in range(15):
    state, metrics = step(state, batch)
  assert float(metrics["loss"]) < float(first["loss"])
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, lora.base_params(after), lora.base_params(before))  # frozen
  assert not np.array_equal(after["layers"]["attn"]["q_lora_b"], before["layers"]["attn"]["q_lora_b"])

  merged, merged_cfg = lora.merge(after, LORA)
  assert merged_cfg.lora_rank == 0 and "q_lora_a" not in merged["layers"]["attn"]
  np.testing.assert_allclose(logits(merged_cfg, merged), logits(LORA, after), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dropout_acts_in_training_only():
  cfg = dataclasses.replace(LORA, lora_dropout=0.5)
  params = jax.tree.map(lambda x: x + 0.1, init(cfg))  # nonzero B so the adapters matter

  def train(seed):
    return Transformer(cfg, train=True).apply({"params": params}, TOKENS, POSITIONS, SEGMENTS, rngs={"dropout": jax.random.key(seed)})

  trained, evaluated = train(1), logits(cfg, params)
  assert not np.allclose(trained, evaluated)  # training drops adapter inputs
  assert not np.allclose(trained, train(2))  # a fresh mask per rng
  # Evaluation is the model without dropout: no mask and no rescaling.
  np.testing.assert_array_equal(evaluated, logits(dataclasses.replace(cfg, lora_dropout=0.0), params))


@pytest.mark.slow
def test_gpt2_adapters_sit_beside_its_projections_and_merge_exactly():
  gpt2 = dataclasses.replace(
      BASE, num_kv_heads=4, norm_type="layer", position_embedding="learned", max_positions=16,
      mlp_activation="gelu_tanh", mlp_gated=False, linear_bias=True,
  )
  cfg = dataclasses.replace(gpt2, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "k", "v", "o", "up", "down"))
  params = init(cfg)
  assert params["layers"]["mlp"]["up_lora_b"].shape == (2, 4, 48) and "gate" not in params["layers"]["mlp"]
  np.testing.assert_array_equal(logits(cfg, params), logits(gpt2, lora.base_params(params)))
  params = jax.tree.map(lambda x: x + 0.05, params)  # nonzero B so the adapters matter
  merged, merged_cfg = lora.merge(params, cfg)
  assert merged_cfg.lora_rank == 0 and merged["layers"]["mlp"].keys() == {"up", "up_bias", "down", "down_bias"}
  np.testing.assert_allclose(logits(merged_cfg, merged), logits(cfg, params), atol=1e-5, rtol=1e-5)
  with pytest.raises(ConfigError, match="no gate projection"):
    dataclasses.replace(cfg, lora_targets=("q", "gate"))


def test_bad_lora_settings_are_clear_errors():
  with pytest.raises(ConfigError, match="lora_targets"):
    dataclasses.replace(BASE, lora_rank=4, lora_targets=("qq",))
  with pytest.raises(ConfigError, match="lora_rank"):
    dataclasses.replace(BASE, lora_rank=-1)


def _jitted_init(cfg):
  return jax.jit(lambda rng: nn.unbox(Transformer(cfg).init(rng, TOKENS, POSITIONS, SEGMENTS)["params"]))(jax.random.key(0))


@pytest.mark.slow
def test_adapter_init_compiles_to_the_adapters_alone():
  # A base much bigger than its adapters: the compiled init must not allocate anything base-sized.
  cfg = dataclasses.replace(BASE, vocab_size=512, d_model=128, head_dim=32, mlp_dim=256, lora_rank=2, lora_targets=("q", "v"))
  init_fn = lora.adapter_init(Transformer(cfg), (TOKENS, POSITIONS, SEGMENTS))
  compiled = jax.jit(init_fn).lower(jax.random.key(0)).compile()
  out = jax.eval_shape(init_fn, jax.random.key(0))
  assert all("_lora_" in str(path[-1]) for path, _ in jax.tree_util.tree_flatten_with_path(out)[0])
  adapter_bytes = sum(x.size * 4 for x in jax.tree.leaves(out))
  whole = _jitted_init(cfg)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(lora.base_params(whole)))
  memory = compiled.memory_analysis()
  assert memory.output_size_in_bytes < adapter_bytes + 1024
  assert memory.temp_size_in_bytes < base_bytes / 20, (memory.temp_size_in_bytes, base_bytes)
  assert "f32[512,128]" not in compiled.as_text()  # no embedding table is ever made
  # The adapters are those a whole init makes: A as before, B zero.
  jax.tree.map(np.testing.assert_array_equal, compiled(jax.random.key(0)), lora.adapters(whole))


@pytest.mark.slow
def test_lora_on_a_hugging_face_checkpoint_keeps_the_loaded_base_and_its_logits(tmp_path, monkeypatch):
  from sft import hf
  from sft.config import base_config
  from sft.trainer import setup

  rng = np.random.default_rng(0)
  base = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), hf.weights.abstract_params(BASE))
  hf.export_model(base, BASE, tmp_path / "ckpt", "llama")
  config = base_config()
  config.model.checkpoint = str(tmp_path / "ckpt")
  config.model.lora_rank, config.model.lora_targets = 4, ("q", "k", "v", "o", "gate", "up", "down")
  config.train.seq_len = 12
  run = setup.setup_run(config)
  assert run.model_cfg.lora_rank == 4
  loaded = []
  load_params = hf.load_params
  monkeypatch.setattr(hf, "load_params", lambda *a, **k: loaded.append(load_params(*a, **k)) or loaded[-1])
  params = setup.checkpoint_params(config, run, run.param_shardings, jax.random.key(0))
  assert len(loaded) == 1
  # The base leaves are the very arrays loaded (no copy), the adapters are fresh: B zero.
  for got, want in zip(jax.tree.leaves(lora.base_params(params)), jax.tree.leaves(loaded[0])):
    assert got is want
  assert jax.tree.structure(params) == jax.tree.structure(run.abstract_params)
  adapters = lora.adapters(params)
  assert all(not np.any(np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(adapters)[0] if "_lora_b" in str(k[-1]))
  assert np.any(np.asarray(adapters["layers"]["attn"]["q_lora_a"]))
  for got, placement in zip(jax.tree.leaves(params), jax.tree.leaves(run.param_shardings)):
    assert got.sharding == placement
  apply = lambda cfg: jax.jit(Transformer(cfg).apply)  # noqa: E731
  np.testing.assert_array_equal(
      apply(run.model_cfg)({"params": params}, TOKENS, POSITIONS, SEGMENTS), apply(BASE)({"params": base}, TOKENS, POSITIONS, SEGMENTS)
  )
