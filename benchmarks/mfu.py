"""Model FLOPs utilisation (MFU) of the jitted train step: a ~1B Llama at sequence 2048, or a tiny model on CPU.

    python benchmarks/mfu.py --preset=1b [--batch=8] [--steps=20] [--warmup=3] [--fsdp=-1] [--json]
    python benchmarks/mfu.py --preset=tiny --steps=2 --warmup=1 --peak_tflops=1        # CPU, under a minute
    python benchmarks/mfu.py --preset=1b --distributed ...   # every host of a TPU slice / GPU cluster, same command

What runs is the library's own step (sft.trainer.step.build_train_step) on a state the library builds and
shards (sft.trainer.setup.setup_run, sft.trainer.state), from a run config (sft/config.py) that the
preset fills: "1b" has Llama-3.2-1B's shapes (vocab 128256, d_model 2048, 16 layers, 32 query / 8 kv
heads of 64, MLP 8192 SwiGLU, tied embeddings, rope theta 500000 with llama3 scaling), bfloat16 compute,
float32 master weights and AdamW moments, remat on, the loss computed 512 tokens at a time; "tiny" is the
same kind of model for CPU (vocab 1024, d_model 64, 2 layers, 4 / 2 heads of 16, MLP 256, sequence 128,
loss chunks of 64). The batch is random tokens, built on the devices once (no input
pipeline is timed): one example per row filling all of it (segment ids all 1, positions 0..T-1), every
token loss-masked. Steps after --warmup are timed one by one, each waited for (block_until_ready); the
median step time gives tokens/s.

Model FLOPs per token are the library's count (sft/trainer/flops.py, where the formula is derived):
6 N + 12 L T num_heads head_dim for a training step, attention over all T keys as in PaLM; the MFU with
causal attention's half of that term is printed as well, the lower, stricter number. Remat's recomputed
forward is not counted. MFU = (model FLOPs per token * tokens/s) / (peak bf16 dense FLOP/s per device *
devices), the peak looked up from jax.devices()[0].device_kind (sft.trainer.flops.PEAK_BF16;
--peak_tflops to set it; CPUs have none). Training logs the same TFLOP/s and MFU in its metric lines.

Cross-check: the compiled step's memory analysis and XLA's cost_analysis() FLOPs. XLA counts the body of a
while loop once, not once per trip, so its count of the step (layers scanned, chunked loss, gradient
accumulation) is low by about the number of layers. The formula is therefore also checked against XLA on a
probe: the same model and sequence with one layer, the whole-sequence loss and no remat (no loops), lowered
on abstract arguments and counted before XLA's optimisations (no state, data or compile needed), where
formula / XLA should be close to 1, a little under it: XLA also counts the elementwise work (norms,
softmaxes, AdamW). Measured: 0.94 for the tiny preset, 0.996 for the 1b one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from sft.config import base_config  # noqa: E402
from sft.config_check import check_config  # noqa: E402
from sft.model import Transformer  # noqa: E402
from sft.trainer import setup, sharding  # noqa: E402
from sft.trainer import state as state_lib  # noqa: E402
from sft.trainer import step as step_lib  # noqa: E402
from sft.trainer.flops import matmul_params_of_tree, model_flops, peak_flops  # noqa: E402
from sft.trainer.loop import build_optimizer  # noqa: E402

LLAMA_1B = dict(
    vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192,
    rope_theta=500_000.0, rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_max_positions=8192, norm_eps=1e-5, tie_embeddings=True,
)
TINY = dict(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=256, tie_embeddings=True)
PRESETS = {
    # batch: rows per device; mesh: as the full fine-tuning config (FSDP over every device).
    "1b": dict(model=LLAMA_1B, seq_len=2048, batch_per_device=8, loss_chunk_size=512, remat=True, mesh=(1, -1, 1)),
    "tiny": dict(model=TINY, seq_len=128, batch_per_device=4, loss_chunk_size=64, remat=True, mesh=(-1, 1, 1)),
}

def run_config(preset: str, args: argparse.Namespace, num_devices: int) -> ml_collections.ConfigDict:
  """A run config (sft/config.py) holding the preset's model and the flags' shapes."""
  p = PRESETS[preset]
  c = base_config()
  model = dict(p["model"])
  c.tokenizer.vocab_size = model.pop("vocab_size")
  for key, value in model.items():
    c.model[key] = value
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  c.model.remat = p["remat"] if args.remat is None else args.remat == "on"
  c.train.seq_len = args.seq_len or p["seq_len"]
  c.train.batch_size = args.batch or p["batch_per_device"] * num_devices
  c.train.grad_accum_steps = args.grad_accum
  c.train.loss_chunk_size = p["loss_chunk_size"] if args.loss_chunk_size is None else args.loss_chunk_size
  c.train.sft_steps = args.warmup + args.steps
  c.train.warmup_steps = 1
  c.train.weight_decay = 0.1
  mesh = dict(zip(sharding.MESH_AXES, p["mesh"]))
  mesh.update({k: getattr(args, k) for k in sharding.MESH_AXES if getattr(args, k) is not None})
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
  check_config(c)
  return c


def random_batch(rows: int, seq_len: int, vocab_size: int, batch_sharding, seed: int = 0) -> dict[str, jax.Array]:
  """One example per row over all T tokens, every token loss-masked; made on the devices, already sharded."""

  def make(key):
    tokens = jax.random.randint(key, (rows, seq_len + 1), 0, vocab_size, jnp.int32)
    ones = jnp.ones((rows, seq_len), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones, "segment_ids": ones, "positions": positions}

  return jax.jit(make, out_shardings=batch_sharding)(jax.random.key(seed))


def make_step(config: ml_collections.ConfigDict):
  """(run setup, optimizer, abstract state, its shardings, jitted step): the library's own functions."""
  run, tc = setup.setup_run(config), config.train
  run.check_batch("--batch", tc.batch_size, tc.grad_accum_steps)
  schedule, optimizer, trainable = build_optimizer(config, run.model_cfg)
  abstract, shardings = state_lib.state_shardings(run.model, optimizer, run.dummy_inputs, run.mesh, run.rules)
  stepper = step_lib.build_train_step(
      Transformer(run.model_cfg, train=True).apply, optimizer, schedule, shardings, run.mesh, run.rules,
      trainable=trainable, **step_lib.step_options(tc),
  )
  return run, optimizer, abstract, shardings, stepper.jitted


