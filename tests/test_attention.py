"""Attention implementations and remat policies: the Splash kernel (run by Pallas' interpreter on CPU)
equals the XLA path with packed segments, grouped kv heads, sliding windows and soft-capping, in the
forward pass and the gradients; remat policies change what is saved, not the result."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft.errors import ConfigError
from sft.model import ModelConfig, Transformer
from sft.trainer.loss import loss_fn

SEQ_LEN = 128  # Splash's smallest block
BASE = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)


def packed_batch(rows=2, seed=0):
  """Rows of three packed examples of uneven length, then padding."""
  rng = np.random.default_rng(seed)
  lengths = [(50, 41, 20), (7, 90, 11)][:rows]
  segment_ids = np.zeros((rows, SEQ_LEN), np.int32)
  positions = np.zeros((rows, SEQ_LEN), np.int32)
  for r, parts in enumerate(lengths):
    start = 0
    for s, n in enumerate(parts, 1):
      segment_ids[r, start : start + n], positions[r, start : start + n] = s, np.arange(n)
      start += n
  return {
      "inputs": rng.integers(0, BASE.vocab_size, (rows, SEQ_LEN)).astype(np.int32),
      "targets": rng.integers(0, BASE.vocab_size, (rows, SEQ_LEN)).astype(np.int32),
      "loss_mask": (segment_ids > 0).astype(np.int32),
      "segment_ids": segment_ids,
      "positions": positions,
  }


def loss_and_grads(cfg, batch, params=None):
  model = Transformer(cfg)
  if params is None:
    params = nn.unbox(model.init(jax.random.key(0), *(jnp.zeros((1, SEQ_LEN), jnp.int32),) * 3)["params"])
  (loss, _), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, model.apply), has_aux=True))(params)
  return params, loss, grads


@pytest.mark.slow
def test_splash_equals_xla():
  """Layer 0 is windowed and layer 1 causal (`lax.cond` picks one of two kernels), with soft-capping and
  a query scale other than head_dim (the interpreter is slow: one model covers every option)."""
  batch = packed_batch()
  changes = {"sliding_window": 16, "sliding_window_pattern": 2, "attn_logit_softcap": 20.0, "query_pre_attn_scalar": 32.0}
  xla = dataclasses.replace(BASE, **changes)
  params, loss, grads = loss_and_grads(xla, batch)
  _, splash_loss, splash_grads = loss_and_grads(dataclasses.replace(xla, attention="splash"), batch, params)
  np.testing.assert_allclose(splash_loss, loss, rtol=1e-5)
  for g, ref in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_splash_sees_only_its_segment():
  """Changing one packed example's tokens leaves every other example's logits as they were."""
  cfg = dataclasses.replace(BASE, attention="splash")
  batch = packed_batch(rows=1)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), *(jnp.zeros((1, SEQ_LEN), jnp.int32),) * 3)["params"])
  logits = lambda inputs: model.apply({"params": params}, inputs, batch["positions"], batch["segment_ids"])  # noqa: E731
  changed = batch["inputs"].copy()
  changed[0, 60:80] = (changed[0, 60:80] + 1) % cfg.vocab_size  # inside segment 2 (tokens 50..90)
  before, after = logits(batch["inputs"]), logits(changed)
  seg = batch["segment_ids"][0]
  np.testing.assert_array_equal(after[0, seg != 2], before[0, seg != 2])
  assert not np.allclose(after[0, 60:90], before[0, 60:90])


def test_cudnn_off_gpu_and_unknown_names_are_clear_errors():
  batch = packed_batch(rows=1)
  with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
    loss_and_grads(dataclasses.replace(BASE, attention="cudnn"), batch)
  with pytest.raises(ConfigError, match="model.attention must be one of"):
    dataclasses.replace(BASE, attention="flash")
  with pytest.raises(ConfigError, match="model.remat_policy must be one of"):
    dataclasses.replace(BASE, remat_policy="dots")
  with pytest.raises(ConfigError, match="soft-capping"):
    dataclasses.replace(BASE, attention="cudnn", attn_logit_softcap=50.0)


def test_splash_needs_a_sequence_of_whole_blocks():
  from sft.config import base_config
  from sft.config_check import config_problems

  config = base_config()
  config.model.attention, config.train.seq_len = "splash", 200
  assert config_problems(config) == [
      "model.attention 'splash' runs in blocks of 128 tokens: train.seq_len must be a multiple of 128, got 200"
  ]
  batch = {k: v[:, :100] for k, v in packed_batch(rows=1).items()}
  with pytest.raises(ConfigError, match="multiple of 128"):
    Transformer(dataclasses.replace(BASE, attention="splash")).init(jax.random.key(0), batch["inputs"], batch["positions"], batch["segment_ids"])


@pytest.mark.slow
def test_remat_policies_keep_the_result_and_trade_memory():
  """No remat, "save_dots" and "full" give the same loss and gradients; the compiled gradient's scratch
  memory (the activations kept for the backward pass among it) shrinks in that order."""
  batch = packed_batch()
  params = None
  results, scratch = {}, {}
  for name, changes in (("none", {}), ("save_dots", {"remat": True, "remat_policy": "save_dots"}), ("full", {"remat": True})):
    model = Transformer(dataclasses.replace(BASE, **changes))
    if params is None:
      params = nn.unbox(model.init(jax.random.key(0), *(jnp.zeros((1, SEQ_LEN), jnp.int32),) * 3)["params"])
    compiled = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, model.apply)[0])).lower(params).compile()  # noqa: B023
    results[name], scratch[name] = compiled(params), compiled.memory_analysis().temp_size_in_bytes
  for name in ("save_dots", "full"):
    np.testing.assert_allclose(results[name][0], results["none"][0], rtol=1e-6)
    for g, ref in zip(jax.tree.leaves(results[name][1]), jax.tree.leaves(results["none"][1])):
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)
  assert scratch["none"] > scratch["save_dots"] > scratch["full"], scratch


MESH_CHECK = """
import dataclasses, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_attention import BASE, SEQ_LEN, packed_batch
from sft.model import Transformer
from sft.trainer import sharding
from sft.trainer.loss import loss_fn
mesh = sharding.make_mesh({{"data": 2, "fsdp": 1, "tensor": 2}})
rules = sharding.logical_rules((("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor")), mesh)
batch = packed_batch()
losses = []
for attention in ("xla", "splash"):
  model = Transformer(dataclasses.replace(BASE, attention=attention, sliding_window=16, sliding_window_pattern=2))
  params = nn.unbox(model.init(jax.random.key(0), *(jnp.zeros((1, SEQ_LEN), jnp.int32),) * 3)["params"])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    b = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    step = jax.jit(lambda p, b: loss_fn(p, b, model.apply)[0])
    losses.append(float(step(params, b)))
    if attention == "splash":
      hlo = step.lower(params, b).as_text()
      assert "manual_computation" in hlo or "shard_map" in hlo, "no per-device kernel"
