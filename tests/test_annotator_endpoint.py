"""The endpoint annotator (sft/annotator/endpoint.py) against a small OpenAI-shaped server on 127.0.0.1:
answers in order, the concurrency limit, retries, failures as counted drops in a real build, malformed
answers, an unreachable server, the API key, the config's rules and the cache."""

import http.server
import json
import logging
import pickle
import socket
import threading
import time

import pytest
import test_annotation_build as annotation_build
from hypothesis import given, settings
from hypothesis import strategies as st

import sft
from sft import jobs
from sft.annotator import AnnotationCache, CachedAnnotator, Decoding, Generation
from sft.annotator.endpoint import EndpointAnnotator, fingerprint_of, open_endpoint
from sft.databuilder import build, build_config
from sft.databuilder.annotate.common import failure
from sft.databuilder.config import build_problems
from sft.errors import ConfigError

SECRET = "sk-test-5f2b9c0d1e"
DECODING = Decoding(max_new_tokens=16, temperature=0.0, top_p=0.9, seed=7)


def _chat(text: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": text}]


def _completion(content, finish_reason="stop") -> dict:
  message = {"role": "assistant", "content": content}
  return {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}


def echo(body: dict) -> tuple[int, dict, bytes]:
  """The default answer: "A: " and the last user turn; a prompt that says "long" stops at max_tokens."""
  said = body["messages"][-1]["content"]
  return 200, {}, json.dumps(_completion(f"A: {said}", "length" if "long" in said else "stop")).encode()


def _lower(headers) -> dict[str, str]:
  return {name.lower(): value for name, value in headers.items()}


def failing_on(words, status: int, message: str):
  """An answer function: `status` with `message` for a prompt holding one of `words`, else `echo`."""
  error = json.dumps({"error": {"message": message}}).encode()
  return lambda body: (status, {}, error) if any(w in body["messages"][-1]["content"] for w in words) else echo(body)


class Server:
  """An OpenAI-shaped HTTP server whose answers a test sets: `answer(body) -> (status, headers, bytes)`
  for each POST /v1/chat/completions, `models` (or `models_status`) for GET /v1/models. It keeps every
  request and the most requests it had in flight at once."""

  def __init__(self):
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _send(self, status, headers, body):
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
          self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

      def do_GET(self):
        owner.requests.append(("GET", self.path, _lower(self.headers), None))
        self._send(owner.models_status, {}, json.dumps(owner.models).encode())

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with owner.lock:
          owner.requests.append(("POST", self.path, _lower(self.headers), body))
          owner.in_flight += 1
          owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
          time.sleep(owner.delay(body))
          status, headers, answer = owner.answer(body)
        finally:
          with owner.lock:
            owner.in_flight -= 1
        self._send(status, dict(headers), answer)

    self.lock = threading.Lock()
    self.reset()
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def reset(self):
    self.answer, self.delay = echo, lambda body: 0.0
    self.models, self.models_status = {"object": "list", "data": [{"id": "tiny", "object": "model"}]}, 200
    self.requests, self.in_flight, self.max_in_flight = [], 0, 0

  def posts(self) -> list[dict]:
    return [body for method, _, _, body in self.requests if method == "POST"]


@pytest.fixture(scope="module")
def server_module():
  server = Server()
  yield server
  server.httpd.shutdown()
  server.httpd.server_close()


@pytest.fixture
def server(server_module, monkeypatch):
  server_module.reset()
  monkeypatch.delenv("SFT_API_KEY", raising=False)
  return server_module


def _closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/v1"


def test_answers_come_back_in_order_with_the_decoding_sent(server):
  server.delay = lambda body: 0.02 * (6 - int(body["messages"][-1]["content"][-1]))  # the first answers last
  annotator = open_endpoint(server.url, concurrency=4, progress=False)
  chats = [_chat(f"question {i}") for i in range(6)] + [_chat("question 2"), _chat("long question 5")]
  out = annotator.generate(chats, DECODING)
  assert [g.text for g in out] == [f"A: question {i}" for i in range(6)] + ["A: question 2", "A: long question 5"]
  assert [g.finished for g in out] == [True] * 7 + [False] and all(g.error == "" for g in out)
  posts = server.posts()
  assert len(posts) == 7  # the repeated chat was asked once
  sent = {(p["model"], p["max_tokens"], p["temperature"], p["top_p"], p["seed"]) for p in posts}
  assert sent == {("tiny", 16, 0.0, 0.9, 7)}
  assert all(p["messages"] == _chat(p["messages"][0]["content"]) for p in posts)
  assert annotator.generate([], DECODING) == []


def test_no_more_requests_in_flight_than_the_concurrency(server):
  server.delay = lambda body: 0.3
  out = open_endpoint(server.url, concurrency=3, progress=False).generate([_chat(f"q{i}") for i in range(7)], DECODING)
  assert len(out) == 7 and server.max_in_flight == 3


def test_500_and_429_are_retried_with_backoff_and_retry_after(server):
  tries: dict[str, int] = {}

  def flaky(body):
    said = body["messages"][-1]["content"]
    tries[said] = tries.get(said, 0) + 1
    if said == "busy" and tries[said] == 1:
      return 500, {}, b'{"error": {"message": "overloaded"}}'
    if said == "limited" and tries[said] <= 2:
      return 429, {"Retry-After": "0.4"}, b'{"error": {"message": "slow down"}}'
    return echo(body)

  server.answer = flaky
  start = time.monotonic()
  out = open_endpoint(server.url, retries=2, progress=False).generate([_chat("busy"), _chat("limited")], DECODING)
  assert [g.text for g in out] == ["A: busy", "A: limited"] and all(g.finished and not g.error for g in out)
  assert tries == {"busy": 2, "limited": 3}
  assert time.monotonic() - start >= 0.8  # the two waits Retry-After asked for


def test_a_request_that_still_fails_after_its_retries_is_an_error_generation(server):
  server.answer = failing_on(("bad",), 503, "down for maintenance")
  chats = [_chat("good"), _chat("bad"), _chat("fine")]
  out = open_endpoint(server.url, retries=1, progress=False).generate(chats, DECODING)
  assert [g.text for g in out] == ["A: good", "", "A: fine"]
  assert out[1].error and "503" in out[1].error and "maintenance" in out[1].error and not out[1].finished
  assert sum(p["messages"][-1]["content"] == "bad" for p in server.posts()) == 2  # one try and one retry
  assert failure(out[1], 16) == ("annotator error", out[1].error)  # before the truncated check
  assert failure(out[0], 16) is None


BROKEN = [
    (b"<html>Bad gateway</html>", "not JSON"),
    (b"{}", "no choices"),
    (b'{"choices": []}', "no choices"),
    (b'{"choices": "text"}', "no choices"),
    (b'{"choices": [{"message": {"content": null}, "finish_reason": "stop"}]}', "no message text"),
    (b'{"choices": [{"text": "legacy completion", "finish_reason": "stop"}]}', "no message text"),
    (json.dumps(_completion("filtered", "content_filter")).encode(), "finish_reason 'content_filter'"),
    (json.dumps(_completion("no reason", None)).encode(), "finish_reason 'None'"),
]


@pytest.mark.parametrize("body, error", BROKEN)
def test_an_answer_that_breaks_the_api_shape_is_a_per_record_error(server, body, error):
  server.answer = lambda request: (200, {}, body) if request["messages"][-1]["content"] == "x" else echo(request)
  out = open_endpoint(server.url, progress=False).generate([_chat("x"), _chat("y")], DECODING)
  assert error in out[0].error and out[0].text == "" and not out[0].finished
  assert out[1] == Generation("A: y", True)


_NAMES = st.sampled_from(["choices", "message", "content", "finish_reason", "data"])
_REASONS = st.sampled_from(["stop", "length", None, "eos_token", 3])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_NAMES | st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
_ANSWERS = st.one_of(
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda c, r: json.dumps(_completion(c, r)).encode(), _JSON, _REASONS),
    st.binary(max_size=40),
)