def build_step(config: ml_collections.ConfigDict):
  """(run setup, train state, compiled step, batch), the state initialised in its shards."""
  run, optimizer, _, shardings, step = make_step(config)
  tc = config.train
  with run.on_mesh():
    state = state_lib.create_train_state(run.model, optimizer, run.dummy_inputs, shardings, jax.random.key(config.seed))
    batch = random_batch(tc.batch_size, tc.seq_len, run.model_cfg.vocab_size, run.batch_sharding, config.seed)
    compiled = step.lower(state, batch).compile()
  return run, state, compiled, batch


def xla_flops(program) -> float | None:
  """XLA's cost_analysis FLOPs of a lowered or compiled program (summed over its parts), or None."""
  try:
    analysis = program.cost_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  parts = analysis if isinstance(analysis, (list, tuple)) else [analysis]
  flops = [part.get("flops") for part in parts if part]
  return float(sum(flops)) if flops and all(f is not None for f in flops) else None


def memory(compiled) -> dict[str, int] | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if stats is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.removesuffix("_size_in_bytes"): int(getattr(stats, f, 0) or 0) for f in fields}
  out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]  # per device
  return out


def probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same model and step with no loops XLA would count once: one layer, the whole-sequence loss, no
  remat, no gradient accumulation; the smallest batch the mesh takes."""
  probe = ml_collections.ConfigDict(config.to_dict())
  probe.model.num_layers, probe.model.remat = 1, False
  probe.train.loss_chunk_size, probe.train.grad_accum_steps = 0, 1
  run = setup.setup_run(probe)
  probe.train.batch_size = math.lcm(sharding.batch_shards(run.mesh, run.rules), jax.process_count())
  return probe


def xla_check(config: ml_collections.ConfigDict) -> dict[str, float] | None:
  """Formula / XLA's FLOPs on the loop-free probe (None where XLA gives no count). The probe is only
  lowered, on abstract arguments: XLA's cost analysis of its HLO needs no state, no data and no compile."""
  probe = probe_config(config)
  run, _, abstract, shardings, step = make_step(probe)
  tc = probe.train
  batch = {
      k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32, sharding=run.batch_sharding)
      for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
  }
  with run.on_mesh():
    lowered = step.lower(state_lib.abstract_with_shardings(abstract, shardings), batch)
  counted = xla_flops(lowered) or xla_flops(lowered.compile())
  if not counted:
    return None
  formula = model_flops(run.model_cfg, tc.seq_len).per_token * tc.batch_size * tc.seq_len
  return {"formula_flops": float(formula), "xla_flops": counted, "ratio": formula / counted}


