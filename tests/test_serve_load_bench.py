"""benchmarks/serve_load.py runs end to end with --quick in a fresh process: both servers start, take the
same load, and every printed figure of both sides parses and agrees with the others. The speed target is
the benchmark's to print, not this test's to check."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from fresh_process import fresh_env

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("httpx2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "serve_load.py")
NUMBER = r"(\d+(?:\.\d+)?)"
SIDES = ("sft serve", "transformers serve")


def lines(pattern: str, out: str) -> list[tuple[str, ...]]:
  found = re.findall(pattern, out, re.MULTILINE)
  assert found, f"no line matches {pattern!r} in:\n{out}"
  return found


def test_the_load_has_a_warm_up_covering_every_prompt_bucket_of_the_measured_chats():
  spec = importlib.util.spec_from_file_location("serve_load_bench", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench  # its dataclasses look their module up there
  spec.loader.exec_module(bench)
  from sft.serve.engine import bucket_of

  pool = [f"chat {i}" for i in range(10)]
  pool_lengths = [20, 20, 20, 20, 20, 40, 20, 20, 200, 20]
  warm = bench.pick_warmup(pool, pool_lengths, [20, 30, 150], 512, clients=4)
  assert len(warm) == 4 and len(set(warm)) == 4  # as many as the clients, none twice
  assert "chat 8" in warm  # the one chat of bucket 256, though it comes after as many others as there are clients
  assert {bucket_of(pool_lengths[pool.index(c)], 512) for c in warm} >= {32, 256}
  with pytest.raises(AssertionError, match="no warm-up chat"):  # no chat of bucket 512 to warm it with
    bench.pick_warmup(pool, pool_lengths, [400], 512, clients=4)
  # transformers' paged cache gets twice the tokens of sft's: 16 slots of 512 tokens are 32 pages of 256.
  args = bench.parse_args(["--clients", "16"])
  assert args.slots == 16 and bench.hf_num_blocks(args) == 64


@pytest.mark.slow
def test_quick_run_prints_both_servers_figures_and_the_ratio():
  if importlib.util.find_spec("accelerate") is None:
    pytest.skip("transformers serve needs accelerate (transformers[serving])")
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=fresh_env(JAX_PLATFORMS="cpu"),
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "transformers serve: continuous batching (paged attention" in out, out
  (warm,) = lines(rf"^warm-up \(\d+ requests on other chats.*: sft {NUMBER} s, transformers {NUMBER} s$", out)
  assert all(float(s) > 0 for s in warm)
  figures = {}
  for side, tps, p50, p99, ttft in lines(
      rf"^({'|'.join(SIDES)}): {NUMBER} output tokens/s \(median of .*\); request latency p50 {NUMBER} s, "
      rf"p99 {NUMBER} s; time to first token p50 {NUMBER} s$", out,
  ):  # fmt: skip
    figures[side] = float(tps), float(p50), float(p99), float(ttft)
    assert 0 < float(ttft) <= float(p50) <= float(p99)
  assert set(figures) == set(SIDES), out
  usage = {side: (int(produced), int(asked)) for side, produced, asked in lines(
      rf"^({'|'.join(SIDES)}): output tokens \(usage\) (\d+) of (\d+) asked", out)}
  assert set(usage) == set(SIDES), out
  for produced, asked in usage.values():
    assert asked == 16 and 2 <= produced <= 16  # 2 requests x 8 tokens; a stop ends one early
  (ratio,) = lines(rf"^ratio \(sft / transformers\): {NUMBER}x tokens/s, p99 latency {NUMBER}x", out)
  sft, hf = figures["sft serve"], figures["transformers serve"]
  assert float(ratio[0]) == pytest.approx(sft[0] / hf[0], rel=0.02)
  assert float(ratio[1]) == pytest.approx(sft[2] / hf[2], rel=0.05, abs=0.015)  # rounded as printed
  assert re.search(r"^target \(>= 2x tokens/s, p99 latency no worse\): (met|not met) ", out, re.MULTILINE), out
  (equal,) = lines(r"^greedy answers equal: (\d+) of 2$", out)
  assert int(equal) >= 1  # the same weights, 8 greedy tokens: the two servers answer alike
