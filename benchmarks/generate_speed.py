"""Greedy generation speed: sft.evaluator.generate against Hugging Face `generate`, same model, same prompts.

    python benchmarks/generate_speed.py [--batch 1 8] [--repeats 5] [--tiny]

The model is a 26.1M-parameter Llama (vocab 8192, d_model 512, MLP 1408, 6 layers, 8 query heads over 4
kv heads of 64, untied unembedding), float32, randomly initialised in sft and exported with
`sft.hf.export_model`, so transformers (LlamaForCausalLM, eval mode, torch.inference_mode) runs the same
weights. Prompts are 64 random tokens; both sides decode greedily exactly 128 new tokens (no stop
token: HF gets eos_token_id=None and min_new_tokens=max_new_tokens). Ours is jitted and warmed up (the
compile is not timed); both sides are timed interleaved in this one process, --repeats times, and the
median is reported. Torch gets as many threads as this process may use CPUs. Greedy float32 decoding of
two implementations may part ways once two logits nearly tie: the agreement reported is over all
generated tokens, and per row up to the first difference. --tiny: a 2-layer toy model, a few seconds.

Each side's share of its own roofline: a decoding step reads every weight once for the whole batch and
does 2 FLOPs per weight per row, so `batch x read GB/s / weight bytes` and `matmul GFLOP/s / (2 x
parameters)` bound its new tokens/s; the lower of the two is printed, with each library's own read and
matmul speed measured in this process. (The KV cache and the activations are left out: the bound is
an upper one.) At batch 1 both sides read memory at about the machine's speed, so neither can be
much faster than the other there. The floor printed per batch is measured rather than derived: the time of
the call's weight products alone (the prompts' tokens, then every step's rows with the vocabulary
projection) with each library's own kernels at those shapes; HF's time over our floor is the most any
implementation on JAX's kernels could reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.roofline import matmul_gflops, matmul_seconds, read_gbps  # noqa: E402
from sft.evaluator.generate import make_generate  # noqa: E402
from sft.hf import export_model  # noqa: E402
from sft.model import ModelConfig, Transformer  # noqa: E402
from sft.model.transformer import count_params  # noqa: E402

BENCH = ModelConfig(
    vocab_size=8192, d_model=512, mlp_dim=1408, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
    norm_eps=1e-5, tie_embeddings=False,
)  # fmt: skip
TINY = ModelConfig(
    vocab_size=256, d_model=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    norm_eps=1e-5, tie_embeddings=False,
)  # fmt: skip


def build(cfg: ModelConfig, folder: str, seed: int = 0):
  """Random sft params, and the same weights loaded into transformers."""
  import torch
  import transformers

  model = Transformer(cfg)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), dummy, dummy, dummy)["params"])
  export_model(params, cfg, folder, "llama")
  hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
  hf.eval()
  return model, params, hf


def time_both(ours, theirs, repeats: int) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
  """Seconds per call of each, alternating which goes first; and each one's last output."""
  ours_s, theirs_s = [], []
  for r in range(repeats):
    order = [(ours, ours_s), (theirs, theirs_s)]
    for fn, seconds in order if r % 2 == 0 else order[::-1]:
      start = time.perf_counter()
      out = fn()
      seconds.append(time.perf_counter() - start)
      if fn is ours:
        ours_out = out
      else:
        theirs_out = out
  return ours_s, theirs_s, ours_out, theirs_out


def agreement(a_bn: np.ndarray, b_bn: np.ndarray) -> tuple[float, float, float]:
  """(fraction of equal tokens, fraction of rows equal throughout, mean fraction of a row before its first difference)."""
  equal_bn = a_bn == b_bn
  prefix_b = np.where(equal_bn.all(1), a_bn.shape[1], np.argmin(equal_bn, axis=1))
  return float(equal_bn.mean()), float(equal_bn.all(1).mean()), float(prefix_b.mean() / a_bn.shape[1])


def roofline(batch: int, num_params: int, read: float, gflops: float) -> tuple[float, str]:
  """(the bound on new tokens/s, what bounds it) for one library: reading the weights, or their matmuls."""
  by_reading = batch * read * 1e9 / (4 * num_params)
  by_matmul = gflops * 1e9 / (2 * num_params)
  return (by_reading, "reading the weights") if by_reading < by_matmul else (by_matmul, "the matmuls")


