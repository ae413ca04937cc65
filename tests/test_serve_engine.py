"""The server's engine: continuous batching that changes no answer. A greedy answer is the evaluator's
greedy answer, whoever shares the batch and whichever slot it lands in; a sampled one depends on its seed
alone; slots are refilled while others decode; a cancelled request frees its slot."""

import threading

import jax
import numpy as np
import pytest
from serving_util import SEQ_LEN, make_workdir

from sft.evaluator.generate import make_generate, pad_prompts, strip_generation
from sft.evaluator.sampling import Sampler, sample_rows
from sft.serve import loading
from sft.serve.engine import Engine, Job, QueueFull, Sampling, Unavailable, _chunk_steps, bucket_of, buckets


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
  folder = make_workdir(tmp_path_factory.mktemp("serve-engine"), tokenizer)
  return loading.load_model(folder, "workdir", 1, 0)


def _engine(model, slots=4, chunk=4, max_waiting=64):
  return Engine(model, slots=slots, chunk=chunk, max_waiting=max_waiting, context=SEQ_LEN)


class Collector:
  """A job's events, and an event set when it ended."""

  def __init__(self):
    self.tokens, self.end, self.done = [], None, threading.Event()

  def __call__(self, kind, value):
    if kind == "token":
      self.tokens.append(value.id)
    else:
      self.end = (kind, value)
      self.done.set()


def _prompts(tokenizer, n):
  words = "json dumps loads string format shlex split text wrap dedent".split()
  chats = [[{"role": "user", "content": " ".join(words[(i + j) % len(words)] for j in range(1 + 5 * i))},
            {"role": "assistant", "content": "-"}] for i in range(n)]
  return [tokenizer.render_prompt(c)[0] for c in chats]


def _run(engine, prompts, samplings):
  """Every job through a started engine; (tokens, end) per job, in order."""
  collectors = [Collector() for _ in prompts]
  for prompt, sampling, collector in zip(prompts, samplings, collectors):
    engine.submit(Job(prompt, emit=collector, sampling=sampling))
  for c in collectors:
    assert c.done.wait(120), "a job never ended"
  return [(c.tokens, c.end) for c in collectors]


