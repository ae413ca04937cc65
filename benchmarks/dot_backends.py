"""XLA:CPU's back ends for dot (matmul), each chosen by XLA_FLAGS, on the real train and decode steps.

    python benchmarks/dot_backends.py [--quick] [--passes 2] [--settings default eigen onednn ...]

jaxlib's XLA:CPU hands each dot to a library chosen at compile time: by default YNNPACK takes every dot on
its own (`--xla_cpu_experimental_ynn_fusion_type` defaults to `individual_dot`), Eigen takes what no library
claims, and oneDNN takes dots only when asked (`--xla_cpu_use_onednn=true` with
`--xla_cpu_experimental_onednn_fusion_type=dot`; it claims a dot before YNNPACK does). `dot` and `eltwise`
in a fusion-type list also fuse the elementwise ops around a dot into the library's call. Each setting
(`SETTINGS`) runs in its own fresh process with XLA_FLAGS set before JAX starts, and reports:

- engaged: whether the compiled train and decode programs differ from the default's (their optimized HLO,
  metadata left out), and the library fusions they hold by kind (`"kind":"__ynn_fusion"` and the like). A
  setting whose programs are the default's is ignored by this jaxlib and is not timed (`--time_all` times
  it anyway); an unknown flag makes XLA abort at start, reported as such.
- GFLOP/s of a float32 (m, k) @ (k, n) per shape: 2048^3 and the steps' own products (the MLP's and the
  unembedding's, at 4096 training tokens and at 8 or 32 decoding rows), best of 3, with each result's
  largest error relative to a float64 product.
- the train step of `train_speed.py` (the same 26.1M-parameter Llama, AdamW + clipping, scanned layers with
  `save_dots` remat; batch 8 x 512, `--quick` 2 x 512): median seconds per step, and the loss of each step
  from the same initial state and batch.
- greedy decoding of `generate_speed.py` (the same model, batch 8, prompt 64, 128 new tokens; `--quick` 32):
  median new tokens/s, and the tokens themselves.

Runs are interleaved, default first and again between every other setting (default, A, default, B, ...),
for `--passes` passes, so the machine's drift shows in the default's own spread; every figure is the median
over a setting's runs. "max diff" compares with the first default run: the largest absolute difference of
the train losses, and the share of greedy tokens that differ. Compilation is not timed. `--quick` takes a
few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
ONEDNN = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type"
SETTINGS = {
    "default": "",  # YNNPACK, one dot per call
    "eigen": YNN_OFF,  # no library claims a dot: XLA's own Eigen dot
    "onednn": f"{ONEDNN}=dot",
    "onednn+eltwise": f"{ONEDNN}=dot,eltwise",
    "ynn+eltwise": "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise",
    # Flags that exist in this jaxlib but that no dot of these programs follows:
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn-fusion": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn-only": "--xla_cpu_use_onednn=true",
    "onednn-custom-call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
}
# (m, k, n): 2048^3, then the train step's MLP products at 8 x 512 tokens, decoding's at 8 and 32 rows,
# and decoding's unembedding at 32 rows.
SHAPES = ((2048, 2048, 2048), (4096, 512, 1408), (4096, 1408, 512), (8, 512, 1408), (32, 512, 1408), (32, 512, 8192))
RESULT = "RESULT "


def program_summary(hlo: str) -> dict:
  """The library fusions of one compiled program by kind, and a hash of its text without metadata
  (names and source locations), so that two compilations of the same program compare equal."""
  kinds: dict[str, int] = {}
  for kind in re.findall(r'"kind":"__(\w+?)(?:_fusion)?"', hlo):
    kinds[kind] = kinds.get(kind, 0) + 1
  calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
  for call in calls:
    kinds[call] = kinds.get(call, 0) + 1
  body = re.sub(r", metadata=\{[^}]*\}", "", hlo[hlo.find("\n%") :])
  return {"kinds": kinds, "hash": hashlib.sha256(body.encode()).hexdigest()[:16]}


def time_dots(repeats: int = 3) -> dict:
  """GFLOP/s (best of `repeats`) and the largest error relative to float64 of each shape's product."""
  import jax
  import numpy as np

  rng, out = np.random.default_rng(0), {}
  f = jax.jit(lambda x, y: x @ y)
  for m, k, n in SHAPES:
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    xa, xb = jax.device_put(a), jax.device_put(b)
    r = np.asarray(f(xa, xb))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    inner = max(3, int(2e9 / (2 * m * k * n)))  # ~1 GFLOP per timing, so small shapes are not all overhead
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(inner):
        r = f(xa, xb)
      r.block_until_ready()
      best = min(best, (time.perf_counter() - t0) / inner)
    err = float(np.max(np.abs(np.asarray(r) - ref)) / np.max(np.abs(ref)))
    out[f"{m}x{k}x{n}"] = {"gflops": 2 * m * k * n / best / 1e9, "rel_err": err}
  return out


