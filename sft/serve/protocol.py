"""OpenAI's request and response shapes: a request body checked into what the engine runs, or an
ApiError with OpenAI's error body; the text a stream of tokens has become, stop strings applied.
No JAX and no web framework here: every function is plain data in, plain data out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Sequence

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_SEED = 2**63 - 1


class ApiError(Exception):
  """An error a client gets as OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               kind: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
    kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    self.kind = kind or kinds.get(status, "invalid_request_error" if status < 500 else "server_error")

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
  return ApiError(400, message, param=param)


def _no_constant(name: str):
  raise ValueError(f"{name} is not JSON (a number must be finite)")


def parse_json(body: bytes) -> dict[str, Any]:
  """The request body as a JSON object, or a 400 that says what is wrong with it: not UTF-8, not JSON,
  NaN or Infinity (Python's extension), an integer past Python's digit limit, or a lone surrogate escape
  (text no tokenizer or response can carry)."""
  try:
    value = json.loads(body, parse_constant=_no_constant)
    json.dumps(value, ensure_ascii=False).encode()  # a lone surrogate ("\\ud800") fails here, not mid-request
  except UnicodeEncodeError:
    raise bad("the request body holds a lone surrogate escape (such as \\ud800): its text must be valid Unicode") from None
  except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise bad(f"the request body is not valid JSON: {err}") from None
  if not isinstance(value, dict):
    raise bad(f"the request body must be a JSON object, got {type(value).__name__}")
  return value


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server's config allows a request."""

  context: int  # prompt + answer tokens
  max_tokens: int  # answer tokens at most (a larger max_tokens is capped to it)
  default_max_tokens: int  # when a request gives none


@dataclasses.dataclass(frozen=True)
class Common:
  """The settings chat and completion requests share."""

  model: str
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  seed: int | None
  n: int
  stream: bool
  include_usage: bool
  stop: tuple[str, ...]
  truncate_prompt_tokens: int | None


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise bad(f"{name} must be a number, got {value!r}", name)
  if not low <= value <= high:
    raise bad(f"{name} must be in [{low}, {high}], got {value}", name)
  return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise bad(f"{name} must be an integer, got {value!r}", name)
  if not low <= value <= high:
    raise bad(f"{name} must be in [{low}, {high}], got {value}", name)
  return value


