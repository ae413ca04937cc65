"""benchmarks/mfu.py: the model-FLOPs formula against a hand count and against XLA's count, and the
benchmark itself run end to end on CPU with the tiny preset."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from fresh_process import fresh_env

from sft.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "mfu.py")


@pytest.fixture(scope="module")
def mfu():
  spec = importlib.util.spec_from_file_location("mfu_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


SMALL = dict(vocab_size=100, d_model=8, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=2, mlp_dim=16)


def test_flops_formula_matches_a_hand_count(mfu):
  # Per layer: q 8*4*2 = 64, o 64, k 8*2*2 = 32, v 32, gate + up + down 3*8*16 = 384 -> 576; two layers
  # 1152, plus the unembedding 100*8 = 800 (tied: the embedding table, used as a matmul) -> N = 1952.
  flops = mfu.model_flops(ModelConfig(**SMALL), seq_len=10)
  assert flops.matmul_params == 1952
  assert flops.dense == 6 * 1952 == 11712
  assert flops.attention_full == 12 * 2 * 10 * 4 * 2 == 1920  # 12 L T heads head_dim
  assert flops.per_token == 11712 + 1920
  assert flops.per_token_causal == 11712 + 960
  # Untied: the unembedding is its own (D, V) matrix, the same count; no gate: 2 * 8 * 16 per layer.
  assert mfu.model_flops(ModelConfig(**SMALL, tie_embeddings=False), 10).matmul_params == 1952
  assert mfu.model_flops(ModelConfig(**SMALL, mlp_gated=False, mlp_activation="gelu_tanh"), 10).matmul_params == 1952 - 2 * 128


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"mlp_gated": False, "mlp_activation": "gelu_tanh"}])
def test_matmul_count_agrees_with_the_parameter_tree(mfu, overrides):
  """The embedding (a gather) and norm scales are left out; every projection and the unembedding are in."""
  cfg = ModelConfig(**SMALL, **overrides)
  dummy = (jnp.zeros((1, 4), jnp.int32),) * 3
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), *dummy)["params"])
  assert mfu.matmul_params_of_tree(params, cfg) == mfu.matmul_params(cfg)
  assert mfu.matmul_params(cfg) < sum(x.size for x in jax.tree.leaves(params))


def test_the_1b_preset_has_llama_3_2_1b_shapes(mfu):
  cfg = ModelConfig(**mfu.LLAMA_1B)
  assert mfu.matmul_params(cfg) == 1_235_746_816  # 1.236B: Llama-3.2-1B's count, embedding shared
  assert mfu.model_flops(cfg, 2048).per_token == 6 * 1_235_746_816 + 12 * 16 * 2048 * 2048


def test_formula_is_within_ten_percent_of_xla_without_remat(mfu):
  """XLA's cost analysis on the loop-free probe (one layer, no remat, whole-sequence loss) of the tiny
  model and of a different shape: the formula leaves out only elementwise work (norms, softmaxes, AdamW),
  so it is a little below XLA's count. A formula that dropped the unembedding (~45% of the probe's
  FLOPs here) or attention (~10%), or counted the backward pass wrong, would fail."""
  for argv in (["--preset=tiny"], ["--preset=tiny", "--seq_len=256", "--remat=on", "--loss_chunk_size=32"]):
    args = mfu.parse_args(argv)
    check = mfu.xla_check(mfu.run_config(args.preset, args, jax.device_count()))
    assert check is not None, "XLA gave no FLOP count on this backend"
    assert 0.9 <= check["ratio"] <= 1.02, check


def test_peak_table(mfu):
  assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
  assert mfu.peak_flops("TPU v5 lite") == 197e12
  assert mfu.peak_flops("cpu") is None


def test_benchmark_runs_on_cpu_with_the_tiny_preset(mfu):
  cmd = [sys.executable, SCRIPT, "--preset=tiny", "--steps=2", "--warmup=1", "--peak_tflops=1", "--json"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=fresh_env(JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  text = "\n".join(lines[:-1])
  for field in ("step time", "tokens/s", "model FLOPs/token", "achieved", "MFU", "memory/device", "XLA flops/step", "formula / XLA"):
    assert field in text, text
  assert "remat recompute not counted" in text and "causal-halved" in text
  r = json.loads(lines[-1])
  flops = mfu.model_flops(ModelConfig(**mfu.TINY), r["seq_len"])
  assert (r["preset"], r["steps_timed"], r["remat"], r["dtype"], r["param_dtype"]) == ("tiny", 2, True, "bfloat16", "float32")
  assert r["tokens_per_step"] == r["batch"] * r["seq_len"] == r["batch"] * 128
  assert r["flops_per_token"] == flops.per_token and r["flops_per_token_causal"] == flops.per_token_causal
  assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s_median"])
  assert r["achieved_tflops_per_device"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / r["devices"] / 1e12)
  assert r["mfu"] == pytest.approx(r["achieved_tflops_per_device"] / 1.0)  # --peak_tflops=1
  assert r["mfu_causal"] < r["mfu"]
  assert math.isfinite(r["final_loss"]) and abs(r["final_loss"] - math.log(1024)) < 1.5  # random tokens: about ln V
  assert 0.9 <= r["xla_check"]["ratio"] <= 1.02
  assert r["memory_bytes_per_device"]["argument"] > 4 * 3 * r["params"]  # float32 weights and two Adam moments
  # Without a peak (a CPU has none in the table) the report says so instead of an MFU.
  unknown = mfu.report(r | {"mfu": None, "mfu_causal": None, "peak_tflops_per_device": None})
  assert f"peak unknown for {r['device_kind']}; pass --peak_tflops" in unknown
