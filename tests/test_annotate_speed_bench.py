"""benchmarks/annotate_speed.py runs end to end with --quick in a fresh process: both sides timed, every
printed figure parses, the two sides answer alike, and the cached rerun asks the model nothing. The speed
targets are the benchmark's to print, not this test's to check."""

import os
import re
import subprocess
import sys

import pytest
from fresh_process import fresh_env

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "annotate_speed.py")
NUMBER = r"(\d+(?:\.\d+)?)"
SIDES = ("ours", "HF generate, dynamic cache", "HF generate, static cache")
SIDE = rf"({'|'.join(SIDES)}): (\d+) records in {NUMBER} s: {NUMBER} records/s, {NUMBER} new tokens/s"


def line(pattern: str, out: str) -> tuple[str, ...]:
  found = re.search(pattern, out, re.MULTILINE)
  assert found, f"no line matches {pattern!r} in:\n{out}"
  return found.groups()


@pytest.mark.slow
def test_quick_run_prints_both_sides_the_ratio_and_a_cache_rerun_that_asks_nothing():
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=fresh_env(JAX_PLATFORMS="cpu"),
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "torch.set_num_threads(" in out and "24 chats" in out
  same, total = line(r"^prompts: sft's chat rendering equals .*apply_chat_template for (\d+) of (\d+)$", out)
  assert same == total == "24"
  compile_s, decoding, prefill = line(
      rf"^warm-up \(\d+ chats, one per \(bucket, prefill width\)\): ours {NUMBER} s \(compiling (\d+) decoding and (\d+) "
      r"prefill programs", out
  )
  assert float(compile_s) > 0 and 1 <= int(decoding) <= int(prefill)
  sides = {m[0]: m[1:] for m in re.findall(rf"^{SIDE}", out, re.MULTILINE)}
  assert set(sides) == set(SIDES), out
  for records, seconds, per_s, tokens_per_s in sides.values():
    assert records == "24" and float(seconds) > 0
    assert float(per_s) == pytest.approx(24 / float(seconds), rel=0.05)
    assert 24 * 1 <= float(tokens_per_s) * float(seconds) <= 24 * 8 * 1.05  # 1 to max_new_tokens per answer
  cache, ratio = line(rf"^ratio \(ours / HF generate, (dynamic|static) cache, the faster\): {NUMBER}x records/s", out)
  theirs = {c: float(sides[f"HF generate, {c} cache"][2]) for c in ("dynamic", "static")}
  assert theirs[cache] == max(theirs.values())
  assert float(ratio) == pytest.approx(float(sides["ours"][2]) / theirs[cache], rel=0.05)
  floor = line(
      rf"^floor \(the weight products alone, measured now: (\d+) prompt tokens unpadded, then (\d+) decoding steps of 8 "
      rf"full rows\): ours {NUMBER} s, HF {NUMBER} s; each side's time over its floor: ours {NUMBER}x, HF {NUMBER}x; "
      rf"the most any implementation on JAX's kernels could reach here: {NUMBER}x HF$",
      out,
  )
  ours_tokens = float(sides["ours"][3]) * float(sides["ours"][1])
  assert int(floor[1]) == -(-round(ours_tokens) // 8)  # every new token in full steps of the batch
  assert 0 < float(floor[2]) and 0 < float(floor[3])
  assert float(floor[4]) == pytest.approx(float(sides["ours"][1]) / float(floor[2]), rel=0.05)
  (equal,) = line(r"^greedy answers equal: (\d+) of 24", out)
  assert int(equal) >= 20  # a toy model's 8 greedy tokens: the two sides agree (a few near ties may flip)
  first = line(rf"^cache: first run {NUMBER} s \((\d+) misses, model asked (\d+) chats\)", out)
  assert first[1:] == ("24", "24")
  rerun = line(
      rf"cached rerun {NUMBER} ms \((\d+) hits, (\d+) misses, model asked (\d+) chats, model (not loaded|loaded)\): "
      rf"{NUMBER}x",
      out,
  )
  assert rerun[1:5] == ("24", "0", "0", "not loaded")
  assert float(rerun[5]) == pytest.approx(float(first[0]) / (float(rerun[0]) / 1000), rel=0.05)