def _stop(body: dict) -> tuple[str, ...]:
  value = body.get("stop")
  if value is None:
    return ()
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > MAX_STOP:
    raise bad(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
  return tuple(s for s in value if s)


def common(body: dict) -> Common:
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise bad("model is required: the name GET /v1/models lists", "model")
  stream_options = body.get("stream_options") or {}
  if not isinstance(stream_options, dict):
    raise bad("stream_options must be an object", "stream_options")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise bad("stream must be true or false", "stream")
  include_usage = stream_options.get("include_usage", False)
  if not isinstance(include_usage, bool):
    raise bad("stream_options.include_usage must be true or false", "stream_options")
  return Common(
      model=model,
      max_tokens=_integer(body, "max_tokens", None, 0, 1 << 30),
      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
      top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
      top_k=max(0, _integer(body, "top_k", 0, -1, 1 << 30)),  # -1: no limit, as vLLM spells it
      seed=_integer(body, "seed", None, -(2**63), MAX_SEED),
      n=_integer(body, "n", 1, 1, MAX_N),
      stream=stream,
      include_usage=include_usage,
      stop=_stop(body),
      truncate_prompt_tokens=_integer(body, "truncate_prompt_tokens", None, 1, 1 << 30),
  )


def _content(message: dict, i: int) -> str:
  content = message.get("content")
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # OpenAI's content parts: text only
    texts = []
    for part in content:
      if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are served", "messages")
      texts.append(part["text"])
    return "".join(texts)
  raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


ROLES = ("system", "user", "assistant")


def chat_messages(body: dict) -> list[dict[str, str]]:
  """The conversation as {"role", "content"} turns; it must end with the user's turn."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise bad("messages must be a non-empty list", "messages")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise bad(f"messages[{i}] must be an object", "messages")
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system turn
      role = "system"
    if role not in ROLES:
      raise bad(f"messages[{i}].role must be one of {ROLES}, got {role!r}", "messages")
    out.append({"role": role, "content": _content(message, i)})
  if out[-1]["role"] != "user":
    raise bad("the last message must be the user's: the model answers it", "messages")
  return out


def logprobs_of_chat(body: dict) -> tuple[bool, int]:
  """(whether to return logprobs, how many alternatives per token) of a chat request."""
  wanted = body.get("logprobs", False)
  if wanted is None:
    wanted = False
  if not isinstance(wanted, bool):
    raise bad("logprobs must be true or false", "logprobs")
  top = _integer(body, "top_logprobs", 0, 0, 5)
  if top and not wanted:
    raise bad("top_logprobs needs logprobs: true", "top_logprobs")
  return wanted, top or 0


def completion_prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
  """A completion request's prompts: a string, a list of strings, a list of token ids, or a list of those."""
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    prompts: list = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt:
    prompts = prompt
  else:
    raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      continue
    if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      raise bad(f"prompt[{i}] must be a string or a non-empty list of token ids", "prompt")
    if any(not 0 <= t < vocab_size for t in p):
      raise bad(f"prompt[{i}] holds a token id outside the vocabulary [0, {vocab_size})", "prompt")
  return prompts


def completion_logprobs(body: dict) -> int | None:
  return _integer(body, "logprobs", None, 0, 5)


def answer_budget(prompt_len: int, requested: int | None, limits: Limits) -> int:
  """How many tokens the answer may have: the request's max_tokens (or the default) capped by the config
  and by what the context leaves. A prompt that leaves no room is refused."""
  room = limits.context - prompt_len
  if room < 1:
    raise bad(
        f"the prompt is {prompt_len} tokens; this model's context is {limits.context} tokens and an answer needs at "
        "least 1: shorten the prompt (or set truncate_prompt_tokens to keep its last tokens)",
        "messages",
    )
  wanted = limits.default_max_tokens if requested is None else requested
  return min(wanted, limits.max_tokens, room)


def fit_prompt(tokens: list[int], truncate: int | None, limits: Limits) -> list[int]:
  """The prompt, cut to its last `truncate` tokens when the request asks (never otherwise)."""
  if truncate is not None and len(tokens) > truncate:
    return tokens[-truncate:]
  return tokens


def encode_markup(tokenizer, text: str) -> list[int]:
  """Raw prompt text as the model's own format: its control strings (end of turn, role markers) become
  their tokens, as a raw completion client that writes the format itself expects (Hugging Face and vLLM
  read a prompt so); the text between them is plain text."""
  controls = sorted({s for s in tokenizer.control_strings if s}, key=len, reverse=True)
  if not controls:
    return tokenizer.encode(text)
  ids: list[int] = []
  position = 0
  for match in re.finditer("|".join(map(re.escape, controls)), text):
    if match.start() > position:
      ids += tokenizer.encode(text[position:match.start()])
    ids.append(tokenizer.token_id(match.group()))
    position = match.end()
  if position < len(text):
    ids += tokenizer.encode(text[position:])
  return ids


class TextStream:
  """Detokenizes one answer as its tokens come: `push(id)` returns the text that is safe to send now and
  whether a stop string ended the answer. Text is held back while it could still be the start of a
  stop string, or ends inside a multi-byte character (decoded as U+FFFD until its last byte comes).

  Each push decodes a short window, not the whole answer (as vLLM does): the text the new tokens add is
  what the window's tokens decode to past what its older ones decode to, the older ones giving the new
  ones their context (SentencePiece's leading space, a character's first bytes)."""

  def __init__(self, decode, stop: Sequence[str]):
    self.decode, self.stop = decode, tuple(stop)
    self.ids: list[int] = []
    self.sent = 0
    self.text = ""  # the answer's text so far; past `sent`, not yet sent
    self.stopped = False
    self._context = 0  # ids[_context:_read] are decoded already, as the window's context
    self._read = 0

  def push(self, token: int) -> tuple[str, bool]:
    self.ids.append(token)
    self._grow(final=False)
    return self._release(final=False)

  def _grow(self, final: bool) -> None:
    """Adds the text of the tokens past `_read`, unless it ends inside a character that more tokens complete."""
    if self._read == len(self.ids):
      return
    before = self.decode(self.ids[self._context:self._read])
    after = self.decode(self.ids[self._context:])
    if not final and (after.endswith("\ufffd") or len(after) <= len(before)):
      return
    self.text += after[len(before):]
    self._context, self._read = self._read, len(self.ids)

  def _stop_at(self) -> int | None:
    hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
    return min(hits) if hits else None

  def flush(self) -> str:
    """The text not sent yet, all of it (a trailing partial character as U+FFFD): the answer ended. A stop
    string in it still cuts it (`stopped` says so)."""
    if not self.stopped:
      self._grow(final=True)
    return self._release(final=True)[0]

  def _release(self, final: bool) -> tuple[str, bool]:
    """(the text to send now, whether a stop string ended the answer)."""
    if self.stopped:
      return "", True
    hit = self._stop_at()
    if hit is not None:
      self.text, self.stopped = self.text[:hit], True
      final = True
    hold = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
    safe = len(self.text) - hold
    if safe <= self.sent:
      return "", self.stopped
    out, self.sent = self.text[self.sent:safe], safe
    return out, self.stopped


def token_texts(decode, ids: Sequence[int]) -> list[str]:
  """Each token's share of the decoded text, so that the shares join to it (as OpenAI's logprobs tokens
  do): what the text grows by with that token. A token decoded alone would lose its leading space
  (SentencePiece) or a character it shares with its neighbours; a token that ends inside a character
  gets "", the one that completes it the character."""
  stream = TextStream(decode, ())
  texts = [stream.push(t)[0] for t in ids]
  if texts:
    texts[-1] += stream.flush()
  return texts