print("losses", losses)
np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
"""


@pytest.mark.slow
def test_splash_under_a_mesh_runs_per_device_shards():
  """On 4 devices (2-way data x 2-way tensor), each device runs the kernel on its rows and heads
  (shard_map) and the loss equals the XLA path's."""
  import os
  import subprocess
  import sys

  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  script = MESH_CHECK.format(root=os.path.dirname(tests), tests=tests)
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "losses" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [256, 384, 512])
def test_blocked_causal_attention_equals_one_block(seq_len):
  """The XLA path skips the score blocks the causal mask hides entirely: the output and the gradients
  of queries, keys and values equal one block over every key, with packed segments and a sliding window."""
  from sft.model import attention

  assert attention.query_blocks(seq_len) > 1
  rng = np.random.default_rng(seq_len)
  b, n, k, h = 2, 4, 2, 8
  q, key, v = (jnp.asarray(rng.normal(size=(b, seq_len, heads, h)), jnp.float32) for heads in (n, k, k))
  cut = rng.integers(1, seq_len, size=(b, 3))
  segment_ids = jnp.asarray((np.arange(seq_len)[None, :, None] >= np.sort(cut, 1)[:, None, :]).sum(-1) + 1, jnp.int32)
  cfg = dataclasses.replace(BASE, num_heads=n, num_kv_heads=k, head_dim=h, sliding_window=100)
  mask = attention.attention_mask(segment_ids, cfg.sliding_window)
  blocked = lambda q, key, v: attention.causal_xla_attention(q, key, v, mask, cfg)  # noqa: E731
  whole = lambda q, key, v: attention.xla_attention(q, key, v, mask, cfg)  # noqa: E731
  np.testing.assert_allclose(blocked(q, key, v), whole(q, key, v), rtol=1e-5, atol=1e-6)
  weights = jnp.asarray(rng.normal(size=(b, seq_len, n, h)), jnp.float32)
  grads = lambda f: jax.grad(lambda *qkv: jnp.sum(f(*qkv) * weights), argnums=(0, 1, 2))(q, key, v)  # noqa: E731
  for ours, ref in zip(grads(blocked), grads(whole), strict=True):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"remat": True, "remat_policy": "save_dots"}, {"sliding_window": 16, "sliding_window_pattern": 2}])
def test_layers_traced_one_by_one_equal_the_scan(changes):
  """`scan_layers=False` runs the same stacked parameters layer by layer: the loss and every gradient
  equal the scanned model's, with remat and with alternating sliding-window layers."""
  batch = packed_batch()
  scanned = dataclasses.replace(BASE, num_layers=3, **changes)
  params, loss, grads = loss_and_grads(scanned, batch)
  _, loop_loss, loop_grads = loss_and_grads(dataclasses.replace(scanned, scan_layers=False), batch, params)
  np.testing.assert_allclose(loop_loss, loss, rtol=1e-6)
  assert jax.tree.structure(loop_grads) == jax.tree.structure(grads)
  for g, ref in zip(jax.tree.leaves(loop_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_layers_one_by_one_apply_lora_dropout():
  """With LoRA dropout in training, the layers traced one by one apply it: the loss depends on the
  dropout rng and is not the loss without dropout."""
  cfg = dataclasses.replace(BASE, num_layers=2, scan_layers=False, lora_rank=4, lora_dropout=0.5)
  model = Transformer(cfg, train=True)
  batch = packed_batch()
  zeros = (jnp.zeros((1, SEQ_LEN), jnp.int32),) * 3
  params = nn.unbox(model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, *zeros)["params"])
  # The adapters' B non-zero, so that what dropout removes reaches the loss.
  layers = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(path) else x, params["layers"])
  params = {**params, "layers": layers}
  loss = lambda p, seed: loss_fn(p, batch, model.apply, rngs={"dropout": jax.random.key(seed)})[0]  # noqa: E731
  without = loss_fn(params, batch, Transformer(cfg).apply)[0]
  assert len({float(loss(params, 2)), float(loss(params, 3)), float(without)}) == 3
