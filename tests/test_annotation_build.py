"""Annotation inside a build: a build killed while it annotates, run again, asks the model only for what
the cache lacks and writes byte-identical files; another annotator or decoding misses the cache."""

import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from sft.annotator.base import Generation
from sft.databuilder import build, build_config, build_dataset

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUM_RECORDS = 24
BATCH = 4

# What the child process runs: a build whose annotator takes its time, so the parent can kill it halfway.
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import test_annotation_build as t
from sft.databuilder import build, build_dataset
build.check_build_config = lambda config: None  # the annotator is passed in; its folder need not exist
build_dataset(t.config_of({raw!r}), {out!r}, annotator=t.Slow({delay}), progress=False)
"""


class Writer:
  """A deterministic stand-in for an annotator (the real backends: tests/test_annotator.py)."""

  fingerprint = "writer-1"

  def __init__(self):
    self.asked = 0

  def generate(self, chats, decoding):
    self.asked += len(chats)
    return [Generation(f"A short answer to: {c[-1]['content']} (t={decoding.temperature})", True) for c in chats]

  def log_likelihoods(self, chats, answers):
    return [-1.0] * len(answers)


class Slow(Writer):
  def __init__(self, delay: float):
    super().__init__()
    self.delay = delay

  def generate(self, chats, decoding):
    time.sleep(self.delay)
    return super().generate(chats, decoding)


def raw_folder(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  rows = [{"instruction": f"Describe river number {i} and the valley it carved over the years.", "output": ""} for i in range(NUM_RECORDS)]
  (folder / "todo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder


def config_of(raw: str):
  config = build_config()
  config.input_dir = raw
  config.filter.language.enabled = False
  config.dedup.near = False
  config.annotate.model = "/a/model"
  config.annotate.batch_size = BATCH
  return config


def data_files(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".jsonl", ".array_record")}


def cached_rows(path: pathlib.Path) -> int:
  try:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
      return conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
  except sqlite3.Error:  # not created yet
    return 0


@pytest.fixture
def unchecked(monkeypatch):
  monkeypatch.setattr(build, "check_build_config", lambda config: None)  # "/a/model" is no folder


def test_a_build_killed_while_annotating_resumes_from_the_cache_with_identical_output(tmp_path, unchecked):
  raw = raw_folder(tmp_path / "raw")
  whole = Writer()
  build_dataset(config_of(str(raw)), tmp_path / "whole", annotator=whole, progress=False)
  assert whole.asked == NUM_RECORDS

  out = tmp_path / "out"
  script = CHILD.format(tests=str(ROOT / "tests"), raw=str(raw), out=str(out), delay=0.4)
  child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 120
  while cached_rows(out / build.CACHE) < 2 * BATCH and child.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  saved = cached_rows(out / build.CACHE)
  assert 2 * BATCH <= saved < NUM_RECORDS, f"the child was to be killed halfway, with {saved} answers cached"
  assert not (out / build.MANIFEST).exists()  # it never finished

  again = Writer()
  manifest = build_dataset(config_of(str(raw)), out, annotator=again, progress=False)
  assert again.asked == NUM_RECORDS - saved  # only what the killed build had not committed
  assert manifest["annotation"]["cache"] == {"path": str(out / build.CACHE), "hits": saved, "misses": NUM_RECORDS - saved}
  assert data_files(out) == data_files(tmp_path / "whole")

  rerun = Writer()
  build_dataset(config_of(str(raw)), out, annotator=rerun, progress=False)
  assert rerun.asked == 0  # everything cached

  other = Writer()
  other.fingerprint = "writer-2"  # other weights: nothing of the first annotator's is reused
  build_dataset(config_of(str(raw)), out, annotator=other, progress=False)
  assert other.asked == NUM_RECORDS
  sampled = config_of(str(raw))
  sampled.annotate.temperature = 0.7  # other decoding: a miss too
  hot = Writer()
  build_dataset(sampled, out, annotator=hot, progress=False)
  assert hot.asked == NUM_RECORDS
  assert cached_rows(out / build.CACHE) == 3 * NUM_RECORDS


def test_the_cache_can_be_turned_off_and_a_first_build_cut_off_leaves_a_reusable_folder(tmp_path, unchecked):
  raw = raw_folder(tmp_path / "raw")
  config = config_of(str(raw))
  config.annotate.cache = False
  build_dataset(config, tmp_path / "plain", annotator=Writer(), progress=False)
  assert not (tmp_path / "plain" / build.CACHE).exists()

  class Broken(Writer):  # fails on its second call, after the first was cached
    def generate(self, chats, decoding):
      if self.asked:
        raise RuntimeError("the model server went away")
      return super().generate(chats, decoding)

  with pytest.raises(RuntimeError, match="went away"):
    build_dataset(config_of(str(raw)), tmp_path / "out", annotator=Broken(), progress=False)
  assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(build.CACHE)) == []
  resumed = Writer()
  build_dataset(config_of(str(raw)), tmp_path / "out", annotator=resumed, progress=False)  # not refused as someone's folder
  assert resumed.asked == NUM_RECORDS - BATCH


def test_a_build_annotates_with_a_real_workdir_through_the_launcher_path(tmp_path, tokenizer):
  """sft.build_dataset opens the annotator annotate.model names (a random-parameter tiny workdir): it
  labels by log-likelihood and fills, every answer counted, its fingerprint in the manifest."""
  import flax.linen as nn
  import jax

  import sft
  from sft.annotator import open_annotator
  from sft.config import base_config
  from sft.trainer import rundir, setup
  from sft.trainer.checkpoint import Checkpointer

  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / setup.TOKENIZER_FILE).write_bytes(tokenizer.model_proto)
  run_config = base_config()
  run_config.tokenizer.vocab_size = 512
  run_config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  run_config.train.seq_len = 128
  rundir.write_run_config(model_dir, run_config, 0)
  run = setup.setup_run(run_config)
  checkpointer = Checkpointer(model_dir / setup.CHECKPOINTS, max_to_keep=1, save_interval_steps=1)
  checkpointer.save(1, {"params": nn.unbox(run.model.init(jax.random.key(0), *run.dummy_inputs)["params"])}, {}, force=True)
  checkpointer.close()

  raw = tmp_path / "raw"
  raw.mkdir()
  rows = [{"text": f"Review {i}: the plot was {'good' if i % 2 else 'slow'} and the cast {i}.", "labels": ["positive", "negative"]}
          for i in range(6)]
  rows += [{"instruction": f"Name a river in country number {i}.", "output": ""} for i in range(4)]
  (raw / "todo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = build_config()
  config.input_dir = str(raw)
  config.filter.language.enabled = False
  config.dedup.near = False
  config.annotate.model = str(model_dir)
  config.annotate.max_new_tokens = 4  # a random model rarely ends a turn that soon: counted as truncated
  config.annotate.max_drop_fraction = 1.0
  manifest = sft.build_dataset(config, tmp_path / "out", progress=False)
  assert manifest["annotation"]["annotator"]["fingerprint"] == open_annotator(str(model_dir)).fingerprint
  rows = manifest["accounting"]["by_source"]["todo.jsonl"]
  labelled = [r for r in read_all(tmp_path / "out") if r.get("annotated") == "label"]
  assert len(labelled) == 6 and all(r["messages"][-1]["content"] in ("positive", "negative") for r in labelled)
  assert all(0 <= r["label_confidence"] <= 1 for r in labelled)
  fill = {k: v for k, v in rows["dropped_by_reason"].items() if k.startswith("annotate: fill")}
  filled = sum(1 for r in read_all(tmp_path / "out") if r.get("annotated") == "response")
  assert filled + sum(fill.values()) == 4 and set(fill) <= {"annotate: fill: truncated", "annotate: fill: empty"}
  assert manifest["annotation"]["cache"]["misses"] == 6 * 2 + 4

  # The audit's machine reviewer, the same model, opened from judge.model: every sampled row is filled or
  # counted as unparseable (a random model mostly answers neither keep nor drop).
  from sft.audit.config import audit_config

  audit = audit_config()
  audit.build_dir, audit.mode, audit.per_stratum = str(tmp_path / "out"), "judge", 2
  audit.judge.model, audit.judge.max_new_tokens = str(model_dir), 4
  judged = sft.audit(audit, tmp_path / "audit")
  machine = [json.loads(x) for x in (tmp_path / "audit" / "review-machine.jsonl").read_text().splitlines()]
  assert len(machine) == judged["rows"] > 0 and all(r["reviewer"] == "machine" for r in machine)
  assert sum(1 for r in machine if not r["verdict"] and not r["right_label"]) == judged["unparseable"]
  audit.judge.model = str(raw)
  with pytest.raises(sft.ConfigError, match=r"^judge.model='.*' holds no model"):
    sft.audit(audit, tmp_path / "audit2")


def read_all(folder: pathlib.Path) -> list[dict]:
  return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) if not p.name.startswith("rejected")
          for line in p.read_text().splitlines()]


@pytest.mark.slow
def test_an_annotator_trained_on_a_separable_task_labels_held_out_records_right(tmp_path):
  """A tiny model trained here on texts whose label one keyword gives labels other records of the task
  (other ids, so other instruction paraphrases), given only the label set: by log-likelihood (the label
  task's default) and by generation."""
  import random

  import sft
  from sft.config import base_config

  rng = random.Random(0)
  words = ["river", "garden", "window", "market", "letter", "bridge", "candle", "ticket", "mirror", "pocket"]

  def text(label: str, word: str) -> str:
    return f"The sky over the {word} was {'sunny and bright' if label == 'sun' else 'rainy and grey'}."

  labels = ["sun", "rain"]
  # Every word with both labels alike: the keyword is the only thing that tells them apart.
  train = [{"text": text(label, word), "label": label, "labels": labels} for word in words for label in labels * 12]
  rng.shuffle(train)
  held_out = [{"text": text(label, word), "labels": labels, "truth": label} for word in words for label in labels]
  for folder, rows in (("train", train), ("unlabelled", held_out)):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / f"{folder}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  config = base_config()
  config.data.build.stdlib = False
  config.data.build.input_dir = str(tmp_path / "train")
  config.data.build.dedup.exact = False  # the texts are a few variations of two sentences by design
  config.data.build.dedup.near = False
  config.data.build.output.validation_fraction = 0.1
  config.tokenizer.vocab_size = 320  # what these few words can fill
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  config.train.update(seq_len=128, batch_size=16, pretrain_steps=0, sft_steps=200, lr=1e-2)  # every chat whole
  config.eval.update(every_steps=200, num_generations=0)
  config.checkpoint.every_steps = 200
  sft.train_and_evaluate(config, tmp_path / "model")

  for method in ("loglik", "generate"):
    build = build_config()
    build.input_dir = str(tmp_path / "unlabelled")
    build.gold_field = "truth"
    build.dedup.exact = build.dedup.near = False
    build.annotate.model = str(tmp_path / "model")
    build.annotate.label.method = method
    build.annotate.max_new_tokens = 8
    build.annotate.max_drop_fraction = 1.0
    sft.build_dataset(build, tmp_path / method, progress=False)
    labelled = [r for r in read_all(tmp_path / method) if r.get("annotated") == "label"]
    right = sum(r["messages"][-1]["content"] == r["gold"] for r in labelled)
    assert len(labelled) == 20 and right >= 19, (method, right, len(labelled))