def train_step(quick: bool, check_only: bool) -> dict:
  """The train step of train_speed.py, compiled once: its program, seconds per step and each step's loss."""
  import jax

  from benchmarks.train_speed import BENCH_MODEL, Ours, random_batch
  from sft.model import ModelConfig

  batch, seq_len, steps = (2, 512, 3) if quick else (8, 512, 4)
  cfg = ModelConfig(**BENCH_MODEL, remat=True, remat_policy="save_dots", scan_layers=True)
  ours = Ours(cfg, random_batch(batch, seq_len, cfg.vocab_size))
  compiled = ours.step_fn.lower(ours.state, ours.batch).compile()
  out = {"program": program_summary(compiled.as_text()), "batch": [batch, seq_len]}
  if check_only:
    return out
  losses, seconds = [], []
  for _ in range(steps):  # the first step is a warm-up: timed, but left out of the median
    t0 = time.perf_counter()
    ours.state, metrics = compiled(ours.state, ours.batch)
    losses.append(float(metrics["loss"]))  # fetching the loss waits for the step
    seconds.append(time.perf_counter() - t0)
  jax.block_until_ready(ours.state)
  return dict(out, losses=losses, step_s=statistics.median(seconds[1:]), all_s=seconds)


def decode(quick: bool, check_only: bool) -> dict:
  """Greedy generation of generate_speed.py at batch 8, compiled once: its program, tokens/s and tokens."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.generate_speed import BENCH
  from sft.evaluator.generate import make_generate
  from sft.model import Transformer

  batch, prompt_len, new, repeats = (8, 64, 32, 3) if quick else (8, 64, 128, 5)
  model = Transformer(BENCH)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), dummy, dummy, dummy)["params"])
  tokens_bp = np.random.default_rng(batch).integers(1, BENCH.vocab_size, (batch, prompt_len)).astype(np.int32)
  lengths_b = np.full((batch,), prompt_len, np.int32)
  args = (params, tokens_bp, lengths_b, jax.random.key(0))
  compiled = make_generate(model, max_new_tokens=new, stop_ids=(), pad_id=0).lower(*args).compile()
  out = {"program": program_summary(compiled.as_text()), "batch": batch, "new_tokens": new}
  if check_only:
    return out
  ids = np.asarray(compiled(*args))  # warm-up
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    ids = np.asarray(compiled(*args))
    seconds.append(time.perf_counter() - t0)
  return dict(out, tokens_per_s=batch * new / statistics.median(seconds), tokens=ids.tolist())


def worker(quick: bool, check_only: bool) -> None:
  """Everything measured under this process's XLA_FLAGS, printed after each part: a back end that kills
  the process in one part still reports the parts before it."""
  import jax

  assert jax.devices()[0].platform == "cpu", jax.devices()
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}
  parts = [("decode", lambda: decode(quick, check_only))]
  parts += [] if check_only else [("dots", time_dots)]
  parts += [("train", lambda: train_step(quick, check_only))]
  for name, measure in parts:
    out[name] = measure()
    print(RESULT + json.dumps(out), flush=True)


def run_setting(name: str, quick: bool, check_only: bool, timeout: int) -> dict:
  """One setting in a fresh process (XLA reads XLA_FLAGS once, when JAX starts): what it reported, and
  why it stopped if it failed."""
  env = dict(os.environ, XLA_FLAGS=SETTINGS[name], JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + ["--quick"] * quick + ["--check_only"] * check_only
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    stdout, rc, stderr = proc.stdout, proc.returncode, proc.stderr
  except subprocess.TimeoutExpired as e:
    stdout, rc, stderr = (e.stdout or b"").decode(), None, f"timed out after {timeout} s"
  lines = [line for line in stdout.splitlines() if line.startswith(RESULT)]
  run = dict(json.loads(lines[-1][len(RESULT) :]) if lines else {}, name=name)
  if rc != 0 or not lines:
    why = [line.strip() for line in stderr.splitlines() if line.strip()][-1:] or [f"exit status {rc}"]
    signal = f" (signal {-rc})" if rc and rc < 0 else ""
    run["error"] = f"{why[0][-160:]}{signal}"
  return run


PARTS = ("train", "decode")


def engaged(run: dict, default: dict) -> bool:
  """Whether a compiled program differs from the default's."""
  return any(run[p]["program"]["hash"] != default[p]["program"]["hash"] for p in PARTS if p in run)


def kinds_text(run: dict) -> str:
  kinds: dict[str, int] = {}
  for part in PARTS:
    for kind, count in run.get(part, {}).get("program", {}).get("kinds", {}).items():
      kinds[kind] = kinds.get(kind, 0) + count
  return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"


def differences(run: dict, ref: dict) -> str:
  """The largest absolute difference of the train losses and the share of greedy tokens that differ."""
  out = []
  if "losses" in run.get("train", {}):
    out.append(f"loss {max(abs(a - b) for a, b in zip(run['train']['losses'], ref['train']['losses'])):.1e}")
  if "tokens" in run.get("decode", {}):
    a, b = run["decode"]["tokens"], ref["decode"]["tokens"]
    differ = sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    out.append(f"tokens {differ}/{sum(len(row) for row in a)} differ")
  return ", ".join(out)


