"""benchmarks/build_100k.py and benchmarks/build_real.py run end to end on a few records, each in its own
process (the benchmark replaces the build's runner with its timed one)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_build_real_reads_docstrings_and_times_every_stage(tmp_path):
  out = run("build_real.py", "--num_records", "80", "--num_workers", "1", "--corpus", str(tmp_path / "corpus"))
  assert re.search(r"corpus: 80 records", out) and re.search(r"records read: 80 ", out), out
  assert re.search(r"whole build: +[\d.]+ s .*us per record", out) and "clean, filter, decontaminate" in out, out
  chats = (tmp_path / "corpus" / "raw" / "chats-000.jsonl").read_text().splitlines()
  assert len(chats) == 64 and all(line.startswith('{"instruction": "What does `') for line in chats)


def test_build_100k_times_a_small_build(tmp_path):
  out = run("build_100k.py", "--num_records", "300", "--num_workers", "1")
  assert re.search(r"records read: 300 ", out) and "plain read + write JSONL" in out and "target: 100,000 records under 120 s" in out, out
