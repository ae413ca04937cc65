"""`sft serve`'s HTTP API with real clients: the `openai` package and plain HTTP against a server running in
this process (a tiny training workdir and a tiny Hugging Face folder), and hostile requests, which get
OpenAI's JSON error bodies and never a 5xx."""

import json
import threading

import httpx2
import jax
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_util import make_hf_folder, make_workdir, running_server
from serving_util import test_config as serve_config

from sft.serve import protocol

GREEDY = dict(model="tiny", temperature=0)
HELLO = [{"role": "user", "content": "What does json.dumps do?"}]


class Served:
  """A running server: its API's base URL, the Server, an OpenAI client and an HTTP client."""

  def __init__(self, base, server):
    self.base, self.server = base, server
    self.root = base.removesuffix("/v1")
    self.client = openai.OpenAI(base_url=base, api_key="-", max_retries=0)
    self.http = httpx2.Client(timeout=60)

  def post(self, path, body=None, **kw):
    return self.http.post(self.base + path, json=body, **kw) if body is not None else self.http.post(self.base + path, **kw)


@pytest.fixture(scope="module", params=["workdir", pytest.param("hf", marks=pytest.mark.slow)])
def served(request, tmp_path_factory, tokenizer):
  folder = tmp_path_factory.mktemp(request.param) / "model"
  folder = make_workdir(folder, tokenizer) if request.param == "workdir" else make_hf_folder(folder)
  with running_server(serve_config(), folder) as (base, server):
    served = Served(base, server)
    yield served
    served.http.close()


def _error(response, status):
  """The response is OpenAI's error body with `status`; returns its "error" object."""
  assert response.status_code == status, response.text
  assert response.headers["content-type"].startswith("application/json")
  error = response.json()["error"]
  assert isinstance(error["message"], str) and error["message"] and "type" in error
  return error


def _stream_text(chunks):
  texts, finishes = {}, {}
  for chunk in chunks:
    for c in chunk.choices:
      texts[c.index] = texts.get(c.index, "") + (getattr(c, "delta", None) and c.delta.content or getattr(c, "text", "") or "")
      finishes[c.index] = c.finish_reason or finishes.get(c.index)
  return texts, finishes


# --- answers ----------------------------------------------------------------------------------------------


def test_a_streamed_greedy_chat_is_the_answer_given_whole(served):
  whole = served.client.chat.completions.create(messages=HELLO, max_tokens=20, **GREEDY)
  answer = whole.choices[0]
  assert answer.message.role == "assistant" and answer.finish_reason in ("stop", "length")
  assert whole.usage.completion_tokens <= 20 and whole.system_fingerprint == served.server.fingerprint
  chunks = list(served.client.chat.completions.create(
      messages=HELLO, max_tokens=20, stream=True, stream_options={"include_usage": True}, **GREEDY))
  texts, finishes = _stream_text(chunks)
  assert texts == {0: answer.message.content} and finishes == {0: answer.finish_reason}
  assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_n_choices_and_seeds_repeat_at_temperature_1(served):
  def answers(seed, prompt="Write a function."):
    out = served.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], n=3, seed=seed, temperature=1.0, max_tokens=12)
    assert [c.index for c in out.choices] == [0, 1, 2]
    return [c.message.content for c in out.choices]

  first = answers(7)
  assert answers(7) == first
  assert len(set(first)) > 1  # the choices of one request are drawn apart
  assert any(answers(1000 + s, p) != answers(2000 + s, p) for s, p in enumerate(["Hi", "Write a function.", "x"]))


def _greedy_tokens(served, max_tokens=24):
  """A greedy chat answer, its tokens' texts and finish reason."""
  out = served.client.chat.completions.create(messages=HELLO, max_tokens=max_tokens, logprobs=True, **GREEDY).choices[0]
  return out.message.content, [t.token for t in out.logprobs.content], out.finish_reason


def test_logprob_tokens_join_to_the_answer(served):
  text, tokens, _ = _greedy_tokens(served)
  assert "".join(tokens) == text