def _median(runs: list[dict], part: str, key: str) -> float | None:
  values = [r[part][key] for r in runs if key in r.get(part, {})]
  return statistics.median(values) if values else None


def summarise(name: str, runs: list[dict], default: dict) -> dict:
  """A setting's row: medians over its timed runs (a part that crashed has none)."""
  if not any(p in r for r in runs for p in PARTS):
    return {"name": name, "error": runs[0].get("error", "no result")}
  first = next(r for r in runs if any(p in r for p in PARTS))
  row = {"name": name, "engaged": engaged(first, default), "kinds": kinds_text(first), "runs": len(runs)}
  row["errors"] = sorted({r["error"] for r in runs if "error" in r})
  timed = [r for r in runs if "dots" in r]
  if timed:
    row["gflops"] = {s: statistics.median(r["dots"][s]["gflops"] for r in timed) for s in timed[0]["dots"]}
    row["rel_err"] = max(d["rel_err"] for r in timed for d in r["dots"].values())
    row["step_s"] = _median(timed, "train", "step_s")
    row["tokens_per_s"] = _median(timed, "decode", "tokens_per_s")
    row["diff"] = differences(timed[-1], default)  # for the default: a later run against its first
    row["spread"] = {
        "step_s": [round(r["train"]["step_s"], 3) for r in timed if "step_s" in r.get("train", {})],
        "tokens_per_s": [round(r["decode"]["tokens_per_s"], 1) for r in timed if "decode" in r],
    }
  return row


def print_table(rows: list[dict]) -> None:
  shapes = [f"{m}x{k}x{n}" for m, k, n in SHAPES]
  head = ["setting", "engaged (library fusions in train + decode)", *shapes]
  head += ["train step s", "decode tokens/s", "max diff vs default"]
  print("| " + " | ".join(head) + " |")
  print("|---" * len(head) + "|")
  for row in rows:
    if "engaged" not in row:
      print(f"| {row['name']} | error: {row['error']} |" + " |" * (len(head) - 2))
      continue
    state = "default" if row["name"] == "default" else "yes" if row["engaged"] else "no"
    cells = [row["name"], f"{state} ({row['kinds']})"]
    if "gflops" not in row:
      print("| " + " | ".join(cells + ["-"] * (len(head) - 3) + ["same programs as default"]) + " |")
      continue
    cells += [f"{row['gflops'][s]:.0f}" for s in shapes]
    cells += ["-" if row["step_s"] is None else f"{row['step_s']:.3f}"]
    cells += ["-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}"]
    notes = [row["diff"], f"dot rel err {row['rel_err']:.1e}"] + [f"failed: {e}" for e in row["errors"]]
    print("| " + " | ".join(cells + ["; ".join(n for n in notes if n)]) + " |")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="train batch 2 x 512, 32 new tokens: a few minutes")
  parser.add_argument("--passes", type=int, default=2, help="interleaved passes over the engaged settings")
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME")
  parser.add_argument("--time_all", action="store_true", help="time settings that leave the programs unchanged too")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per setting's process")
  parser.add_argument("--json", metavar="FILE", help="write every run's results here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--check_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.quick, args.check_only)
    return []
  others = [name for name in args.settings if name != "default"]
  print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
  # Which settings change the programs at all: a compile-only run of each.
  default = run_setting("default", args.quick, False, args.timeout)
  if "error" in default or "train" not in default:
    raise SystemExit(f"the default setting failed: {default['error']}")
  runs = {"default": [default]}
  timed = []
  for name in others:
    probe = run_setting(name, args.quick, True, args.timeout)
    runs[name] = [probe]
    compiled = all(p in probe for p in PARTS)
    state = ("engaged" if engaged(probe, default) else "same programs as default") if compiled else probe["error"]
    print(f"{name:>20}: {SETTINGS[name]!r}: {state}", flush=True)
    if compiled and (args.time_all or engaged(probe, default)):
      timed.append(name)
      runs[name] = []
  for p in range(args.passes):
    for name in timed:
      for setting in ("default", name) if p or name != timed[0] else (name,):
        run = run_setting(setting, args.quick, False, args.timeout)
        runs[setting].append(run)
        brief = [f"step {run['train']['step_s']:.3f} s"] if "train" in run else []
        brief += [f"{run['decode']['tokens_per_s']:.0f} tokens/s"] if "decode" in run else []
        brief += [run["error"]] if "error" in run else []
        print(f"  pass {p + 1}: {setting:>16}: {', '.join(brief)}", flush=True)
  rows = [summarise(name, runs[name], default) for name in ["default", *others]]
  print(f"load average after: {os.getloadavg()}", flush=True)
  print_table(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "runs": runs}, f)
  return rows


if __name__ == "__main__":
  main()
