"""sft/trainer/flops.py: the model-FLOPs formula against a hand count and against the matmuls of the real
gradient, the peak table, the TFLOP/s and MFU figures, and a run that logs them."""

import json
import logging
import math

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest
from resume_worker import config as run_config

from sft.model import ModelConfig, Transformer
from sft.trainer import flops, loop, setup
from sft.trainer.loss import loss_fn
from sft.trainer.metrics_log import train_line

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
SMALL = dict(vocab_size=100, d_model=8, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=2, mlp_dim=16)


def test_formula_matches_a_hand_count():
  # Per layer: q 8*4*2 = 64, o 64, k 8*2*2 = 32, v 32, gate + up + down 3*8*16 = 384 -> 576; two layers
  # 1152, plus the unembedding 100*8 = 800 (tied: the embedding table, used as a matmul) -> N = 1952.
  counted = flops.model_flops(ModelConfig(**SMALL), seq_len=10)
  assert counted.matmul_params == 1952
  assert counted.dense == 6 * 1952 == 11712
  assert counted.attention_full == 12 * 2 * 10 * 4 * 2 == 1920  # 12 L T heads head_dim
  assert counted.per_token == 11712 + 1920
  assert counted.per_token_causal == 11712 + 960
  assert flops.step_flops(ModelConfig(**SMALL), seq_len=10, batch_size=3) == (11712 + 1920) * 3 * 10
  # Untied: the unembedding is its own (D, V) matrix, the same count; no gate: 2 * 8 * 16 per layer.
  assert flops.model_flops(ModelConfig(**SMALL, tie_embeddings=False), 10).matmul_params == 1952
  assert flops.model_flops(ModelConfig(**SMALL, **UNGATED), 10).matmul_params == 1952 - 2 * 128


def dot_flops(jaxpr) -> int:
  """2 * multiply-adds of every dot_general in a jaxpr, inner jaxprs included (a scan's times its length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for inner in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
          inner = inner.jaxpr
        if isinstance(inner, jax.extend.core.Jaxpr):
          total += times * dot_flops(inner)
  return total


# Six shapes: each example traces a model's whole gradient (about a second), and an exact count fails on any
# wrong term at once; the shapes the formula could get wrong (GQA groups, untied, ungated, scanned) are all drawn.
@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(
    layers=st.integers(1, 3), kv_heads=st.integers(1, 2), groups=st.integers(1, 3), half_head_dim=st.integers(1, 2),
    d_model=st.integers(2, 12), mlp_dim=st.integers(1, 20), vocab=st.integers(2, 50), seq_len=st.integers(1, 12),
    rows=st.integers(1, 3), tie=st.booleans(), gated=st.booleans(), scan=st.booleans(),
)
def test_formula_equals_the_matmul_flops_of_the_real_gradient(
    layers, kv_heads, groups, half_head_dim, d_model, mlp_dim, vocab, seq_len, rows, tie, gated, scan
):
  """An independent count: every matrix product in the traced gradient of the training loss (the whole
  sequence's, no remat), at 2 FLOPs per multiply-add. The formula counts exactly these: a missing
  unembedding, a 4N instead of 6N, or attention counted over half the keys would all differ."""
  cfg = ModelConfig(
      vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=kv_heads * groups, num_kv_heads=kv_heads,
      head_dim=2 * half_head_dim, mlp_dim=mlp_dim, tie_embeddings=tie, mlp_gated=gated,
      mlp_activation="silu" if gated else "gelu_tanh", scan_layers=scan,
  )
  model = Transformer(cfg)
  dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *dummy)["params"])
  batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32) for k in BATCH_KEYS}
  gradient = jax.make_jaxpr(jax.grad(lambda p, b: loss_fn(p, b, model.apply)[0]))(params, batch)
  assert dot_flops(gradient.jaxpr) == flops.step_flops(cfg, seq_len, rows)


UNGATED = {"mlp_gated": False, "mlp_activation": "gelu_tanh"}


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, UNGATED])
def test_matmul_count_agrees_with_the_parameter_tree(overrides):
  """The embedding (a gather) and norm scales are left out; every projection and the unembedding are in."""
  cfg = ModelConfig(**SMALL, **overrides)
  dummy = (jnp.zeros((1, 4), jnp.int32),) * 3
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), *dummy)["params"])
  assert flops.matmul_params_of_tree(params, cfg) == flops.matmul_params(cfg)
  assert flops.matmul_params(cfg) < sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("overrides", [{"lora_rank": 2}, {"sliding_window": 4}])
def test_lora_and_sliding_windows_are_not_counted(overrides):
  cfg = ModelConfig(**SMALL, **overrides)
  assert flops.step_flops(cfg, 10, 2) is None
  with pytest.raises(ValueError, match="full fine-tune without sliding windows"):
    flops.model_flops(cfg, 10)


def test_peak_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("cpu") is None


def test_tflops_per_device_and_mfu():
  # 4 steps of 3e12 FLOPs in 2 s over 3 devices: 2 TFLOP/s per device, half of a 4 TFLOP/s peak.
  assert flops.achieved(3e12, 4, 2.0, 3, 4e12) == pytest.approx({"tflops_per_device": 2.0, "mfu": 0.5})
  assert flops.achieved(3e12, 4, 2.0, 3, None) == pytest.approx({"tflops_per_device": 2.0})  # no peak: no MFU
  metrics = {"loss": 1.0, "accuracy": 0.5, "grad_norm": 1.0, "learning_rate": 1e-3}
  line = train_line(4, 10, "sft", metrics, 1000.0, None, speed={"tflops_per_device": 2.0, "mfu": 0.5})
  assert "1,000 tok/s 2 TFLOP/s/device MFU 50.0% | ETA" in line
  assert "MFU" not in train_line(4, 10, "sft", metrics, 1000.0, None, speed={"tflops_per_device": 2.0})
  assert "TFLOP/s" not in train_line(4, 10, "sft", metrics, 1000.0, None)


@pytest.mark.slow  # a whole (tiny) training run; the fast tier has the figures and the line above
def test_a_run_logs_its_model_tflops(tmp_path, data_dir, caplog):
  """Every train row of metrics.jsonl has the model TFLOP/s per device: the step's FLOPs (every token of the
  batch, padding too) over the interval its tokens/s was measured on. A CPU has no peak, so no MFU."""
  small = {
      "train.sft_steps": 2, "train.warmup_steps": 0, "train.log_every": 1, "eval.every_steps": 100,
      "eval.num_generations": 0, "checkpoint.every_steps": 100,
  }
  config = run_config(str(data_dir), small)
  with caplog.at_level(logging.INFO, logger="sft"):
    loop.train_and_evaluate(config, tmp_path / "run")
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  rows = [r for r in map(json.loads, lines) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["train/tflops_per_device"] > 0 and "train/mfu" not in r for r in rows)
  step_flops = flops.step_flops(setup.model_config(config), 64, 8)
  for r in rows:  # one step per row: its seconds are its real tokens over its tokens/s
    seconds = r["train/tokens"] / r["train/tokens_per_s"]
    assert r["train/tflops_per_device"] == pytest.approx(step_flops / seconds / jax.device_count() / 1e12, rel=1e-6)
  assert any("no peak known for 'cpu': TFLOP/s only, no MFU" in r.getMessage() for r in caplog.records)
  assert any(" TFLOP/s/device | ETA" in r.getMessage() for r in caplog.records)