@settings(max_examples=40, deadline=None)
@given(body=_ANSWERS, status=st.sampled_from([200, 200, 400, 422]))
def test_any_answer_a_server_gives_is_a_generation_or_an_error(server_module, body, status):
  server_module.reset()
  server_module.answer = lambda request: (status, {}, body)
  out = open_endpoint(server_module.url, retries=0, progress=False).generate([_chat("q")], DECODING)
  assert len(out) == 1 and isinstance(out[0], Generation)
  if status != 200:
    assert str(status) in out[0].error
  elif not out[0].error:  # an answer: exactly the first choice's text, as the API shapes it
    choice = json.loads(body)["choices"][0]
    assert out[0].text == choice["message"]["content"] and out[0].finished == (choice["finish_reason"] != "length")
  else:
    assert out[0].text == "" and not out[0].finished  # an error carries no answer
  if status == 200 and _well_formed(body):
    assert not out[0].error


def _well_formed(body: bytes) -> bool:
  try:
    choice = json.loads(body)["choices"][0]
    return isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length", "eos_token")
  except (ValueError, TypeError, KeyError, IndexError):
    return False


def test_an_unreachable_server_is_one_config_error_naming_the_url_on_first_use():
  url = _closed_port_url()
  annotator = open_endpoint(url, retries=0, progress=False)  # sends nothing yet
  for use in (lambda: annotator.generate([_chat(f"q{i}") for i in range(50)], DECODING), lambda: annotator.fingerprint):
    with pytest.raises(ConfigError, match="cannot be reached") as err:
      use()
    assert url in str(err.value) and "annotate.model" in str(err.value) and "\n" not in str(err.value)