def _reference(model, prompt, max_tokens):
  tok = model.tokenizer
  generate = make_generate(model.run.model, max_new_tokens=max_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
  tokens_bp, lengths_b = pad_prompts([prompt], tok.pad_id)
  with model.run.on_mesh():
    row = np.asarray(generate(model.params, tokens_bp, lengths_b, jax.random.key(0)))[0]
  return strip_generation(row, tok.stop_ids)


def test_greedy_answers_are_the_evaluators_alone_or_batched_in_any_slot(model):
  prompts = _prompts(model.tokenizer, 7)  # more than the 4 slots: slots are refilled mid-run
  budgets = [3, 9, 5, 12, 1, 7, 10]
  engine = _engine(model)
  engine.start()
  try:
    batched = _run(engine, prompts, [Sampling(max_tokens=b) for b in budgets])
    alone = [_run(engine, [p], [Sampling(max_tokens=b)])[0] for p, b in zip(prompts, budgets)]
  finally:
    engine.stop(5)
  assert batched == alone
  for prompt, budget, (tokens, end) in zip(prompts, budgets, batched):
    assert tokens == _reference(model, prompt, max(budgets))[:budget]  # greedy: a shorter budget is a prefix
    assert end == ("done", "length" if len(tokens) == budget else "stop")
  assert engine.running == 0 and engine.waiting == 0


def test_a_seeded_answer_depends_on_its_seed_alone(model):
  prompts = _prompts(model.tokenizer, 3)
  sampled = Sampling(max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=2**40 + 3)
  engine = _engine(model, slots=2)
  engine.start()
  try:
    mixed = _run(engine, prompts, [sampled, Sampling(max_tokens=10), sampled])
    again = _run(engine, [prompts[2], prompts[0]], [sampled, sampled])
    other = _run(engine, [prompts[0]], [Sampling(max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=4)])
  finally:
    engine.stop(5)
  assert again == [mixed[2], mixed[0]]
  assert other[0][0] != mixed[0][0]


def test_a_cancelled_request_frees_its_slot_and_the_queue_is_bounded(model):
  engine = _engine(model, slots=1, max_waiting=2)
  engine.stop_ids = ()  # no answer ends before its budget: only the cancellation can end the long one
  prompts = _prompts(model.tokenizer, 4)
  gone, running = Collector(), Collector()
  never_started = Job(prompts[0], emit=gone, sampling=Sampling(max_tokens=8))
  long_job = Job(prompts[1], emit=None, sampling=Sampling(max_tokens=SEQ_LEN // 2))

  def leave_after_two(kind, value):  # the client leaves mid-answer, after its second token
    running(kind, value)
    if len(running.tokens) == 2:
      long_job.cancelled = True

  long_job.emit = leave_after_two
  engine.submit(never_started)
  engine.submit(long_job)
  with pytest.raises(QueueFull):  # two wait already
    engine.submit(Job(prompts[2], emit=Collector(), sampling=Sampling(max_tokens=2)))
  never_started.cancelled = True  # its client left while it waited
  engine.start()
  try:
    (tokens, end), = _run(engine, [prompts[3]], [Sampling(max_tokens=3)])  # the one slot is free again
  finally:
    engine.stop(5)
  assert gone.tokens == [] and not gone.done.is_set()
  assert len(running.tokens) == 2 and not running.done.is_set()  # stopped at once, nothing after
  assert end == ("done", "length") and len(tokens) == 3 and engine.running == 0 and engine.waiting == 0


def test_per_row_sampling_draws_as_the_sampler_does():
  logits_bv = jax.random.normal(jax.random.key(1), (5, 97)) * 3
  keys_b = jax.random.split(jax.random.key(2), 5)
  settings = [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.5)]
  temperature_b, top_k_b, top_p_b = (np.asarray(x) for x in zip(*settings))
  got = sample_rows(logits_bv, keys_b, temperature_b.astype(np.float32), top_k_b.astype(np.int32), top_p_b.astype(np.float32))
  for b, (t, k, p) in enumerate(settings):
    want = Sampler(temperature=t, top_k=k, top_p=p).per_row(logits_bv[b:b + 1], keys_b[b:b + 1])[0]
    assert int(got[b]) == int(want), (b, settings[b])


def test_chunks_and_buckets_keep_the_compiled_shapes_few():
  assert buckets(128) == [16, 32, 64, 128] and buckets(10) == [10]
  assert [bucket_of(n, 128) for n in (1, 16, 17, 100, 128)] == [16, 16, 32, 128, 128]
  assert [_chunk_steps(8, left) for left in (100, 8, 5, 4, 3, 2, 1)] == [8, 8, 8, 4, 4, 2, 1]


def test_an_engine_that_fails_tells_every_job_and_takes_no_more(model):
  engine = _engine(model, slots=2)
  prompts = _prompts(model.tokenizer, 3)

  def broken(*args, **kwargs):
    raise RuntimeError("device lost")

  engine._decode = broken  # noqa: SLF001  (the device fails mid-run)
  collectors = [Collector() for _ in prompts]
  for prompt, collector in zip(prompts, collectors):
    engine.submit(Job(prompt, emit=collector, sampling=Sampling(max_tokens=8)))
  engine.start()
  for c in collectors:
    assert c.done.wait(60)
  assert all(c.end[0] == "error" and "device lost" in c.end[1] for c in collectors)
  assert "device lost" in engine.failed
  with pytest.raises(Unavailable, match="device lost"):
    engine.submit(Job(prompts[0], emit=Collector(), sampling=Sampling(max_tokens=2)))


@pytest.mark.slow
def test_over_a_mesh_of_8_devices_the_engine_answers_as_on_one(tmp_path):
  """The slots sharded over 8 fake CPU devices (a fresh process), prompts prefilled one copy per shard:
  the same greedy answers and scored log-probabilities as one device gives."""
  import json
  import os
  import subprocess
  import sys

  import serve_multidevice_check
  from serving_util import make_hf_folder

  folder = make_hf_folder(tmp_path / "hf")
  script = os.path.join(os.path.dirname(__file__), "serve_multidevice_check.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, script, str(folder)], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  here = serve_multidevice_check.answers(folder, 8)
  assert sharded["devices"] == 8 and here["devices"] == 1
  assert sharded["tokens"] == here["tokens"] and all(len(t) >= 1 for t in here["tokens"])
  np.testing.assert_allclose(np.concatenate(sharded["logprobs"]), np.concatenate(here["logprobs"]), atol=2e-3)
