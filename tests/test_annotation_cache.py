"""The annotation cache: requests answered once per annotator, task and decoding; a process killed while
writing leaves every committed answer readable; a file that is no annotation cache is a clear error.
The model behind it here is a small deterministic stand-in (the real models are in test_annotator.py):
what is under test is what the cache sends it and gives back."""

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft.annotator import AnnotationCache, AnnotatorError, CachedAnnotator, Decoding, Generation, cache_key
from sft.annotator.cache import COLUMNS, TABLE, problem_of, request_of
from sft.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Echo:
  """Answers with a digest of the chat (and the seed), scores by length; records what it was asked."""

  def __init__(self, fingerprint="echo-1", drop=0):
    self.fingerprint, self.drop, self.asked = fingerprint, drop, []

  def generate(self, chats, decoding):
    self.asked.append([c[-1]["content"] for c in chats])
    out = [Generation(f"{_digest(c)}/{decoding.seed}", len(c) % 2 == 0) for c in chats]
    return out[: len(out) - self.drop]

  def log_likelihoods(self, chats, answers):
    self.asked.append(list(answers))
    return [-float(len(a)) - len(c) for c, a in zip(chats, answers)][: len(chats) - self.drop]


def _digest(chat):
  return hashlib.sha256(repr(chat).encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _chat(text):
  return [{"role": "user", "content": text}]


def test_repeats_hit_and_another_annotator_task_or_decoding_misses(tmp_path):
  cache, echo = AnnotationCache(tmp_path / "a.sqlite"), Echo()
  cached = CachedAnnotator(echo, cache, "fill")
  greedy = Decoding(max_new_tokens=16)
  chats = [_chat("a"), _chat("b"), _chat("a"), _chat("c")]
  first = cached.generate(chats, greedy)
  assert echo.asked == [["a", "b", "c"]] and (cached.hits, cached.misses) == (1, 3)  # the repeated "a" asked once
  assert first[0] == first[2] and len(cache) == 3
  assert cached.generate(chats[::-1], greedy) == first[::-1] and (cached.hits, cached.misses) == (5, 3)
  # The same decoding spelled another way is the same request.
  assert cached.generate(chats[:1], Decoding(max_new_tokens=16, temperature=0)) == first[:1] and cached.misses == 3
  for other in (
      CachedAnnotator(echo, cache, "label"),  # another task
      CachedAnnotator(Echo("echo-2"), cache, "fill"),  # another annotator
  ):
    other.generate(chats[:2], greedy)
    assert (other.hits, other.misses) == (0, 2)
  cached.generate(chats[:2], Decoding(max_new_tokens=16, seed=1))  # another decoding
  cached.generate(chats[:2], Decoding(max_new_tokens=17))
  assert cached.misses == 3 + 4 and len(cache) == 3 + 2 + 2 + 4

  scores = cached.log_likelihoods(chats, ["x", "yy", "x", "zzz"])
  assert scores == [-2.0, -3.0, -2.0, -4.0] and cached.misses == 7 + 3
  assert cached.log_likelihoods(chats[:2], ["x", "yyyy"]) == [-2.0, -5.0] and cached.misses == 7 + 4  # another answer


def test_the_table_reads_in_the_sqlite_shell_way(tmp_path):
  path = tmp_path / "a.sqlite"
  cached = CachedAnnotator(Echo(), AnnotationCache(path), "fill")
  cached.generate([_chat("héllo ✓")], Decoding(max_new_tokens=4))
  with sqlite3.connect(path) as conn:
    assert tuple(r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})")) == COLUMNS
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    key, fingerprint, task, request, response, created = conn.execute(f"SELECT * FROM {TABLE}").fetchone()
  assert (fingerprint, task) == ("echo-1", "fill") and "héllo ✓" in request and '"finished":false' in response
  assert len(key) == 64 and created.endswith("+00:00")


