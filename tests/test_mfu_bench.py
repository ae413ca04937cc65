"""benchmarks/mfu.py: the library's model-FLOPs formula (sft/trainer/flops.py, tested in test_flops.py) on the
benchmark's presets against published and hand counts and against XLA's count, and the benchmark itself run
end to end on CPU with the tiny preset."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest
from fresh_process import fresh_env

from sft.model import ModelConfig
from sft.trainer import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "mfu.py")


@pytest.fixture(scope="module")
def mfu():
  spec = importlib.util.spec_from_file_location("mfu_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_the_1b_preset_has_llama_3_2_1b_shapes(mfu):
  cfg = ModelConfig(**mfu.LLAMA_1B)
  assert flops.matmul_params(cfg) == 1_235_746_816  # 1.236B: Llama-3.2-1B's count, embedding shared
  assert flops.model_flops(cfg, 2048).per_token == 6 * 1_235_746_816 + 12 * 16 * 2048 * 2048
  assert mfu.model_flops is flops.model_flops and mfu.peak_flops is flops.peak_flops  # the library's, not a copy


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


@pytest.mark.slow
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
  assert (r["preset"], r["steps_timed"], r["remat"], r["dtype"], r["param_dtype"]) == ("tiny", 2, True, "bfloat16", "float32")
  assert r["tokens_per_step"] == r["batch"] * r["seq_len"] == r["batch"] * 128
  # By hand for the tiny preset at T=128: per layer q and o 64*64 each, k and v 64*32 each, gate, up and down
  # 64*256 each -> 61440; two layers plus the unembedding 1024*64 -> N = 188416. Attention 12*2*128*4*16.
  assert r["matmul_params"] == 188_416
  assert r["flops_per_token"] == 6 * 188_416 + 196_608 and r["flops_per_token_causal"] == 6 * 188_416 + 98_304
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