def test_a_stop_string_across_tokens_cuts_the_answer_before_it(served):
  text, tokens, _ = _greedy_tokens(served)
  ends = np.cumsum([len(t) for t in tokens])
  # The last character of a token and the first of the next (both whole characters): a stop string no one token holds.
  boundary = next(e for e, t, u in zip(ends, tokens, tokens[1:]) if t and u and "\ufffd" not in t[-1] + u[0] and e > 2)
  stop = text[boundary - 1:boundary + 1]
  expected = text[:text.find(stop)]
  whole = served.client.chat.completions.create(messages=HELLO, max_tokens=24, stop=[stop, "\x00never"], **GREEDY)
  assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
  streamed = served.client.chat.completions.create(messages=HELLO, max_tokens=24, stop=stop, stream=True, **GREEDY)
  assert _stream_text(streamed) == ({0: expected}, {0: "stop"})


def test_max_tokens_ends_the_answer_with_length_and_counts_the_tokens(served):
  out = served.client.chat.completions.create(messages=HELLO, max_tokens=5, **GREEDY)
  prompt, _ = served.server.tokenizer.render_prompt([*HELLO, {"role": "assistant", "content": "-"}])
  assert out.choices[0].finish_reason == "length"
  assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(prompt), 5, len(prompt) + 5)
  one = served.client.chat.completions.create(messages=HELLO, max_tokens=1, **GREEDY)
  assert one.usage.completion_tokens <= 1 and (one.choices[0].finish_reason == "length") == (one.usage.completion_tokens == 1)
  with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
    served.client.chat.completions.create(messages=HELLO, max_tokens=0, **GREEDY)


def _reference_logprobs(server, ids):
  """Each token's log-probability given the ones before it, from the project's Transformer applied directly."""
  run = server.engine.model.run
  with run.on_mesh():
    tokens_1p = np.asarray([ids], np.int32)
    logits = run.model.apply({"params": server.engine.model.params}, tokens_1p, np.arange(len(ids))[None], np.ones_like(tokens_1p))
  log_pv = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1))
  return [float(log_pv[p, ids[p + 1]]) for p in range(len(ids) - 1)]


def test_echoed_prompt_logprobs_are_the_models_own(served):
  prompt = "def f(x):\n  return json.dumps(x)  # ünï"
  ids = served.http.post(served.root + "/tokenize", json={"prompt": prompt}).json()["tokens"]
  out = served.client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
  lp = out.choices[0].logprobs
  assert out.choices[0].text == prompt
  assert "".join(lp.tokens) == prompt and lp.text_offset == list(np.cumsum([0, *map(len, lp.tokens)])[:-1])
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  np.testing.assert_allclose(lp.token_logprobs[1:], _reference_logprobs(served.server, ids), atol=2e-5)
  assert all(1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-5 for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
  generated = served.client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=4, temperature=0)
  glp = generated.choices[0].logprobs
  assert generated.choices[0].text.startswith(prompt) and "".join(glp.tokens) == generated.choices[0].text
  assert glp.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_token_id_prompts_are_the_text_they_spell(served):
  prompt = "import json\n"
  ids = served.http.post(served.root + "/tokenize", json={"prompt": prompt}).json()["tokens"]
  by_text = served.client.completions.create(prompt=prompt, max_tokens=6, **GREEDY)
  by_ids = served.client.completions.create(prompt=[ids, ids[:-1]], max_tokens=6, **GREEDY)
  assert by_ids.choices[0].text == by_text.choices[0].text and len(by_ids.choices) == 2
  assert by_ids.usage.prompt_tokens == 2 * len(ids) - 1