def test_an_annotator_that_returns_too_few_answers_is_an_error_and_nothing_is_stored(tmp_path):
  cache = AnnotationCache(tmp_path / "a.sqlite")
  cached = CachedAnnotator(Echo(drop=1), cache, "fill")
  with pytest.raises(AnnotatorError, match="returned 1 generations for 2 prompts"):
    cached.generate([_chat("a"), _chat("b")], Decoding())
  with pytest.raises(AnnotatorError, match="returned 1 log-likelihoods for 2 prompts"):
    cached.log_likelihoods([_chat("a"), _chat("b")], ["x", "y"])
  assert len(cache) == 0


def test_a_file_that_is_no_annotation_cache_is_a_one_line_error_and_is_left_alone(tmp_path):
  garbage = tmp_path / "garbage.sqlite"
  garbage.write_bytes(b"this is not a database at all, just some bytes\n" * 100)
  foreign = tmp_path / "foreign.sqlite"
  with sqlite3.connect(foreign) as conn:
    conn.execute("CREATE TABLE people (name TEXT)")
  conn.close()
  other_columns = tmp_path / "columns.sqlite"
  with sqlite3.connect(other_columns) as conn:
    conn.execute(f"CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, value TEXT)")
  conn.close()
  for path in (garbage, foreign, other_columns, tmp_path):
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ConfigError, match="annotation cache") as err:
      CachedAnnotator(Echo(), AnnotationCache(path), "fill").generate([_chat("a")], Decoding())
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert before is None or path.read_bytes() == before


def test_the_cache_pickles_as_its_path_and_reopens(tmp_path):
  cached = CachedAnnotator(Echo(), AnnotationCache(tmp_path / "a.sqlite"), "fill")
  first = cached.generate([_chat("a")], Decoding())
  again = pickle.loads(pickle.dumps(cached))
  assert not vars(again.cache._local)  # no connection travels
  assert again.generate([_chat("a")], Decoding()) == first and again.annotator.asked == [["a"]]  # from the file


WRITER = """
import sys
from sft.annotator.cache import AnnotationCache
assert "jax" not in sys.modules  # the data builder's workers open the cache without loading JAX
cache = AnnotationCache(sys.argv[1])
batch = 0
while True:
  cache.put_many([(f"{batch}-{row}", "fp", "fill", {"row": row}, {"text": "x" * 2000}) for row in range(50)])
  print(batch, flush=True)
  batch += 1
"""


def test_a_writer_killed_mid_write_leaves_every_committed_batch_readable(tmp_path):
  path = tmp_path / "a.sqlite"
  child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  committed, deadline = -1, time.time() + 60
  while committed < 20 and time.time() < deadline:
    line = child.stdout.readline()
    if not line:
      break
    committed = int(line)
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  child.stdout.close()
  assert committed >= 20, f"the writer stopped after batch {committed}"
  cache = AnnotationCache(path)
  found = cache.get_many([f"{b}-{r}" for b in range(committed + 1) for r in range(50)])
  assert len(found) == 50 * (committed + 1) and all(v == {"text": "x" * 2000} for v in found.values())
  assert len(cache) % 50 == 0  # the batch in flight is whole or absent
  assert cache.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# Any code point, controls and lone surrogates too (st.text leaves surrogates out).
CHARACTER = st.characters(exclude_categories=()) | st.characters(categories=["Cs"])
TEXT = st.lists(CHARACTER, min_size=1, max_size=20).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=6), seed=st.integers(0, 3))
def test_chats_of_any_unicode_are_keys_that_round_trip(tmp_path_factory, texts, seed):
  path = tmp_path_factory.mktemp("cache") / "a.sqlite"
  chats = [[{"role": "system", "content": t[::-1]}, *_chat(t)] for t in texts]
  decoding = Decoding(seed=seed)
  first = CachedAnnotator(Echo(), AnnotationCache(path), "fill").generate(chats, decoding)
  again = CachedAnnotator(Echo(), AnnotationCache(path), "fill")
  assert again.generate(chats, decoding) == first and again.annotator.asked == [] and again.hits == len(chats)
  keys = {cache_key("echo-1", "fill", {"kind": "generate", "chat": c, "answer": None, "decoding": None}) for c in chats}
  assert len(keys) == len({repr(c) for c in chats})  # distinct chats, distinct keys