def time_steps(compiled, state, batch, warmup: int, steps: int) -> tuple[list[float], float]:
  """(seconds of each timed step, the last loss): every step waited for."""
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - start)
  return seconds, float(metrics["loss"])


def measure(args: argparse.Namespace) -> dict:
  config = run_config(args.preset, args, jax.device_count())
  run, state, compiled, batch = build_step(config)
  cfg, tc = run.model_cfg, config.train
  flops = model_flops(cfg, tc.seq_len)
  tree_n = matmul_params_of_tree(run.abstract_params, cfg)
  if tree_n != flops.matmul_params:
    raise AssertionError(f"matmul parameters: formula {flops.matmul_params}, parameter tree {tree_n}")
  step_xla = xla_flops(compiled)
  mem = memory(compiled)
  seconds, loss = time_steps(compiled, state, batch, args.warmup, args.steps)
  check = xla_check(config) if args.xla_check else None

  devices, kind = jax.device_count(), jax.devices()[0].device_kind
  peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind)
  step_s = statistics.median(seconds)
  tokens = tc.batch_size * tc.seq_len
  tokens_per_s = tokens / step_s
  achieved = flops.per_token * tokens_per_s
  achieved_causal = flops.per_token_causal * tokens_per_s
  return {
      "preset": args.preset,
      "device_kind": kind,
      "devices": devices,
      "processes": jax.process_count(),
      "mesh": dict(run.mesh.shape),
      "params": sum(x.size for x in jax.tree.leaves(run.abstract_params)),
      "matmul_params": flops.matmul_params,
      "seq_len": tc.seq_len,
      "batch": tc.batch_size,
      "grad_accum": tc.grad_accum_steps,
      "loss_chunk_size": tc.loss_chunk_size,
      "remat": cfg.remat,
      "dtype": cfg.dtype,
      "param_dtype": cfg.param_dtype,
      "tokens_per_step": tokens,
      "steps_timed": len(seconds),
      "step_s_median": step_s,
      "step_s_min": min(seconds),
      "step_s_max": max(seconds),
      "tokens_per_s": tokens_per_s,
      "tokens_per_s_per_device": tokens_per_s / devices,
      "flops_per_token": flops.per_token,
      "flops_per_token_dense": flops.dense,
      "flops_per_token_attention": flops.attention_full,
      "flops_per_token_causal": flops.per_token_causal,
      "achieved_tflops_per_device": achieved / devices / 1e12,
      "achieved_tflops_per_device_causal": achieved_causal / devices / 1e12,
      "peak_tflops_per_device": None if peak is None else peak / 1e12,
      "peak_source": "--peak_tflops" if args.peak_tflops else ("device_kind table" if peak else None),
      "mfu": None if peak is None else achieved / (peak * devices),
      "mfu_causal": None if peak is None else achieved_causal / (peak * devices),
      "xla_flops_per_step": step_xla,
      "xla_check": check,
      "memory_bytes_per_device": mem,
      "final_loss": loss,
  }


def _num(x: float | None, fmt: str) -> str:
  return "n/a" if x is None else format(x, fmt)


