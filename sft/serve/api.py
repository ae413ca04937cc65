"""The HTTP API, OpenAI's shapes on Starlette: what `sft serve` answers.

    GET  /health                  200 while the engine runs (503 once it failed)
    GET  /v1/models               the one model served, its context and weights' fingerprint
    POST /v1/chat/completions     a chat, rendered with the model's chat template; streaming as server-sent events
    POST /v1/completions          raw prompts (text or token ids); `echo` with `logprobs` scores a prompt's tokens
    GET  /tokenizer_info, POST /tokenize, POST /detokenize    the tokenizer, as vLLM serves it (lm-evaluation-harness
                                                               tokenizes through these)

Every error is OpenAI's JSON error body: 400 for a malformed request (or one needing more jobs than the
queue holds), 401 without the API key, 404 for an unknown model or path, 405 for another method, 413 past
the body limit, 429 (with Retry-After) when too many requests wait, 503 while shutting down. Requests wait for the engine on asyncio queues: a slow reader holds up only itself,
and a client that leaves frees its slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from sft.serve import protocol
from sft.serve.engine import Engine, Job, QueueFull, Sampling, Token, Unavailable
from sft.serve.protocol import ApiError, Limits, TextStream
from sft.tokenizer import TokenizerFailure

log = logging.getLogger("sft")
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25
_PLACEHOLDER = {"role": "assistant", "content": "-"}  # the turn the prompt leads into


@dataclasses.dataclass
class Server:
  """What the routes share: the engine, the model's name and fingerprint, and the config's limits."""

  engine: Engine
  name: str
  fingerprint: str
  limits: Limits
  api_key: str | None  # None: no key needed
  max_body_bytes: int
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  accepting: bool = True

  @property
  def tokenizer(self):
    return self.engine.tokenizer


def error_response(err: ApiError) -> JSONResponse:
  return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- one request's jobs ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
  """One answer as it is assembled: its text stream, its tokens (and their logprobs), how it ended."""

  stream: TextStream
  tokens: list[Token] = dataclasses.field(default_factory=list)
  finish: str | None = None
  stop_token: Token | None = None  # the stop token that ended it (asked for with logprobs)


class Flight:
  """The jobs of one request (one per choice, and scoring jobs), the queue their events arrive on, and
  the choices they build. Events come from the engine thread through the event loop's thread-safe call."""

  def __init__(self, server: Server, prompts: list[list[int]], samplings: list[Sampling], stop: tuple[str, ...],
               scored: list[int] = ()):
    self.server = server
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue = asyncio.Queue()
    decode = server.tokenizer.decode
    self.choices = [Choice(TextStream(decode, stop)) for _ in samplings]
    self.jobs = [Job(list(p), emit=self._emitter(("gen", i)), sampling=s) for i, (p, s) in enumerate(zip(prompts, samplings))]
    self.scores: dict[int, Any] = {}
    self.score_jobs = [Job(list(p), emit=self._emitter(("score", i)), score=True) for i, p in scored]
    self._pending = len(self.jobs) + len(self.score_jobs)

  def _emitter(self, tag):
    def emit(kind: str, value: Any) -> None:
      self.loop.call_soon_threadsafe(self.queue.put_nowait, (tag, kind, value))
    return emit

  def submit(self) -> None:
    if not self.server.accepting:
      raise ApiError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
    queue = self.server.engine.max_waiting
    if len(self.jobs) + len(self.score_jobs) > queue:  # would be refused however long the client waits
      raise protocol.bad(
          f"this request needs {len(self.jobs) + len(self.score_jobs)} jobs (prompts x n, and scorings), more than "
          f"the {queue} this server queues: send fewer prompts or a smaller n"
      )
    submitted = []
    try:
      for job in [*self.score_jobs, *self.jobs]:
        self.server.engine.submit(job)
        submitted.append(job)
    except (QueueFull, Unavailable) as err:
      for job in submitted:
        job.cancelled = True
      if isinstance(err, Unavailable):
        raise ApiError(503, str(err), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
      raise ApiError(429, f"the server is busy ({err}): retry later", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

  def cancel(self) -> None:
    for job in [*self.jobs, *self.score_jobs]:
      job.cancelled = True

  async def events(self, request: Request) -> AsyncIterator[tuple[int, str, Any]]:
    """(choice index, "text" | "done", value) as the answers grow, until every job ended. A client that
    left cancels the jobs; an engine error is a 503."""
    while self._pending:
      try:
        (kind_of, i), kind, value = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          self.cancel()
          return
        continue
      if kind == "error":
        self.cancel()
        raise ApiError(503, value, headers={"Retry-After": str(RETRY_AFTER_S)})
      if kind_of == "score":
        self.scores[i] = value
        self._pending -= 1
        continue
      choice = self.choices[i]
      if choice.finish is not None:  # tokens of a chunk past a stop string
        continue
      if kind == "token" and value.stop:  # not text and not counted: only its logprob is reported
        choice.stop_token = value
        continue
      if kind == "token":
        choice.tokens.append(value)
        text, stopped = choice.stream.push(value.id)
        if text:
          yield i, "text", text
        if stopped:
          self.jobs[i].cancelled = True
          choice.finish = "stop"
          self._pending -= 1
          yield i, "done", "stop"
      elif kind == "done":
        rest = choice.stream.flush()
        if rest:
          yield i, "text", rest
        choice.finish = "stop" if choice.stream.stopped else value  # a stop string in the last, held-back text
        self._pending -= 1
        yield i, "done", choice.finish


  async def finish(self, request: Request) -> None:
    """Waits until every job ended (or the client left), building the choices."""
    try:
      async for _ in self.events(request):
        pass
    finally:
      self.cancel()

  def stream(self, request: Request, chunk: dict, prelude: list[dict], usage_prompt_tokens: int | None,
             choice_of) -> StreamingResponse:
    """The answers as server-sent events: `chunk` (the response's fixed fields) with each of `prelude`'s
    choices, then one choice per event (`choice_of(index, kind, value)`), the usage when asked
    (`usage_prompt_tokens` not None), and [DONE]; an engine error ends the stream as an error event."""
    async def events():
      try:
        for choice in prelude:
          yield _sse({**chunk, "choices": [choice]})
        async for i, kind, value in self.events(request):
          yield _sse({**chunk, "choices": [choice_of(i, kind, value)]})
        if usage_prompt_tokens is not None:
          yield _sse({**chunk, "choices": [], "usage": _usage(usage_prompt_tokens, self.choices)})
        yield b"data: [DONE]\n\n"
      except ApiError as err:
        yield _sse(err.body())
      finally:
        self.cancel()
    return StreamingResponse(events(), media_type="text/event-stream")


# --- request checks ------------------------------------------------------------------------------------------


async def read_json(request: Request, server: Server) -> dict[str, Any]:
  declared = request.headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > server.max_body_bytes:
    raise ApiError(413, f"the request body is {declared} bytes, more than the {server.max_body_bytes} this server takes")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > server.max_body_bytes:
      raise ApiError(413, f"the request body is more than the {server.max_body_bytes} bytes this server takes")
  return protocol.parse_json(bytes(body))


def authorize(request: Request, server: Server) -> None:
  if server.api_key is None:
    return
  header = request.headers.get("authorization", "")
  scheme, _, given = header.partition(" ")
  ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), server.api_key.encode())
  if not ok:
    raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key")