def test_a_cache_another_process_holds_is_reported_busy_and_kept(tmp_path):
  path = tmp_path / "a.sqlite"
  CachedAnnotator(Echo(), AnnotationCache(path), "fill").generate([_chat("a")], Decoding())
  other = sqlite3.connect(path, isolation_level=None)  # a second build, or a sqlite3 shell, writing
  other.execute("BEGIN IMMEDIATE")
  try:
    with pytest.raises(ConfigError, match=r"in use by another process \(waited 0.2 s\)") as err:
      CachedAnnotator(Echo(), AnnotationCache(path, timeout_s=0.2), "fill").generate([_chat("b")], Decoding())
    assert "not an annotation cache" not in str(err.value) and "delete" not in str(err.value)
  finally:
    other.execute("ROLLBACK")
    other.close()
  again = CachedAnnotator(Echo(), AnnotationCache(path), "fill")
  again.generate([_chat("a"), _chat("b")], Decoding())
  assert (again.hits, again.misses) == (1, 1)  # the answer stored before is still there


def test_each_sqlite_failure_is_reported_as_what_to_do_about_it(tmp_path):
  """Real errors of the sqlite3 module, each with its own message: only a foreign file is worth deleting."""
  path = tmp_path / "a.sqlite"
  cache = AnnotationCache(path)
  cache.put_many([("k", "fp", "fill", {}, {"loglik": 0.0})])

  def error_of(action):
    with pytest.raises(sqlite3.Error) as err:
      action()
    return problem_of(path, err.value, 60)

  read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
  denied = error_of(lambda: read_only.execute(f"DELETE FROM {TABLE}"))
  read_only.close()
  assert "cannot be opened for writing" in str(denied) and "permissions" in str(denied) and "delete" not in str(denied)
  garbage = tmp_path / "garbage.sqlite"
  garbage.write_bytes(b"not a database " * 200)
  foreign = error_of(lambda: sqlite3.connect(garbage).execute("SELECT * FROM sqlite_master"))
  assert "not an annotation cache" in str(foreign) and "delete it" in str(foreign)
  closed = sqlite3.connect(path)
  closed.close()
  assert error_of(lambda: closed.execute("SELECT 1")) is None  # a misuse here is a bug: raised as it is
  cache.close()


def test_the_cache_serves_several_threads_at_once(tmp_path):
  cache = AnnotationCache(tmp_path / "a.sqlite")
  CachedAnnotator(Echo(), cache, "fill").generate([_chat("warm")], Decoding())  # a connection in this thread

  def annotate(t):
    cached = CachedAnnotator(Echo(), cache, "fill")
    return [cached.generate([_chat(f"{t}-{i}"), _chat("shared")], Decoding()) for i in range(5)]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(annotate, range(4)))
  assert len({a[1] for calls in answers for a in calls}) == 1  # the shared chat, one answer
  assert len(cache) == 1 + 4 * 5 + 1
  cache.close()


BAD_ROWS = ["{truncated", '{"txt": "x"}', '{"text": 3, "finished": true}', '{"text": "x"}', "null", "[]", b"\x00\xff"]


