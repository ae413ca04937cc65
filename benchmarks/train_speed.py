"""Training speed: this project's jitted train step against Hugging Face transformers on PyTorch.

    python benchmarks/train_speed.py [--batch 8] [--seq_len 512] [--repeats 5] [--steps 3]

Both sides train the same 26.1M-parameter Llama (vocab 8192, d_model 512, MLP 1408, 6 layers, 8 heads /
4 KV heads, head_dim 64, untied unembedding) from the same weights (ours, exported to a Hugging Face
folder and loaded by `LlamaForCausalLM`), in float32, on the same random batch of one full-length example
per row with every token in the loss. One step is forward, backward, global-norm clipping to 1.0 and
AdamW (weight decay 0.1). Ours is one `jax.jit` call with donated state, in the configuration that is
fastest here: one traced layer scanned 6 times (`model.scan_layers=True`), each recomputing in the
backward pass all but its projections' and MLP's matmul outputs (`model.remat=True`,
`model.remat_policy="save_dots"`). That keeps the step's intermediates at 1.0 GB instead of 2.5 GB;
XLA:CPU maps them afresh and faults every page in at every step, so the smaller set makes the faster
step despite the recomputation. `--no-remat`, `--remat_policy full` and `--no-scan_layers` (the 6
layers traced one by one) time the others. Theirs is `loss.backward()`, `clip_grad_norm_` and
`torch.optim.AdamW` (foreach), with SDPA attention. `--micro_batches k` makes both sides accumulate
gradients over k micro-batches within the step (ours `train.grad_accum_steps`, theirs backward on each
chunk's loss / k): the same update, with a k-times smaller working set (k must divide the batch). Each repeat times `--steps` steps of one
side, then of the other, after a warm-up (compilation is not timed); the figure is the median over
repeats. PyTorch uses as many threads as XLA's CPU client (the machine's cores).

It also times one 2048^3 float32 matmul on each side (the roofline of both steps) and prints the step's
model FLOPs per token as training counts them (sft/trainer/flops.py: 6 x matmul parameters + 12 L T heads head_dim).
`--profile DIR` then traces one more step of ours into DIR (TensorBoard's profile plugin reads it) and
prints where its time went, by the model code behind each operation (benchmarks/profile_ops.py).
`--tiny` shrinks everything so a test runs it in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.roofline import matmul_gflops  # noqa: E402
from sft.hf import export_model  # noqa: E402
from sft.model import ModelConfig, Transformer  # noqa: E402
from sft.model.config import REMAT_POLICIES  # noqa: E402
from sft.trainer import sharding  # noqa: E402
from sft.trainer import state as state_lib  # noqa: E402
from sft.trainer import step as step_lib  # noqa: E402
from sft.trainer.flops import model_flops  # noqa: E402

LR, B1, B2, EPS, WEIGHT_DECAY, CLIP = 1e-4, 0.9, 0.95, 1e-8, 0.1, 1.0

BENCH_MODEL = dict(
    vocab_size=8192, d_model=512, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1408,
    tie_embeddings=False, rope_theta=10_000.0, norm_eps=1e-6,
)
TINY_MODEL = dict(BENCH_MODEL, vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "loss_mask": np.ones((batch, seq_len), np.int32),
      "segment_ids": np.ones((batch, seq_len), np.int32),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
  }


class Ours:
  """The library's own state and jitted step, as a run builds them (a 1-device data mesh)."""

  def __init__(self, cfg: ModelConfig, batch_np, **step_kwargs):
    seq_len = batch_np["inputs"].shape[1]
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    rules = sharding.logical_rules((("batch", ("data",)),), mesh)
    self.model = Transformer(cfg)
    schedule = lambda _: LR  # noqa: E731
    optimizer = state_lib.make_optimizer(schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip_norm=CLIP)
    dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
    _, shardings = state_lib.state_shardings(self.model, optimizer, dummy, mesh, rules)
    self.state = state_lib.create_train_state(self.model, optimizer, dummy, shardings, jax.random.key(0))
    stepper = step_lib.build_train_step(self.model.apply, optimizer, schedule, shardings, mesh, rules, **step_kwargs)
    self.step_fn = stepper.jitted
    self.batch = stepper.place_batch(batch_np)

  def params_host(self):
    return jax.device_get(self.state.params)

  def step(self) -> float:
    self.state, metrics = self.step_fn(self.state, self.batch)
    return float(metrics["loss"])  # fetching the loss waits for the step


class Theirs:
  """LlamaForCausalLM on the same weights, its usual PyTorch training step."""

  def __init__(self, folder: str, batch_np, micro_batches: int = 1):
    import torch
    import transformers

    self.torch = torch
    self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    self.model.train()
    decay = [p for n, p in self.model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in self.model.named_parameters() if "norm" in n]
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(B1, B2), eps=EPS, foreach=True,
    )
    self.inputs = torch.from_numpy(batch_np["inputs"].astype(np.int64))
    self.targets = torch.from_numpy(batch_np["targets"].astype(np.int64))
    self.micro_batches = micro_batches

  def step(self) -> float:
    """One update; with micro-batches, the usual accumulation: backward on each chunk's loss / k (every
    row has the same token count here, so that is the batch's mean)."""
    torch, k, total = self.torch, self.micro_batches, 0.0
    for inputs, targets in zip(self.inputs.chunk(k), self.targets.chunk(k)):
      logits = self.model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)) / k
      loss.backward()
      total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return total