def check_model(name: str, server: Server) -> None:
  if name != server.name:
    raise ApiError(404, f"the model {name!r} is not served here; this server serves {server.name!r}", param="model",
                   code="model_not_found")


def samplings(c: protocol.Common, budgets: list[int], logprobs: bool) -> list[Sampling]:
  """One Sampling per (prompt, choice): choice j of a seeded request draws with seed + j."""
  base = c.seed if c.seed is not None else secrets.randbits(63)
  return [
      Sampling(max_tokens=b, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
               seed=(base + j) % 2**64, logprobs=logprobs)
      for b in budgets for j in range(c.n)
  ]


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
  completion = sum(len(c.tokens) for c in choices)
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload: Any) -> bytes:
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


# --- the routes ----------------------------------------------------------------------------------------------


def create_app(server: Server) -> Starlette:
  tok = server.tokenizer

  def piece(token_id: int) -> str:  # a token alone: an alternative in top_logprobs
    return tok.decode([token_id])

  def pieces(ids: list[int]) -> list[str]:  # tokens in a row: each one's share of their text
    return protocol.token_texts(tok.decode, ids)

  async def health(request: Request):
    if server.engine.failed:
      return JSONResponse({"status": "failed", "error": server.engine.failed}, status_code=503)
    return JSONResponse({"status": "ok", "running": server.engine.running, "waiting": server.engine.waiting})

  async def models(request: Request):
    authorize(request, server)
    entry = {"id": server.name, "object": "model", "created": server.created, "owned_by": "sft",
             "max_model_len": server.limits.context, "fingerprint": server.fingerprint}
    return JSONResponse({"object": "list", "data": [entry]})

  async def tokenizer_info(request: Request):
    authorize(request, server)
    eos = next((s for s in tok.control_strings if _id_of(tok, s) in tok.stop_ids), None)
    return JSONResponse({"eos_token": eos, "bos_token": None, "pad_token": None, "model_max_length": server.limits.context})

  async def tokenize(request: Request):
    authorize(request, server)
    body = await read_json(request, server)
    text = body.get("prompt")
    if not isinstance(text, str):
      raise protocol.bad("prompt must be a string", "prompt")
    ids = _prompt_ids(tok, text, 0) if text else []
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": server.limits.context})

  async def detokenize(request: Request):
    authorize(request, server)
    body = await read_json(request, server)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size for t in ids):
      raise protocol.bad(f"tokens must be a list of token ids in [0, {tok.vocab_size})", "tokens")
    return JSONResponse({"prompt": tok.decode(ids)})

  async def chat(request: Request):
    authorize(request, server)
    body = await read_json(request, server)
    c = protocol.common(body)
    check_model(c.model, server)
    messages = protocol.chat_messages(body)
    want_logprobs, top_n = protocol.logprobs_of_chat(body)
    try:
      prompt = tok.render_prompt([*messages, _PLACEHOLDER])[0]
    except (ValueError, TypeError, KeyError) as err:
      raise protocol.bad(f"the chat cannot be rendered with the model's chat template: {err}", "messages") from None
    prompt = protocol.fit_prompt(prompt, c.truncate_prompt_tokens, server.limits)
    if c.max_tokens == 0:  # a chat answers: nothing to score here (completions take max_tokens 0 with echo)
      raise protocol.bad("max_tokens must be at least 1 for a chat completion", "max_tokens")
    budget = protocol.answer_budget(len(prompt), c.max_tokens, server.limits)
    flight = Flight(server, [prompt] * c.n, samplings(c, [budget], want_logprobs), c.stop)
    flight.submit()
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "created": created, "model": server.name, "system_fingerprint": server.fingerprint}

    def chat_logprobs(choice: Choice) -> dict | None:
      if not want_logprobs:
        return None
      texts = pieces([t.id for t in choice.tokens])
      return {"content": [
          {"token": text, "logprob": t.logprob, "bytes": list(text.encode()),
           "top_logprobs": [{"token": piece(i), "logprob": v, "bytes": list(piece(i).encode())} for i, v in (t.top or [])[:top_n]]}
          for t, text in zip(choice.tokens, texts)
      ]}

    if c.stream:
      chunk = {**head, "object": "chat.completion.chunk"}
      prelude = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(c.n)]
      return flight.stream(request, chunk, prelude, len(prompt) if c.include_usage else None, lambda i, kind, value: {
          "index": i, "delta": {"content": value} if kind == "text" else {}, "finish_reason": value if kind == "done" else None})
    await flight.finish(request)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": ch.stream.text}, "logprobs": chat_logprobs(ch),
         "finish_reason": ch.finish}
        for i, ch in enumerate(flight.choices)
    ]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), flight.choices)})

  async def completions(request: Request):
    authorize(request, server)
    body = await read_json(request, server)
    c = protocol.common(body)
    check_model(c.model, server)
    raw = protocol.completion_prompts(body, tok.vocab_size)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
      raise protocol.bad("echo must be true or false", "echo")
    n_logprobs = protocol.completion_logprobs(body)
    if c.stream and echo and n_logprobs is not None:
      raise protocol.bad("echo with logprobs is served without streaming", "stream")
    prompts = [protocol.fit_prompt(_prompt_ids(tok, p, i), c.truncate_prompt_tokens, server.limits) for i, p in enumerate(raw)]
    requested = 16 if c.max_tokens is None else c.max_tokens  # OpenAI's default for completions
    generating = requested > 0
    for p in prompts:
      if len(p) > server.limits.context:
        raise protocol.bad(f"a prompt is {len(p)} tokens, more than this model's context of {server.limits.context}", "prompt")
    budgets = [protocol.answer_budget(len(p), requested, server.limits) for p in prompts] if generating else []
    scored = [(i, p) for i, p in enumerate(prompts)] if echo and n_logprobs is not None else []
    gen_prompts = [p for p in prompts for _ in range(c.n)] if generating else []
    flight = Flight(server, gen_prompts, samplings(c, budgets, n_logprobs is not None), c.stop, scored)
    flight.submit()
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "created": created, "model": server.name, "system_fingerprint": server.fingerprint}
    prompt_tokens = sum(len(p) for p in prompts)

    if c.stream:
      chunk = {**head, "object": "text_completion"}
      prelude = [{"index": i, "text": tok.decode(gen_prompts[i]), "logprobs": None, "finish_reason": None}
                 for i in range(len(gen_prompts))] if echo else []
      return flight.stream(request, chunk, prelude, prompt_tokens if c.include_usage else None, lambda i, kind, value: {
          "index": i, "text": value if kind == "text" else "", "logprobs": None, "finish_reason": value if kind == "done" else None})
    await flight.finish(request)

    def logprobs_of(p: int, choice: Choice | None) -> dict | None:
      if n_logprobs is None:
        return None
      out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
      offset = 0
      if echo:
        logprobs, tops = flight.scores[p]
        for text, lp, top in zip(pieces(prompts[p]), logprobs, tops):
          _add(out, text, lp, None if top is None else top[:max(n_logprobs, 1)], offset, piece)
          offset += len(text)
      generated = choice.tokens if choice else []
      for t, text in zip(generated, pieces([t.id for t in generated])):
        _add(out, text, t.logprob, (t.top or [])[:max(n_logprobs, 1)], offset, piece)
        offset += len(text)
      if choice and choice.stop_token:  # the end of turn that closed the answer, as vLLM reports it
        stop = choice.stop_token
        _add(out, piece(stop.id), stop.logprob, (stop.top or [])[:max(n_logprobs, 1)], offset, piece)
      return out

    choices = []
    if generating:
      for i, ch in enumerate(flight.choices):
        p = i // c.n
        text = (tok.decode(prompts[p]) if echo else "") + ch.stream.text
        choices.append({"index": i, "text": text, "logprobs": logprobs_of(p, ch), "finish_reason": ch.finish})
    else:  # max_tokens 0: the prompts echoed (and scored), nothing generated
      for p in range(len(prompts)):
        choices.append({"index": p, "text": tok.decode(prompts[p]) if echo else "", "logprobs": logprobs_of(p, None),
                        "finish_reason": "length"})
    return JSONResponse({**head, "object": "text_completion", "choices": choices, "usage": _usage(prompt_tokens, flight.choices)})

  async def api_error(request: Request, err: ApiError):
    return error_response(err)

  async def http_error(request: Request, err: HTTPException):
    message = {404: f"no route {request.url.path}: this server answers /v1/models, /v1/chat/completions, "
                    "/v1/completions, /health, /tokenizer_info, /tokenize and /detokenize",
               405: f"{request.method} is not served at {request.url.path}"}.get(err.status_code, str(err.detail))
    return error_response(ApiError(err.status_code, message, headers=err.headers))

  async def unexpected(request: Request, err: Exception):
    log.exception("serve: %s %s failed", request.method, request.url.path)
    return error_response(ApiError(500, f"internal error: {type(err).__name__}"))

  routes = [
      Route("/health", health, methods=["GET"]),
      Route("/v1/models", models, methods=["GET"]),
      Route("/v1/chat/completions", chat, methods=["POST"]),
      Route("/v1/completions", completions, methods=["POST"]),
      Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
      Route("/tokenize", tokenize, methods=["POST"]),
      Route("/detokenize", detokenize, methods=["POST"]),
  ]
  return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: unexpected})


def _prompt_ids(tokenizer, prompt: str | list[int], i: int) -> list[int]:
  """A completion prompt's tokens: token ids as given, text in the model's own format (`encode_markup`)."""
  try:
    ids = protocol.encode_markup(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
  except TokenizerFailure as err:
    raise protocol.bad(f"prompt[{i}] cannot be tokenized: {err}", "prompt") from None
  if not ids:
    raise protocol.bad(f"prompt[{i}] is empty: the model needs at least one token to continue", "prompt")
  return ids


def _id_of(tokenizer, text: str) -> int | None:
  try:
    return tokenizer.token_id(text)
  except Exception:  # noqa: BLE001  (a string no single token spells: each tokenizer raises its own error)
    return None


def _add(out: dict, token: str, logprob: float | None, top, offset: int, piece) -> None:
  out["tokens"].append(token)
  out["token_logprobs"].append(logprob)
  out["top_logprobs"].append(None if top is None else {piece(i): v for i, v in top})
  out["text_offset"].append(offset)