def bench_batch(batch: int, cfg: ModelConfig, generate, params, hf, args, speeds: dict) -> dict:
  """Times both sides on `batch` random prompts and prints tokens/s, the ratio and the tokens' agreement."""
  import torch

  n = args.new_tokens
  rng = np.random.default_rng(batch)
  tokens_bp = rng.integers(1, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
  lengths_b = np.full((batch,), args.prompt_len, np.int32)
  key = jax.random.key(0)
  prompt = torch.from_numpy(tokens_bp.astype(np.int64))

  def ours():
    return np.asarray(generate(params, tokens_bp, lengths_b, key).block_until_ready())

  def theirs():
    with torch.inference_mode():
      out = hf.generate(
          prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n, min_new_tokens=n,
          eos_token_id=None, pad_token_id=0, num_beams=1,
      )  # fmt: skip
    return out[:, args.prompt_len :].numpy()

  ours(), theirs()  # compile and warm up
  ours_s, theirs_s, ours_bn, theirs_bn = time_both(ours, theirs, args.repeats)
  assert ours_bn.shape == theirs_bn.shape == (batch, n), (ours_bn.shape, theirs_bn.shape)
  ours_tps, theirs_tps = batch * n / statistics.median(ours_s), batch * n / statistics.median(theirs_s)
  tokens, rows, prefix = agreement(ours_bn, theirs_bn)
  print(
      f"batch {batch}: ours {ours_tps:7.1f} tokens/s, HF generate {theirs_tps:7.1f} tokens/s, ratio {ours_tps / theirs_tps:.2f}x"
      f"  (median of {args.repeats}; ours {[round(s, 3) for s in ours_s]} s, HF {[round(s, 3) for s in theirs_s]} s)",
      flush=True,
  )
  print(f"batch {batch}: greedy tokens equal {tokens:.3f}, rows equal throughout {rows:.3f}, agreeing prefix {prefix:.3f} of a row", flush=True)
  num_params = count_params(params)
  shares = {}
  for side, tps, lib in (("ours", ours_tps, "jax"), ("hf", theirs_tps, "torch")):
    bound, by = roofline(batch, num_params, speeds[lib]["read"], speeds[lib]["gflops"])
    shares[side] = tps / bound
    print(f"batch {batch}: {side:>4} roofline {bound:8.1f} tokens/s (bound by {by}); at {tps / bound:.0%} of it", flush=True)
  floor_jax, floor_torch = weight_floor(cfg, batch, args.prompt_len, n)
  print(
      f"batch {batch}: floor (the weight products alone, measured now: the prompts' {batch * args.prompt_len} tokens, "
      f"then {n} steps of {batch} rows) ours {floor_jax:.4f} s, HF {floor_torch:.4f} s; the most any implementation on "
      f"JAX's kernels could reach here: {statistics.median(theirs_s) / floor_jax:.2f}x HF",
      flush=True,
  )
  return {
      "batch": batch, "ours": ours_tps, "hf": theirs_tps, "ratio": ours_tps / theirs_tps, "tokens_equal": tokens,
      "roofline_share": shares, "best_possible_ratio": statistics.median(theirs_s) / floor_jax,
  }


def weight_floor(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
  """(JAX, PyTorch) seconds of one generate call's weight products alone (roofline.matmul_seconds): the
  prompts through the layers, then `new_tokens` steps of `batch` rows with the vocabulary projection. No
  implementation multiplying with that library's kernels decodes faster."""
  fields = dict(
      hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, num_hidden_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
  )  # fmt: skip
  prefill = matmul_seconds(fields, batch * prompt_len, unembed=False)
  step = matmul_seconds(fields, batch, unembed=True)
  return prefill[0] + new_tokens * step[0], prefill[1] + new_tokens * step[1]


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--tiny", action="store_true", help="a 2-layer toy model, 16 + 8 tokens, 2 repeats: a smoke test")
  args = parser.parse_args(argv)
  import torch

  cfg = TINY if args.tiny else BENCH
  if args.tiny:
    args.prompt_len, args.new_tokens, args.repeats = 16, 8, min(args.repeats, 2)
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory() as folder:
    model, params, hf = build(cfg, folder)
  print(
      f"model: {count_params(params) / 1e6:.1f}M parameters, float32; prompt {args.prompt_len} tokens, "
      f"{args.new_tokens} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].platform}, "
      f"torch {torch.__version__} with torch.set_num_threads({threads}) (the CPUs this process may use)"
  )
  (jax_read, torch_read), (jax_gflops, torch_gflops) = read_gbps(64 * 2**20 if args.tiny else 512 * 2**20), matmul_gflops(256 if args.tiny else 2048)
  speeds = {"jax": {"read": jax_read, "gflops": jax_gflops}, "torch": {"read": torch_read, "gflops": torch_gflops}}
  print(
      f"this machine: reading memory JAX {jax_read:.1f} GB/s, PyTorch {torch_read:.1f} GB/s; matmul "
      f"{'256' if args.tiny else '2048'}^3 float32 JAX {jax_gflops:.0f} GFLOP/s, PyTorch {torch_gflops:.0f} GFLOP/s; "
      f"weights {4 * count_params(params) / 1e6:.1f} MB"
  )
  generate = make_generate(model, max_new_tokens=args.new_tokens, stop_ids=(), pad_id=0)
  return [bench_batch(batch, cfg, generate, params, hf, args, speeds) for batch in args.batch]


if __name__ == "__main__":
  main()