def test_answers_every_request_would_get_are_config_errors(server):
  server.models_status = 401
  with pytest.raises(ConfigError, match=r"401.*SFT_API_KEY") as err:
    open_endpoint(server.url, progress=False).generate([_chat("q")], DECODING)
  assert "\n" not in str(err.value)
  server.reset()
  server.answer = lambda body: (404, {}, b'{"error": {"message": "model not found"}}')
  with pytest.raises(ConfigError, match=r"404.*annotate.endpoint.model"):
    open_endpoint(server.url, model="typo", progress=False).generate([_chat("q")], DECODING)
  server.reset()
  server.models = {"object": "list", "data": []}
  with pytest.raises(ConfigError, match="lists no model.*annotate.endpoint.model"):
    open_endpoint(server.url, progress=False).generate([_chat("q")], DECODING)


def test_the_api_key_is_a_bearer_header_from_the_environment_and_never_logged_or_pickled(server, monkeypatch, caplog):
  monkeypatch.setenv("SFT_TEST_KEY", SECRET)
  caplog.set_level(logging.DEBUG)
  annotator = open_endpoint(server.url, api_key_env="SFT_TEST_KEY", retries=0, progress=False)
  server.answer = lambda body: (500, {}, b"{}") if body["messages"][-1]["content"] == "fails" else echo(body)
  out = annotator.generate([_chat("q"), _chat("fails")], DECODING)
  assert {headers.get("authorization") for _, _, headers, _ in server.requests} == {f"Bearer {SECRET}"}
  shown = caplog.text + repr(annotator) + out[1].error + str(pickle.dumps(annotator))
  assert SECRET not in shown and "SFT_TEST_KEY" in caplog.text
  with pytest.raises(ConfigError) as err:  # the key itself given as the setting: refused, not echoed
    open_endpoint(server.url, api_key_env=SECRET)
  assert SECRET not in str(err.value)
  config = build_config()
  config.annotate.endpoint.api_key_env = SECRET
  assert SECRET not in " ".join(build_problems(config))

  server.reset()
  open_endpoint(server.url, api_key_env="SFT_UNSET_KEY", progress=False).generate([_chat("q")], DECODING)
  assert all("authorization" not in headers for _, _, headers, _ in server.requests)


def test_the_model_and_the_fingerprint_come_from_the_server_and_survive_pickling(server):
  server.models = {"data": [{"id": "first"}, {"id": "second", "fingerprint": "weights-1"}]}
  first = open_endpoint(server.url, progress=False)
  assert first.model == "first" and first.fingerprint == fingerprint_of(server.url, "first")
  second = open_endpoint(server.url + "/", model="second", progress=False)
  assert second.fingerprint == fingerprint_of(server.url, "second", "weights-1") != fingerprint_of(server.url, "second")
  server.models = {"data": [{"id": "first"}, {"id": "second", "fingerprint": "weights-2"}]}
  assert open_endpoint(server.url, model="second").fingerprint != second.fingerprint  # new weights miss the cache
  copy = pickle.loads(pickle.dumps(first))
  assert copy.fingerprint == first.fingerprint and copy.generate([_chat("q")], DECODING)[0].text == "A: q"
  assert [p["model"] for p in server.posts()] == ["first"]  # what the first probe chose, whatever lists first now


def test_an_endpoint_scores_nothing(server):
  with pytest.raises(ConfigError, match="annotate.label.method='generate'"):
    open_endpoint(server.url).log_likelihoods([_chat("q")], ["a"])


