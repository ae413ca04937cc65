"""The local annotator on real (tiny, random-parameter) models: a training workdir and a Hugging Face
folder written by transformers. Its answers are the greedy decoding of the same prompts, in the input
order, from a few compiled shapes; its log-likelihoods are the model's; a sampled answer depends on its
own prompt and seed only; its fingerprint follows the files; it pickles as its path."""

import json
import pickle
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import serving_util  # noqa: E402

from sft import hf  # noqa: E402
from sft.annotator import AnnotationCache, CachedAnnotator, Decoding, Generation, open_annotator  # noqa: E402
from sft.annotator import batches as annotator_batches  # noqa: E402
from sft.annotator import local as annotator_local  # noqa: E402
from sft.errors import ConfigError  # noqa: E402
from sft.evaluator.generate import fit_prompts, make_generate, pad_prompts, prompt_room, strip_generation  # noqa: E402
from sft.model import Transformer  # noqa: E402
from sft.serve import loading  # noqa: E402
from sft.tokenizer import load_tokenizer  # noqa: E402
from sft.trainer import setup  # noqa: E402

SEQ_LEN = 64
NEW = 6
WORDS = "json dumps loads string format shlex split text wrap dedent encoder decoder".split()
# Prompts of many lengths (some past the room of 64 - 6 tokens), in no order of length.
CHATS = [
    [{"role": "user", "content": " ".join(WORDS[j % len(WORDS)] for j in range(n))}]
    for n in (3, 40, 1, 17, 9, 60, 25, 5, 12, 2, 33, 7)
]
TURNS = [{"role": "system", "content": "Be brief."}, *CHATS[2], {"role": "assistant", "content": "Yes."}, *CHATS[0]]
CHATS.insert(4, TURNS)  # a longer conversation
# Prompts of the smallest bucket (16 tokens) with either tokenizer: one compiled program.
SHORT = [[{"role": "user", "content": text}] for text in ("json", "dumps", "split text", "wrap", "loads", "shlex")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
  """(workdir, model, params): a training workdir with a checkpoint of random parameters."""
  return serving_util.tiny_workdir(tmp_path_factory.mktemp("run"), tokenizer, seq_len=SEQ_LEN, step=3)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """(folder, model, params): a Hugging Face llama folder with a chat-template tokenizer."""
  folder = serving_util.make_hf_folder(tmp_path_factory.mktemp("hf"))
  cfg, params = hf.load_model(folder)
  return folder, Transformer(cfg), params


# The workdir in the fast tier, the Hugging Face folder in the full suite too.
@pytest.fixture(scope="module", params=["workdir", pytest.param("hf", marks=pytest.mark.slow)])
def model(request, workdir, hf_folder):
  """(annotator, reference model, its params): each backend, opened with backend="auto"."""
  folder, reference, params = workdir if request.param == "workdir" else hf_folder
  annotator = open_annotator(str(folder), batch_size=4, context=SEQ_LEN, progress=False)
  assert annotator.backend == request.param
  return annotator, reference, params


def _prompts(tokenizer, chats):
  return [tokenizer.render_prompt([*c, {"role": "assistant", "content": "-"}])[0] for c in chats]


def _greedy(reference, params, tokenizer, prompts, max_new_tokens, stop_ids=None):
  """The greedy answers' ids of the evaluator's generation, all prompts in one batch."""
  stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
  generate = make_generate(reference, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=tokenizer.pad_id)
  tokens_bp, lengths_b = pad_prompts(prompts, tokenizer.pad_id)
  return np.asarray(generate(params, tokens_bp, lengths_b, jax.random.key(0)))


def test_generate_is_greedy_decoding_in_input_order_from_one_program_per_bucket(model):
  annotator, reference, params = model
  tok = annotator.model.tokenizer
  room = prompt_room(SEQ_LEN, NEW, "max_new_tokens")
  prompts, cut = fit_prompts(_prompts(tok, CHATS), room)
  lengths = sorted({len(p) for p in prompts})
  assert len(lengths) >= 7 and cut and lengths[-1] == room  # many lengths, some cut to the room
  before = annotator.prompts_cut
  got = annotator.generate(CHATS, Decoding(max_new_tokens=NEW))
  want = _greedy(reference, params, tok, prompts, NEW)
  stops = set(tok.stop_ids)
  assert got == [
      Generation(tok.decode(strip_generation(row, tok.stop_ids)), bool(set(row.tolist()) & stops))
      for row in want
  ]
  assert annotator.prompts_cut - before == len(cut)
  assert len({g.text for g in got}) > 3  # the answers differ: an order mix-up would show
  used = {annotator_batches.bucket_of(n, room) for n in lengths}
  programs = annotator.model.generators[(NEW, annotator_local.Sampler())]
  assert programs.decode._cache_size() == len(used) <= 3  # one decoding program per bucket
  widths = {(b, annotator_batches.prefill_width(n, b)) for n in lengths for b in [annotator_batches.bucket_of(n, room)]}
  assert programs.prefill._cache_size() == len(widths)  # one prefill program per bucket and width
  # Equal prompts are answered once, and alike.
  again = annotator.generate([CHATS[1], CHATS[0], CHATS[1]], Decoding(max_new_tokens=NEW))
  assert again == [got[1], got[0], got[1]]


def test_an_answer_cut_at_max_new_tokens_is_unfinished_and_one_that_stops_is_finished(hf_folder, tmp_path):
  folder, reference, params = hf_folder
  # The model's greedy tokens with no stop at all: an answer is their run up to its first stop id.
  tok = load_tokenizer(folder)
  raw = _greedy(reference, params, tok, _prompts(tok, SHORT), NEW, stop_ids=())
  # The same model, with the first token it answers SHORT[0] with declared an end of sequence.
  stops = tmp_path / "stops"
  shutil.copytree(folder, stops)
  (stops / "generation_config.json").write_text(json.dumps({"eos_token_id": int(raw[0, 0])}))
  annotator = open_annotator(str(stops), batch_size=4, context=SEQ_LEN, progress=False)
  assert annotator.fingerprint != open_annotator(str(folder)).fingerprint  # generation_config.json is the tokenizer's
  stop_ids = annotator.model.tokenizer.stop_ids
  assert int(raw[0, 0]) in stop_ids
  got = annotator.generate(SHORT, Decoding(max_new_tokens=NEW))
  assert got[0] == Generation("", True)
  for generation, row in zip(got, raw.tolist()):
    ended = [i for i, t in enumerate(row) if t in stop_ids]
    assert generation.finished == bool(ended)
    assert generation.text == tok.decode(row[: ended[0]] if ended else row)  # unfinished: all max_new_tokens of it
  assert not all(g.finished for g in got)


def test_log_likelihoods_are_the_models_own(model):
  annotator, reference, params = model
  tok = annotator.model.tokenizer
  chats = [CHATS[0], CHATS[4], CHATS[6], CHATS[0], CHATS[5]]
  answers = ["json loads", "It encodes text.", "split", "json loads", "dumps " * 40]  # the last is cut to the context
  before = annotator.prompts_cut
  got = annotator.log_likelihoods(chats, answers)
  # The full forward pass over each chat and answer (the last 65 tokens), right-padded to one (5, 64) batch.
  rows = []
  for chat, a in zip(chats, answers):
    turns = [*chat, {"role": "assistant", "content": a}]
    tokens, mask = tok.tokenize_chat(turns)
    prompt = tok.render_prompt(turns)[0]  # the answer's turn starts here: the chat's own "Yes." turn is context
    assert list(tokens[: len(prompt)]) == list(prompt)
    rows.append((tokens, [0] * len(prompt) + list(mask[len(prompt):])))
  assert sum(rows[1][1]) < sum(tok.tokenize_chat([*chats[1], {"role": "assistant", "content": answers[1]}])[1])
  long = sum(len(tokens) - 1 > SEQ_LEN for tokens, _ in rows)
  rows = [(tokens[-(SEQ_LEN + 1):], mask[-(SEQ_LEN + 1):]) for tokens, mask in rows]
  ids = np.zeros((len(rows), SEQ_LEN), np.int32)
  for r, (tokens, _) in enumerate(rows):
    ids[r, : len(tokens) - 1] = tokens[:-1]
  positions = np.tile(np.arange(SEQ_LEN), (len(rows), 1))
  logits = jax.jit(reference.apply)({"params": params}, ids, positions, np.ones_like(ids))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  want = [float(np.sum(logp[r, np.arange(len(t) - 1), t[1:]] * m[1:])) for r, (t, m) in enumerate(rows)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert annotator.prompts_cut - before == long >= 1
  assert got[0] == got[3] and all(isinstance(x, float) for x in got)
  assert annotator.model.score._cache_size() <= 3


def test_a_sampled_answer_depends_on_its_seed_and_prompt_never_on_its_batch_mates(model):
  annotator = model[0]
  sampled = Decoding(max_new_tokens=NEW, temperature=1.0, top_k=50, seed=11)
  alone = [annotator.generate([c], sampled)[0] for c in SHORT[:3]]
  together = annotator.generate([SHORT[4], SHORT[2], SHORT[5], SHORT[0], SHORT[3], SHORT[1]], sampled)
  assert [together[3], together[5], together[1]] == alone  # other rows beside them, other places in the batch
  reseeded = annotator.generate(SHORT[:3], Decoding(max_new_tokens=NEW, temperature=1.0, top_k=50, seed=12))
  assert reseeded != alone
  assert annotator.generate(SHORT[:3], Decoding(max_new_tokens=NEW)) != alone


def test_batches_in_flight_change_no_answer(model, monkeypatch):
  """Two batches at once on this one-device CPU (CPU_LANES) give the answers of one at a time, greedy or
  sampled: each batch runs the program it runs alone."""
  annotator = model[0]
  greedy, sampled = Decoding(max_new_tokens=NEW), Decoding(max_new_tokens=NEW, temperature=1.0, top_k=50, seed=5)
  monkeypatch.setattr(annotator, "_lanes", lambda: 2)
  in_flight = [annotator.generate(CHATS, d) for d in (greedy, sampled)]
  monkeypatch.setattr(annotator, "_lanes", lambda: 1)
  assert [annotator.generate(CHATS, d) for d in (greedy, sampled)] == in_flight
  assert len({g.text for g in in_flight[1]}) > 3


def test_lanes_keep_the_order_and_the_callers_settings_and_stop_at_an_error(model, monkeypatch):
  annotator = model[0]
  monkeypatch.setattr(annotator, "_lanes", lambda: 2)
  lock, running, peak, started = threading.Lock(), [0], [0], []

  def batch(i):
    with lock:
      running[0] += 1
      peak[0] = max(peak[0], running[0])
      started.append(i)
    time.sleep(0.01 * ((7 * i) % 3))  # finishing out of order
    with lock:
      running[0] -= 1
    if i == 6:
      raise RuntimeError("batch 6 failed")
    return i, annotator_local.use_cpu_kernels(), annotator_local.jax.sharding.get_abstract_mesh().shape_tuple

  got = []
  with annotator_local.cpu_kernels(False), pytest.raises(RuntimeError, match="batch 6 failed"):
    for item in annotator._in_lanes(batch, range(40)):
      got.append(item)
  assert [i for i, _, _ in got] == [0, 1, 2, 3, 4, 5]
  assert {on_cpu for _, on_cpu, _ in got} == {False}  # the caller's setting, in the lanes' threads
  mesh_shape = tuple(annotator.model.run.mesh.shape.items())
  assert {shape for _, _, shape in got} == {mesh_shape}
  assert peak[0] == 2 and max(started) <= 8  # two at a time; nothing queued behind the error runs


def test_the_fingerprint_follows_the_files_without_loading_the_model(workdir, tmp_path):
  folder = workdir[0]
  annotator = open_annotator(str(folder), "workdir", batch_size=4, progress=False)
  print_ = annotator.fingerprint
  assert len(print_) == 16 and int(print_, 16) >= 0 and annotator._model is None
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  (copy / "metrics.jsonl").write_text("{}\n")  # not a file of the model
  assert open_annotator(str(copy)).fingerprint == print_
  weights = max((p for p in (copy / setup.CHECKPOINTS / "3").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  assert open_annotator(str(copy)).fingerprint != print_


def test_a_loaded_annotator_pickles_as_its_path_and_settings(model):
  annotator = model[0]
  decoding = Decoding(max_new_tokens=NEW)
  answers = annotator.generate(SHORT[:2], decoding)
  blob = pickle.dumps(annotator)
  assert len(blob) < 2_000  # not the parameters
  again = pickle.loads(blob)
  assert again._model is None and again.path == annotator.path and again.batch_size == 4
  assert again.fingerprint == annotator.fingerprint
  assert again.generate(SHORT[:2], decoding) == answers


def test_the_cache_answers_a_repeat_without_the_model(model, tmp_path):
  annotator = model[0]
  cached = CachedAnnotator(annotator, AnnotationCache(tmp_path / "cache.sqlite"), "fill")
  decoding = Decoding(max_new_tokens=NEW)
  first = cached.generate(SHORT[:4], decoding)
  assert first == annotator.generate(SHORT[:4], decoding) and (cached.hits, cached.misses) == (0, 4)
  assert cached.generate(SHORT[:4], decoding) == first and (cached.hits, cached.misses) == (4, 4)
  scores = cached.log_likelihoods(SHORT[:2], ["a", "b"])
  assert cached.log_likelihoods(SHORT[:2], ["a", "b"]) == scores and cached.misses == 6
  assert pickle.loads(pickle.dumps(cached)).generate(SHORT[:4], decoding) == first


def test_what_is_no_model_is_a_one_line_error_naming_the_key(workdir, hf_folder, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(workdir[0] / "config.json", untrained / "config.json")
  weightless = tmp_path / "weightless"
  shutil.copytree(hf_folder[0], weightless)
  for p in weightless.glob("*.safetensors"):
    p.unlink()
  cases = [
      (tmp_path / "missing", "auto", "is not a folder"),
      (empty, "auto", "holds no model"),
      (untrained, "auto", "has no checkpoint"),
      (empty, "workdir", "has no config.json"),
      (weightless, "hf", r"has no \*\.safetensors"),
      (empty, "openai", "must be one of"),
  ]
  for path, backend, message in cases:
    with pytest.raises(ConfigError, match=message) as err:
      open_annotator(str(path), backend)
    assert "\n" not in str(err.value)
    assert backend == "openai" or "annotate.model=" in str(err.value)


@given(st.lists(st.integers(1, 2048), max_size=40), st.integers(1, 9))
def test_prefill_groups_take_every_prompt_once_at_a_width_that_fits_it(lengths, rows):
  bucket = max([16, *lengths])
  groups = list(annotator_batches.prefill_groups(lengths, bucket, rows))
  assert sorted(i for _, members in groups for i in members) == list(range(len(lengths)))
  for width, members in groups:
    assert 1 <= len(members) <= rows
    assert all(lengths[i] <= width == annotator_batches.prefill_width(lengths[i], bucket) for i in members)
    assert width == bucket or width % annotator_batches.PREFILL_STEP == 0
    assert width < max(lengths[i] for i in members) + annotator_batches.PREFILL_STEP  # no more padding than a step


def test_buckets_and_the_hf_context():
  buckets = annotator_batches.buckets
  assert buckets(100) == [16, 32, 64, 100] and buckets(10) == [10] and buckets(32) == [16, 32]
  batches = list(annotator_batches.by_bucket([40, 3, 17, 16, 2, 100], 100, 2))
  assert batches == [(16, [4, 1]), (16, [3]), (32, [2]), (64, [0]), (100, [5])]


def test_a_hugging_face_context_is_capped_by_its_positions(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
  assert loading._hf_context(tmp_path, 0) == 512 and loading._hf_context(tmp_path, 100) == 100
  assert loading._hf_context(tmp_path, 4096) == 512
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  assert loading._hf_context(tmp_path, 0) == loading.DEFAULT_CONTEXT