def report(r: dict) -> str:
  gib = lambda b: f"{b / 2**30:.3f} GiB" if b >= 2**25 else f"{b / 2**20:.2f} MiB"
  lines = [
      f"device             {r['devices']} x {r['device_kind']} ({r['processes']} process(es)), mesh {r['mesh']}",
      f"model              preset {r['preset']}: {r['params']:,} parameters, {r['matmul_params']:,} in matmuls (N); "
      f"{r['dtype']} compute, {r['param_dtype']} weights, remat {'on' if r['remat'] else 'off'}",
      f"batch              {r['batch']} rows x {r['seq_len']} tokens = {r['tokens_per_step']:,} tokens/step "
      f"(one example per row, all loss-masked); grad accum {r['grad_accum']}, loss chunk {r['loss_chunk_size'] or 'off'}",
      f"step time          median {r['step_s_median'] * 1e3:.2f} ms over {r['steps_timed']} steps "
      f"(min {r['step_s_min'] * 1e3:.2f}, max {r['step_s_max'] * 1e3:.2f}); final loss {r['final_loss']:.3f}",
      f"tokens/s           {r['tokens_per_s']:,.0f} ({r['tokens_per_s_per_device']:,.0f} per device)",
      f"model FLOPs/token  {r['flops_per_token']:.4g} = 6N {r['flops_per_token_dense']:.4g} + attention 12*L*T*heads*head_dim "
      f"{r['flops_per_token_attention']:.4g} (all T keys, PaLM); causal-halved {r['flops_per_token_causal']:.4g}; remat recompute not counted",
      f"achieved           {r['achieved_tflops_per_device']:.4g} TFLOP/s per device (causal-halved {r['achieved_tflops_per_device_causal']:.4g})",
  ]
  if r["mfu"] is None:
    lines.append(f"MFU                peak unknown for {r['device_kind']}; pass --peak_tflops")
  else:
    lines.append(
        f"MFU                {r['mfu'] * 100:.2f}% of {r['peak_tflops_per_device']:g} TFLOP/s bf16 per device ({r['peak_source']}); "
        f"causal-halved {r['mfu_causal'] * 100:.2f}%"
    )
  mem = r["memory_bytes_per_device"]
  if mem:
    lines.append(
        f"memory/device      arguments {gib(mem['argument'])}, outputs {gib(mem['output'])} (aliased {gib(mem['alias'])}), "
        f"temporaries {gib(mem['temp'])}; peak estimate {gib(mem['peak_estimate'])}"
    )
  lines.append(f"XLA flops/step     {_num(r['xla_flops_per_step'], '.4g')} (compiled step's cost_analysis, per device after partitioning; each while-loop body counted once: layer scan, chunked loss, accumulation)")
  check = r["xla_check"]
  if check:
    lines.append(
        f"formula / XLA      {check['ratio']:.3f} on the loop-free probe (1 layer, whole-sequence loss, no remat): "
        f"{check['formula_flops']:.4g} / {check['xla_flops']:.4g} FLOPs"
    )
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  parser.add_argument("--batch", type=int, default=0, help="rows per step over all devices (default: the preset's rows per device x devices)")
  parser.add_argument("--seq_len", type=int, default=0, help="tokens per row (default: the preset's, 2048 for 1b)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  for axis in sharding.MESH_AXES:
    parser.add_argument(f"--{axis}", type=int, default=None, help=f"mesh size of {axis} (-1: the devices left over)")
  parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
  parser.add_argument("--loss_chunk_size", type=int, default=None, help="tokens per loss chunk (0: whole sequence)")
  parser.add_argument("--remat", choices=("on", "off"), default=None, help="default: on")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 peak per device, for a device the table lacks")
  parser.add_argument("--xla_check", choices=("on", "off"), default="on", help="count the loop-free probe's FLOPs with XLA and compare")
  parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() first (multi-host), as launch.py does")
  parser.add_argument("--json", action="store_true", help="also print one JSON line")
  args = parser.parse_args(argv)
  args.xla_check = args.xla_check == "on"
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  result = measure(args)
  if jax.process_index() == 0:
    print(report(result))
    if args.json:
      print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  main()