def test_the_config_takes_a_url_and_refuses_what_an_endpoint_cannot_do(tmp_path):
  config = build_config()
  config.input_dir = str(tmp_path)
  config.annotate.model = "http://127.0.0.1:8000/v1"
  assert build_problems(config) == [
      "annotate.label.method='loglik' needs log-likelihoods, which an OpenAI-compatible endpoint cannot give: "
      "set annotate.label.method='generate'"
  ]
  config.annotate.label.method = "generate"
  assert build_problems(config) == []
  config.annotate.backend = "endpoint"
  assert build_problems(config) == []
  config.annotate.backend = "hf"
  assert build_problems(config) == [
      "annotate.model='http://127.0.0.1:8000/v1' is a URL: set annotate.backend='endpoint' (or 'auto'), not 'hf'"
  ]
  config.annotate.backend = "endpoint"
  config.annotate.model = str(tmp_path)
  assert build_problems(config) == [
      f"annotate.model={str(tmp_path)!r} is no URL: the endpoint backend needs the server's base URL"
  ]
  config.annotate.model = "https://api.example.com/v1"
  settings_given = {"model": "m", "api_key_env": "EXAMPLE_KEY", "timeout_s": 5.0, "retries": 0, "concurrency": 2}
  config.annotate.endpoint.update(settings_given)
  annotator = jobs.open_annotator(config)
  assert isinstance(annotator, EndpointAnnotator) and annotator.url == "https://api.example.com/v1"
  a = annotator
  opened = (a.model_setting, a.api_key_env, a.timeout_s, a.retries, a.concurrency)
  assert opened == tuple(settings_given.values())
  for name, value in (("timeout_s", 0.0), ("retries", -1), ("concurrency", 0)):
    config.annotate.endpoint[name] = value
    assert any(p.startswith(f"annotate.endpoint.{name}: must be") for p in build_problems(config))


def test_a_rerun_takes_the_answers_from_the_cache(server, tmp_path):
  cache = AnnotationCache(tmp_path / "annotations.sqlite")
  chats = [_chat(f"q{i}") for i in range(5)]
  first = CachedAnnotator(open_endpoint(server.url, progress=False), cache, "fill")
  assert [g.text for g in first.generate(chats, DECODING)] == [f"A: q{i}" for i in range(5)]
  again = CachedAnnotator(open_endpoint(server.url, progress=False), cache, "fill")
  assert [g.text for g in again.generate(chats, DECODING)] == [f"A: q{i}" for i in range(5)]
  assert (again.hits, again.misses, len(server.posts())) == (5, 0, 5)


def test_a_failed_request_is_not_cached(server, tmp_path):
  cache = AnnotationCache(tmp_path / "annotations.sqlite")
  server.answer = lambda body: (500, {}, b"{}")
  annotator = CachedAnnotator(open_endpoint(server.url, retries=0, progress=False), cache, "fill")
  out = annotator.generate([_chat("q")], DECODING)
  assert out[0].error
  server.reset()
  again = CachedAnnotator(open_endpoint(server.url, progress=False), cache, "fill").generate([_chat("q")], DECODING)
  assert again[0] == Generation("A: q", True)  # asked again, not the stored failure


@pytest.mark.parametrize("cache", [False, True])
def test_a_build_through_an_endpoint_drops_what_keeps_failing_counted(server, tmp_path, cache):
  raw = annotation_build.raw_folder(tmp_path / "raw")
  server.answer = failing_on(("river number 3 ", "river number 17 "), 500, "kernel panic")
  config = annotation_build.config_of(str(raw))
  config.annotate.model = server.url
  config.annotate.label.method = "generate"
  config.annotate.endpoint.retries = 0
  config.annotate.cache = cache
  manifest = sft.build_dataset(config, tmp_path / "out", progress=False)
  total = manifest["accounting"]["total"]
  n = annotation_build.NUM_RECORDS
  assert (total["read"], total["kept"], total["dropped"]) == (n, n - 2, 2)
  (source,) = manifest["accounting"]["by_source"].values()
  assert source["dropped_by_reason"] == {"annotate: fill: annotator error": 2}
  rejected = [json.loads(line) for p in (tmp_path / "out").glob("rejected-*.jsonl") for line in p.open()]
  details = [r["dropped"]["detail"] for r in rejected]
  assert len(details) == 2 and all("500" in d and "kernel panic" in d for d in details)
  assert manifest["annotation"]["annotator"]["fingerprint"] == fingerprint_of(server.url, "tiny")
  assert (tmp_path / "out" / build.CACHE).is_file() == cache


class _Failing:
  """An annotator whose every request failed after its retries."""

  fingerprint = "failing"

  def generate(self, chats, decoding):
    return [Generation("", False, "HTTP 503: overloaded") for _ in chats]