def timed(side, steps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(steps):
    side.step()
  return time.perf_counter() - t0


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tiny", action="store_true", help="a small model and batch, for a quick check")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True, help="our side recomputes each layer's activations (model.remat)")
  parser.add_argument("--remat_policy", default="save_dots", choices=REMAT_POLICIES, help="what a rematerialised layer keeps (model.remat_policy)")
  parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True, help="our side scans one traced layer (model.scan_layers)")
  parser.add_argument("--profile", metavar="DIR", help="trace one more step of ours into DIR and print its time by source")
  parser.add_argument("--micro_batches", type=int, default=1, help="both sides accumulate gradients over this many micro-batches per step")
  args = parser.parse_args(argv)
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  if args.tiny:
    args.batch, args.seq_len, args.steps, args.repeats = 2, 32, 1, 2
  if args.micro_batches < 1 or args.batch % args.micro_batches:
    parser.error(f"--micro_batches {args.micro_batches} must be >= 1 and divide the batch ({args.batch} rows)")
  cfg = ModelConfig(**(TINY_MODEL if args.tiny else BENCH_MODEL), remat=args.remat, remat_policy=args.remat_policy, scan_layers=args.scan_layers)
  batch_np = random_batch(args.batch, args.seq_len, cfg.vocab_size)
  ours = Ours(cfg, batch_np, grad_accum_steps=args.micro_batches)
  with tempfile.TemporaryDirectory() as folder:
    export_model(ours.params_host(), cfg, folder, "llama")
    theirs = Theirs(folder, batch_np, args.micro_batches)
  first_loss = (ours.step(), theirs.step())  # warm-up: compiles ours; both see the same weights and batch here
  ours.step(), theirs.step()
  times = {"ours": [], "theirs": []}
  for _ in range(args.repeats):
    times["ours"].append(timed(ours, args.steps))
    times["theirs"].append(timed(theirs, args.steps))
  tokens = args.batch * args.seq_len * args.steps
  tok_s = {side: tokens / statistics.median(ts) for side, ts in times.items()}
  n_params = sum(int(x.size) for x in jax.tree.leaves(ours.state.params))
  flops = model_flops(cfg, args.seq_len).per_token  # 6 N + 12 L T heads head_dim, as training counts
  jax_gflops, torch_gflops = matmul_gflops(256 if args.tiny else 2048)
  result = {
      "params": n_params, "batch": args.batch, "micro_batches": args.micro_batches, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
      "ours_tokens_per_s": tok_s["ours"], "theirs_tokens_per_s": tok_s["theirs"], "ratio": tok_s["ours"] / tok_s["theirs"],
      "first_loss": first_loss, "flops_per_token": flops, "matmul_gflops": (jax_gflops, torch_gflops),
  }
  micro = f", {args.micro_batches} micro-batches per step on both sides" if args.micro_batches > 1 else ""
  print(f"model: {n_params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens{micro}, float32, AdamW + clipping")
  remat = f"{cfg.remat} ({cfg.remat_policy})" if cfg.remat else "False"
  print(f"ours: model.scan_layers={cfg.scan_layers}, model.remat={remat}, attention {cfg.attention!r}")
  print(f"threads: {result['threads']} (PyTorch); step 1 loss: ours {first_loss[0]:.4f}, Hugging Face {first_loss[1]:.4f}")
  print(f"matmul {'256' if args.tiny else '2048'}^3 float32: JAX {jax_gflops:.0f} GFLOP/s, PyTorch {torch_gflops:.0f} GFLOP/s")
  print(f"step FLOPs: {flops / 1e6:.1f} MFLOP/token; roofline at JAX's matmul speed: {jax_gflops * 1e9 / flops:,.0f} tokens/s")
  for side, name in (("ours", "sft (jax.jit)"), ("theirs", "transformers (PyTorch)")):
    share = tok_s[side] * flops / (jax_gflops if side == "ours" else torch_gflops) / 1e9
    print(f"{name:>24}: {tok_s[side]:8,.0f} tokens/s  ({share:.0%} of its matmul roofline; repeats {times[side]})")
  print(f"ratio (sft / transformers): {result['ratio']:.2f}x")
  if args.profile:
    result["profile"] = profile_step(ours, args.profile)
  return result


def profile_step(ours: Ours, trace_dir: str) -> list[tuple[float, float, str]]:
  """One traced step of ours, and its operations' time by source (see benchmarks/profile_ops.py)."""
  from benchmarks import profile_ops

  # The traced program is the one whose text names its operations: a second compilation may number them
  # otherwise, and the trace's operations would then find no source.
  compiled = ours.step_fn.lower(ours.state, ours.batch).compile()
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    ours.state, metrics = compiled(ours.state, ours.batch)
    float(metrics["loss"])  # waits for the step
    wall_s = time.perf_counter() - t0
  rows = profile_ops.breakdown(compiled.as_text(), trace_dir)
  profile_ops.print_breakdown(rows, wall_s)
  return rows


if __name__ == "__main__":
  main()