def test_models_health_and_the_tokenizer_routes(served):
  (model,) = served.client.models.list().data
  assert model.id == "tiny" and model.model_extra["max_model_len"] == 128
  assert served.http.get(served.root + "/health").json()["status"] == "ok"
  info = served.http.get(served.root + "/tokenizer_info").json()
  assert info["model_max_length"] == 128 and info["eos_token"] in served.server.tokenizer.control_strings
  for text in ["def f(x):\n  return x", "a  b\tc ünï €"]:
    tokens = served.http.post(served.root + "/tokenize", json={"prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    back = served.http.post(served.root + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert back == text
  control = served.server.tokenizer.control_strings[0]  # the model's own markup is its token, not spelled out
  marked = served.http.post(served.root + "/tokenize", json={"prompt": control + "hi"}).json()["tokens"]
  assert marked[0] == served.server.tokenizer.token_id(control)
  assert served.http.post(served.root + "/tokenize", json={"prompt": ""}).json()["tokens"] == []
  _error(served.http.post(served.root + "/detokenize", json={"tokens": [10**6]}), 400)
  _error(served.http.post(served.root + "/tokenize", json={"prompt": 3}), 400)


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_malformed_and_mistyped_requests_are_400(served, path):
  for raw in [b"{", b"[1]", b"\xff\xfe", b'{"model": "tiny", "max_tokens": NaN}', b'{"a": "\\ud800"}', b'{"n": 1' + b"1" * 5000 + b"}"]:
    _error(served.post(path, content=raw, headers={"content-type": "application/json"}), 400)
  base = {"model": "tiny", "messages": HELLO, "prompt": "hi"}
  for field, value in [("max_tokens", "3"), ("temperature", "hot"), ("temperature", 3), ("n", 0), ("stop", [1]),
                       ("seed", 1.5), ("stream", "yes"), ("stream_options", {"include_usage": 1}), ("model", 3),
                       ("top_p", -1), ("logprobs", "x")]:
    assert _error(served.post(path, {**base, field: value}), 400)["type"] == "invalid_request_error"
  field = "messages" if "chat" in path else "prompt"
  for value in [None, "hi" if "chat" in path else 3, [], [{"role": "robot", "content": "x"}], [""], [[]], [[-1]]]:
    _error(served.post(path, {**base, field: value}), 400)


def test_unknown_models_and_paths_are_404_and_other_methods_405(served):
  with pytest.raises(openai.NotFoundError) as caught:
    served.client.chat.completions.create(model="gpt-9", messages=HELLO)
  assert caught.value.body["code"] == "model_not_found"
  assert _error(served.http.get(served.base + "/engines"), 404)["type"] == "not_found_error"
  _error(served.http.post(served.root + "/v2/chat"), 404)
  _error(served.http.get(served.base + "/chat/completions"), 405)


def test_a_body_past_max_body_bytes_is_413_declared_or_streamed(served):
  limit = served.server.max_body_bytes
  big = json.dumps({"model": "tiny", "prompt": "x" * (limit + 10)}).encode()
  _error(served.post("/completions", content=big, headers={"content-type": "application/json"}), 413)
  chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # chunked: no content-length to trust
  _error(served.post("/completions", content=chunks, headers={"content-type": "application/json"}), 413)


def test_a_prompt_past_the_context_is_refused_unless_truncation_is_asked(served):
  long_ids = served.http.post(served.root + "/tokenize", json={"prompt": "return x " * 200}).json()["tokens"]
  assert len(long_ids) > 128
  assert "context" in _error(served.post("/completions", {"model": "tiny", "prompt": long_ids, "max_tokens": 2}), 400)["message"]
  assert "context" in _error(served.post("/chat/completions", {
      "model": "tiny", "messages": [{"role": "user", "content": "return x " * 200}]}), 400)["message"]
  _error(served.post("/completions", {"model": "tiny", "prompt": long_ids[:128], "max_tokens": 1}), 400)  # no room left
  cut = served.client.completions.create(prompt=long_ids, max_tokens=2, extra_body={"truncate_prompt_tokens": 100}, **GREEDY)
  assert cut.usage.prompt_tokens == 100 and cut.usage.completion_tokens <= 2
  same = served.client.completions.create(prompt=long_ids[-100:], max_tokens=2, **GREEDY)
  assert cut.choices[0].text == same.choices[0].text


def test_a_request_needing_more_jobs_than_the_queue_holds_is_400_not_429(served):
  prompts = [[5, 6]] * (served.server.engine.max_waiting // 16 + 1)
  assert "n" in _error(served.post("/completions", {"model": "tiny", "prompt": prompts, "n": 16, "max_tokens": 1}), 400)["message"]


# --- hostile bodies ---------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
          "stream_options", "logprobs", "top_logprobs", "echo", "truncate_prompt_tokens"]
VALID = {"model": "tiny", "messages": HELLO, "prompt": "import", "max_tokens": 3}


@st.composite
def hostile_bodies(draw):
  """Arbitrary JSON, or a valid request with some fields set to arbitrary JSON (so the checks past the
  first one are reached), as bytes; or random bytes."""
  kind = draw(st.sampled_from(["json", "fields", "bytes"]))
  if kind == "bytes":
    return draw(st.binary(max_size=64))
  if kind == "json":
    return json.dumps(draw(JSON)).encode()
  body = dict(VALID)
  for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
    body[field] = draw(JSON)
  if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
    body["max_tokens"] = body["max_tokens"] % 4  # keep answers short: the property is about the checks
  return json.dumps(body).encode()


def _json_or_events(response):
  if response.headers["content-type"].startswith("text/event-stream"):
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]" or "error" in json.loads(events[-1])
    return [json.loads(e) for e in events if e != "[DONE]"]
  return response.json()


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=hostile_bodies())
def test_hostile_bodies_get_200_or_a_4xx_json_answer_never_a_5xx(served, path, body):
  response = served.post(path, content=body, headers={"content-type": "application/json"})
  assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
  answer = _json_or_events(response)
  if response.status_code != 200:
    assert set(answer["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 399), max_size=24), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2))
def test_streamed_text_is_the_decoded_text_cut_at_the_first_stop_string(served, ids, stop):
  decode = served.server.tokenizer.decode
  stream = protocol.TextStream(decode, stop)
  sent = ""
  for t in ids:
    text, stopped = stream.push(t)
    sent += text
    if stopped:
      break
  else:
    sent += stream.flush()
  whole = decode(ids)
  assert "".join(protocol.token_texts(decode, ids)) == whole
  cuts = [whole.find(s) for s in stop if s in whole]
  assert sent == whole[:min(cuts, default=len(whole))] and stream.stopped == bool(cuts)


# --- a key, one slot, a small queue ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tokenizer):
  """A server that wants an API key, with one slot and room for one waiting request."""
  folder = make_workdir(tmp_path_factory.mktemp("guarded") / "model", tokenizer)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("SFT_GUARD_KEY", "s3cret")
    config = serve_config(slots=1, max_waiting=1, api_key_env="SFT_GUARD_KEY", max_body_bytes=4096)
    with running_server(config, folder) as (base, server):
      served = Served(base, server)
      yield served
      served.http.close()


def test_the_api_key_is_required_everywhere_but_health(guarded):
  for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}]:
    assert _error(guarded.http.get(guarded.base + "/models", headers=headers), 401)["code"] == "invalid_api_key"
    _error(guarded.post("/completions", {"model": "tiny", "prompt": "a"}, headers=headers), 401)
    _error(guarded.http.post(guarded.root + "/tokenize", json={"prompt": "a"}, headers=headers), 401)
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=guarded.base, api_key="nope", max_retries=0).models.list()
  client = openai.OpenAI(base_url=guarded.base, api_key="s3cret", max_retries=0)
  assert client.models.list().data[0].id == "tiny"
  assert client.completions.create(prompt="a", max_tokens=2, **GREEDY).usage.completion_tokens <= 2
  assert guarded.http.get(guarded.root + "/health").status_code == 200


def test_a_flood_past_the_queue_is_429_with_retry_after(guarded):
  headers = {"Authorization": "Bearer s3cret"}
  body = {"model": "tiny", "prompt": "import json", "max_tokens": 64, "temperature": 0}
  responses = []

  def ask():
    responses.append(guarded.http.post(guarded.base + "/completions", json=body, headers=headers))

  threads = [threading.Thread(target=ask) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  statuses = sorted(r.status_code for r in responses)
  assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
  busy = next(r for r in responses if r.status_code == 429)
  assert int(busy.headers["retry-after"]) >= 1 and _error(busy, 429)["type"] == "rate_limit_error"
  answers = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
  assert len(answers) == 1  # greedy: every request that got in got the same answer


def test_a_small_body_limit_is_413(guarded):
  body = {"model": "tiny", "prompt": "x" * 5000}
  _error(guarded.post("/completions", body, headers={"Authorization": "Bearer s3cret"}), 413)