@pytest.mark.parametrize("bad", BAD_ROWS)
def test_a_row_that_is_no_answer_is_asked_again_and_overwritten(tmp_path, caplog, bad):
  path = tmp_path / "a.sqlite"
  first = CachedAnnotator(Echo(), AnnotationCache(path), "fill").generate([_chat("a")], Decoding())
  CachedAnnotator(Echo(), AnnotationCache(path), "score").log_likelihoods([_chat("a")], ["x"])
  with sqlite3.connect(path) as conn:
    conn.execute(f"UPDATE {TABLE} SET response = ?", (bad,))
  conn.close()
  caplog.set_level(logging.WARNING)
  calls = {
      "fill": (lambda c: c.generate([_chat("a")], Decoding()), first),
      "score": (lambda c: c.log_likelihoods([_chat("a")], ["x"]), [-2.0]),
  }
  for task, (call, fresh) in calls.items():
    cached = CachedAnnotator(Echo(), AnnotationCache(path), task)
    assert call(cached) == fresh
    assert (cached.hits, cached.misses, cached.unreadable) == (0, 1, 1) and cached.annotator.asked
    again = CachedAnnotator(Echo(), AnnotationCache(path), task)
    assert call(again) == call(cached) and (again.hits, again.unreadable, again.annotator.asked) == (1, 0, [])
  assert caplog.text.count("do not read back as answers") == 2 and str(path) in caplog.text
  assert len(AnnotationCache(path)) == 2  # overwritten in place


_FIELD = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3)
_RESPONSE = st.dictionaries(st.sampled_from(["text", "finished", "error", "loglik"]), _FIELD, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=st.text(max_size=30) | _RESPONSE.map(json.dumps))
def test_whatever_a_row_holds_the_cache_answers_and_never_fails(tmp_path_factory, stored):
  path = tmp_path_factory.mktemp("cache") / "a.sqlite"
  fresh = CachedAnnotator(Echo(), AnnotationCache(path), "fill").generate([_chat("a")], Decoding())
  with sqlite3.connect(path) as conn:
    conn.execute(f"UPDATE {TABLE} SET response = ?", (stored,))
  conn.close()
  cached = CachedAnnotator(Echo(), AnnotationCache(path), "fill")
  (got,) = cached.generate([_chat("a")], Decoding())
  assert isinstance(got, Generation) and isinstance(got.text, str) and isinstance(got.finished, bool)
  assert cached.hits + cached.unreadable == 1 and (cached.unreadable == 0 or [got] == fresh)


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 16.9), ("max_new_tokens", 16.0), ("max_new_tokens", True), ("max_new_tokens", "16"),
    ("seed", 1.5), ("top_k", None), ("temperature", math.nan), ("top_p", math.inf), ("temperature", "0"),
    ("temperature", False),
])
def test_a_decoding_of_the_wrong_type_is_refused_not_rounded(field, value):
  with pytest.raises(ValueError, match=f"Decoding.{field} must be"):
    Decoding(**{field: value})


@given(a=st.integers(0, 2**40), b=st.integers(0, 2**40), field=st.sampled_from(["max_new_tokens", "top_k", "seed"]))
def test_distinct_decodings_are_distinct_keys(a, b, field):
  def key(decoding):
    return cache_key("fp", "fill", request_of("generate", _chat("a"), decoding=decoding))

  assert (key(Decoding(**{field: a})) == key(Decoding(**{field: b}))) == (a == b)
  assert key(Decoding(temperature=0, top_p=1)) == key(Decoding(temperature=0.0, top_p=1.0))


def test_a_local_annotators_context_is_in_its_fingerprint(tmp_path):
  from sft.annotator.local import LocalAnnotator
  from sft.serve import loading

  for name in ("config.json", "tokenizer.json", "model.safetensors"):
    (tmp_path / name).write_text("{}")
  own = LocalAnnotator(str(tmp_path), "hf")
  assert own.fingerprint == loading.fingerprint_of(tmp_path, "hf")  # the default's is unchanged: old caches hit
  assert LocalAnnotator(str(tmp_path), "hf", context=0, batch_size=4).fingerprint == own.fingerprint
  given_context = {LocalAnnotator(str(tmp_path), "hf", context=n).fingerprint for n in (64, 64, 128)}
  assert len(given_context) == 2 and own.fingerprint not in given_context