def test_the_judge_and_self_instruct_count_a_failed_request_as_an_annotator_error():
  from sft.databuilder import records
  from sft.databuilder.annotate.judge import judge_batch
  from sft.databuilder.annotate.self_instruct import self_instruct

  chat = {"id": "r1", "kind": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  (judged,) = judge_batch([chat], _Failing(), DECODING, "rubric", 3)
  assert records.is_dropped(judged) and "annotator error" in json.dumps(judged) and "overloaded" in json.dumps(judged)
  params = {"num_instructions": 2, "examples_per_prompt": 1, "seed": 0, "max_similarity": 0.7}
  rejected = self_instruct([chat], _Failing(), DECODING, params)
  assert len(rejected) == 2 and all("self-instruct: annotator error" in json.dumps(r) for r in rejected)


def _vllm_models(root: str) -> dict:
  """A vLLM-shaped GET /models: no weights' fingerprint; `created` and the permission ids new per request."""
  permission = {"id": f"modelperm-{time.monotonic_ns()}", "object": "model_permission", "created": time.time_ns()}
  entry = {"id": "tiny", "object": "model", "created": time.time_ns(), "owned_by": "vllm", "root": root,
           "parent": None, "max_model_len": 2048, "permission": [permission]}
  return {"object": "list", "data": [entry]}


def test_other_weights_behind_a_server_that_lists_no_fingerprint_miss_the_cache(server, tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  cache = AnnotationCache(tmp_path / "annotations.sqlite")
  fingerprints = []
  for root in ("/models/a", "/models/a", "/models/b"):
    server.models = _vllm_models(root)
    server.answer = lambda body, root=root: (200, {}, json.dumps(_completion(f"{root} says 4")).encode())
    cached = CachedAnnotator(open_endpoint(server.url, progress=False), cache, "fill")
    assert cached.generate([_chat("2+2?")], DECODING)[0].text == f"{root} says 4"  # never the old model's answer
    fingerprints.append(cached.fingerprint)
  assert fingerprints[0] == fingerprints[1] != fingerprints[2]  # the same model hits, whatever the request's time
  assert len(server.posts()) == 2 and len(cache) == 2
  assert caplog.text.count("lists no weights' fingerprint") == 3 and "/models/b" in caplog.text
  caplog.clear()
  server.models = {"data": [{"id": "tiny", "fingerprint": "w1", "max_model_len": 64}]}  # sft serve's
  open_endpoint(server.url, progress=False).generate([_chat("q")], DECODING)
  assert "lists no weights' fingerprint" not in caplog.text


def test_an_answer_from_other_weights_than_listed_stops_the_call_and_stores_nothing(server, tmp_path):
  server.models = {"data": [{"id": "tiny", "fingerprint": "w1"}]}
  weights = {"now": "w1"}

  def answer(body):
    said = body["messages"][-1]["content"]
    return 200, {}, json.dumps({**_completion(f"A: {said}"), "system_fingerprint": weights["now"]}).encode()

  server.answer = answer
  cache = AnnotationCache(tmp_path / "annotations.sqlite")
  annotator = pickle.loads(pickle.dumps(open_endpoint(server.url, progress=False)))  # a worker's copy
  cached = CachedAnnotator(annotator, cache, "fill")
  assert cached.generate([_chat("a")], DECODING) == [Generation("A: a", True)]
  weights["now"] = "w2"  # the server restarted on other weights
  with pytest.raises(ConfigError, match=r"answered with the weights 'w2', not the 'w1'.*run the build again") as err:
    cached.generate([_chat("b"), _chat("c")], DECODING)
  assert "\n" not in str(err.value) and len(cache) == 1
  server.answer = echo  # no system_fingerprint in the answer: nothing to compare
  assert cached.generate([_chat("d")], DECODING) == [Generation("A: d", True)]


def test_an_answer_that_is_not_valid_in_its_charset_is_an_error_and_not_cached(server, tmp_path):
  text = json.dumps(_completion("café"), ensure_ascii=False)
  bodies = {
      "utf8": ({}, text.encode()),
      "broken": ({}, text.encode().replace("é".encode(), b"\xe9\xff")),
      "latin": ({"Content-Type": "application/json; charset=latin-1"}, text.encode("latin-1")),
      "unknown": ({"Content-Type": "application/json; charset=no-such-charset"}, text.encode()),
  }
  server.answer = lambda body: (200, *bodies[body["messages"][-1]["content"]])
  cache = AnnotationCache(tmp_path / "annotations.sqlite")
  out = CachedAnnotator(open_endpoint(server.url, progress=False), cache, "fill").generate(
      [_chat(name) for name in bodies], DECODING
  )
  assert out[0] == out[2] == Generation("café", True)
  assert "not valid UTF-8" in out[1].error and out[1].text == "" and "\ufffd" not in out[1].error
  assert "not valid no-such-charset" in out[3].error
  assert failure(out[1], 16) == ("annotator error", out[1].error) and len(cache) == 2
