"""`sft serve` under a bounded load: concurrent clients mixing streamed and whole chats and completions of
several prompt lengths, clients that leave mid-stream and malformed requests. No answer is lost or
crossed with another (each greedy answer is the one the request gets served alone), and the slots of the
clients that left are freed."""

import json
import threading
import time

import httpx2
import pytest
from serving_util import make_workdir, running_server
from serving_util import test_config as serve_config

# Concurrent clients against a served model: about half a minute.
pytestmark = pytest.mark.slow

CLIENTS = 20
LEAVER_TOKENS = 63  # the budget of the requests whose clients leave mid-stream (no other request asks for it)
WORDS = "import json def dumps obj indent sort keys return value string list".split()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
  folder = make_workdir(tmp_path_factory.mktemp("load") / "model", tokenizer)
  with running_server(serve_config(slots=4, max_waiting=64), folder) as (base, server):
    jobs = []
    submit = server.engine.submit
    server.engine.submit = lambda job: (jobs.append(job), submit(job))[1]  # the jobs the API hands the engine
    yield base, server, jobs


def _prompt(i: int) -> str:
  """Prompts of about 4, 20 and 50 tokens: three prefill buckets."""
  return " ".join(WORDS[(i + k) % len(WORDS)] for k in range((3, 15, 40)[i % 3]))


def _request(i: int) -> tuple[str, str, dict]:
  """(kind, path, body) of client i: a whole or streamed chat or completion, a leaver, or a malformed one."""
  kind = ("chat", "chat_stream", "completion", "completion_stream", "leaver", "malformed", "chat", "completion_stream")[i % 8]
  greedy = {"model": "tiny", "temperature": 0, "max_tokens": (8, 16, 24)[i % 3], "stream": kind.endswith("stream")}
  if kind == "leaver":
    return kind, "/chat/completions", {**greedy, "messages": [{"role": "user", "content": _prompt(i)}],
                                       "max_tokens": LEAVER_TOKENS, "stream": True}
  if kind == "malformed":
    return kind, "/completions", {**greedy, "prompt": _prompt(i), "max_tokens": "many"}
  if kind.startswith("chat"):
    return kind, "/chat/completions", {**greedy, "messages": [{"role": "user", "content": _prompt(i)}]}
  return kind, "/completions", {**greedy, "prompt": _prompt(i)}


def _text_of(choice: dict) -> str:
  return choice.get("text") or (choice.get("message") or choice.get("delta") or {}).get("content") or ""


def _ask(http: httpx2.Client, base: str, path: str, body: dict, leave_after: int | None = None) -> tuple[int, str, str | None]:
  """(status, the answer's text, its finish reason); a stream is read to its end, or left after `leave_after` events."""
  if not body.get("stream"):
    response = http.post(base + path, json=body)
    if response.status_code != 200:
      return response.status_code, response.text, None
    choice = response.json()["choices"][0]
    return 200, _text_of(choice), choice["finish_reason"]
  text, finish, events = "", None, 0
  with http.stream("POST", base + path, json=body) as response:
    if response.status_code != 200:
      return response.status_code, response.read().decode(), None
    for line in response.iter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line.removeprefix("data: "))
      assert "error" not in event, event
      events += 1
      for choice in event["choices"]:
        text += _text_of(choice)
        finish = choice["finish_reason"] or finish
      if leave_after is not None and events >= leave_after:
        return 200, text, "left"  # closing the response drops the connection mid-stream
  return 200, text, finish


def test_concurrent_clients_get_their_own_answers_and_leavers_free_their_slots(served):
  base, server, jobs = served
  requests = [_request(i) for i in range(CLIENTS)]
  results: dict[int, tuple] = {}
  start = threading.Barrier(CLIENTS)

  def client(i: int) -> None:
    kind, path, body = requests[i]
    with httpx2.Client(timeout=60) as http:
      start.wait()
      results[i] = _ask(http, base, path, body, leave_after=3 if kind == "leaver" else None)

  began = time.monotonic()
  threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert len(results) == CLIENTS and time.monotonic() - began < 60

  for i, (kind, _, _) in enumerate(requests):
    status = results[i][0]
    assert status == (400 if kind == "malformed" else 200), (kind, results[i])

  # Served alone afterwards, each answer is the one it got under load: none lost, none crossed.
  with httpx2.Client(timeout=60) as http:
    for i, (kind, path, body) in enumerate(requests):
      if kind in ("leaver", "malformed"):
        continue
      alone = _ask(http, base, path, body)
      assert results[i] == alone, (kind, body)
      assert alone[2] in ("stop", "length") and (alone[2] == "stop" or alone[1])

  deadline = time.monotonic() + 10
  while (server.engine.running or server.engine.waiting) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert (server.engine.running, server.engine.waiting) == (0, 0)
  leavers = [job for job in jobs if job.sampling and job.sampling.max_tokens == LEAVER_TOKENS]
  assert len(leavers) == sum(kind == "leaver" for kind, _, _ in requests)
  # Their clients left after a few tokens: the engine stopped them there, long before their budget.
  assert all(job.cancelled and job.generated < LEAVER_TOKENS for job in leavers), [j.generated for j in leavers]
  health = httpx2.get(base.removesuffix("/v1") + "/health").json()
  assert health == {"status": "ok", "running": 0, "waiting": 0}


def test_a_slow_reader_holds_up_only_itself(served):
  """A streaming client that reads nothing for a while: the others are answered meanwhile, and its own
  answer, read late, is whole."""
  base, server, _ = served
  body = {"model": "tiny", "temperature": 0, "max_tokens": 40, "stream": True,
          "messages": [{"role": "user", "content": _prompt(1)}]}
  with httpx2.Client(timeout=60) as slow, slow.stream("POST", base + "/chat/completions", json=body) as response:
    assert response.status_code == 200
    began = time.monotonic()
    with httpx2.Client(timeout=60) as http:
      others = [_ask(http, base, "/completions", {"model": "tiny", "temperature": 0, "max_tokens": 8,
                                                  "prompt": _prompt(i)}) for i in range(4)]
    others_took = time.monotonic() - began
    assert all(status == 200 for status, _, _ in others)
    text, finish = "", None
    for line in response.iter_lines():  # read only now
      if line.startswith("data: ") and line != "data: [DONE]":
        for choice in json.loads(line.removeprefix("data: "))["choices"]:
          text += _text_of(choice)
          finish = choice["finish_reason"] or finish
  with httpx2.Client(timeout=60) as http:
    alone = _ask(http, base, "/chat/completions", body)
  assert (200, text, finish) == alone
  assert others_took < 30
