"""Annotating through an OpenAI-compatible server: this project's `sft serve`, vLLM, TGI or a hosted API,
unchanged between them. `annotate.model` is the server's base URL; `annotate.endpoint` holds the rest.

    annotator = open_endpoint("http://127.0.0.1:8000/v1", model="", api_key_env="SFT_API_KEY")
    annotator.generate([[{"role": "user", "content": "Hi"}]], Decoding(max_new_tokens=64))

Each chat is one `POST {base_url}/chat/completions` (the server renders it with its own chat template),
`concurrency` of them in flight at once, the answers in the chats' order. The `openai` client sends them:
it retries a timeout, a dropped connection, 408/409/429 and 5xx up to `retries` times with exponential
backoff (0.5 s doubling to 8 s, jittered), waiting what a `Retry-After` header asks (up to 2 minutes).

What fails, and how:
  the server cannot be reached on first use (`GET /models`)      ConfigError naming the URL
  401 / 403 / 404 (a wrong key, URL or model name: every
  request would fail alike)                                       ConfigError naming the key to change
  an answer from other weights than `GET /models` listed on
  first use (its `system_fingerprint`: the server restarted)      ConfigError: so would every later answer be
  a request still failing after its retries, or an answer
  that breaks the API's shape (no choices, no text, not JSON,
  not valid in its charset)                                       that chat's Generation carries the error:
                                                                  a counted drop ("annotator error")
  log_likelihoods                                                 ConfigError: a chat API scores no given answer

The fingerprint the cache is keyed by: the URL, the model name and what `GET /models` lists of the model
(`sft serve` lists its weights' fingerprint; vLLM its path and context; the fields a server makes anew for
each request left out). A server that lists no weights' fingerprint is warned about once: new weights under
the same path and name would be served the old model's cached answers.

The API key is read from the environment variable `api_key_env` names (sent as `Authorization: Bearer`),
in each process when its client is made: it is never a setting, never pickled, never logged. The
object pickles as its settings and what its first use learnt (the model name and the fingerprint), so
Beam workers ask the same model and key the cache alike. `openai` is imported on first use only.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
from typing import Any, Sequence

from sft.annotator.base import Chat, Decoding, Generation
from sft.console import bar
from sft.errors import ConfigError

log = logging.getLogger("sft")
KEY = "annotate.model"  # the build config's key that names the server, in every error about it
SETTINGS = "annotate.endpoint"  # the section of the other settings
URL_SCHEMES = ("http://", "https://")
DEFAULT_API_KEY_ENV = "SFT_API_KEY"  # not OPENAI_API_KEY: an OpenAI key is sent to the URL only when asked
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Fields of a GET /models entry left out of the fingerprint: the name (hashed already), a constant, and what
# vLLM and TGI make anew for each request (the time, random permission ids).
UNSTABLE = ("id", "object", "created", "permission")
# A finish_reason that means the model ended its turn (TGI's older names beside the API's "stop").
FINISHED = ("stop", "eos_token", "stop_sequence")
CUT = "length"  # stopped at max_tokens: a truncated answer
_SHOWN = 200  # characters of a server's error text kept in a drop's detail


def is_url(model: str) -> bool:
  """Whether `annotate.model` names a server (http:// or https://) rather than a folder."""
  return isinstance(model, str) and model.strip().lower().startswith(URL_SCHEMES)


def backend_of(model: str, backend: str) -> str:
  """The backend "auto" stands for when `annotate.model` is a URL ("endpoint"); `backend` otherwise."""
  return "endpoint" if backend == "auto" and is_url(model) else backend


def env_name_problem(value: str) -> str | None:
  """What is wrong with an api_key_env value; the value itself is never echoed (it may be the key)."""
  if value == "" or ENV_NAME.fullmatch(value):
    return None
  return "must be the NAME of an environment variable that holds the API key (e.g. SFT_API_KEY), not the key itself"


def open_endpoint(
    url: str, *, model: str = "", api_key_env: str = DEFAULT_API_KEY_ENV, timeout_s: float = 120.0, retries: int = 4,
    concurrency: int = 8, progress: bool = True, key: str = KEY,
) -> EndpointAnnotator:
  """The annotator of the OpenAI-compatible server at `url` (its base URL, e.g. http://127.0.0.1:8000/v1).
  Checks the settings (a one-line ConfigError) and sends nothing: the server is first asked on first use.

  `model`: the name the server serves it under ("": the first one `GET /models` lists). `api_key_env`:
  the environment variable holding the API key ("" or unset: no key is sent). `timeout_s`: seconds a
  request may take. `retries`: further tries of a request that failed. `concurrency`: requests in flight
  at once. `key`: the config key every error names."""
  if not is_url(url):
    raise ConfigError(f"{key}={url!r} is no URL: give the server's base URL, e.g. 'http://127.0.0.1:8000/v1'")
  problem = env_name_problem(api_key_env) if isinstance(api_key_env, str) else "must be a string"
  if problem:
    raise ConfigError(f"{SETTINGS}.api_key_env {problem}")
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
    raise ConfigError(f"{SETTINGS}.timeout_s must be > 0 seconds, got {timeout_s!r}")
  for name, value, low in (("retries", retries, 0), ("concurrency", concurrency, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ConfigError(f"{SETTINGS}.{name} must be an integer >= {low}, got {value!r}")
  return EndpointAnnotator(
      url, model=model, api_key_env=api_key_env, timeout_s=float(timeout_s), retries=retries,
      concurrency=concurrency, progress=progress, key=key,
  )


def fingerprint_of(url: str, model: str, served: str = "") -> str:
  """16 hex digits of the sha256 over "endpoint", the base URL, the model name and `served`, what the
  server lists of the model (`served_of`)."""
  return hashlib.sha256(f"sft.annotator/endpoint\n{url}\n{model}\n{served}\n".encode()).hexdigest()[:16]


def weights_of(entry: dict[str, Any]) -> str:
  """The weights' fingerprint a `GET /models` entry lists (`sft serve`'s); "" when it lists none."""
  value = entry.get("fingerprint")
  return value if isinstance(value, str) else ""


def served_of(entry: dict[str, Any]) -> str:
  """What a `GET /models` entry tells of the model behind the name: its weights' fingerprint where it
  lists one; else its stable fields as canonical JSON, e.g. vLLM's {"max_model_len":2048,"owned_by":"vllm",
  "parent":null,"root":"/models/a"}; "" when it holds none ({"id": "m", "object": "model"})."""
  if weights_of(entry):
    return weights_of(entry)
  stable = {k: v for k, v in entry.items() if k not in UNSTABLE}
  return json.dumps(stable, ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str) if stable else ""


def system_fingerprint_of(text: str) -> str:
  """The `system_fingerprint` a `POST /chat/completions` answer names; "" when it names none."""
  try:
    body = json.loads(text)
  except ValueError:
    return ""
  value = body.get("system_fingerprint") if isinstance(body, dict) else None
  return value if isinstance(value, str) else ""


def listed_models(body: Any) -> list[dict[str, Any]]:
  """The model entries (with a string "id") of a `GET /models` answer; [] when it holds none."""
  data = body.get("data") if isinstance(body, dict) else None
  if not isinstance(data, list):
    return []
  return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]


def generation_of(text: str) -> Generation:
  """The Generation a `POST /chat/completions` answer's body holds: its first choice's text, finished
  unless it stopped at max_tokens; a body that breaks the API's shape is a Generation with the error."""
  try:
    body = json.loads(text)
  except ValueError:
    return _broken(f"the answer is not JSON: {text[:80]!r}")
  choices = body.get("choices") if isinstance(body, dict) else None
  if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
    return _broken(f"the answer has no choices: {text[:80]!r}")
  message, reason = choices[0].get("message"), choices[0].get("finish_reason")
  content = message.get("content") if isinstance(message, dict) else None
  if not isinstance(content, str):
    return _broken(f"the answer's first choice has no message text (finish_reason {str(reason)[:40]!r})")
  if reason == CUT:
    return Generation(content, False)
  if reason not in FINISHED:
    return _broken(f"the model's turn ended with finish_reason {str(reason)[:40]!r}, not 'stop' or 'length'")
  return Generation(content, True)


def _broken(error: str) -> Generation:
  return Generation("", False, error=error)


def _described(err: Exception) -> str:
  """An openai error as one line: the status and the server's message, or the failure to connect."""
  text = " ".join(str(err).split())
  cause = err.__cause__
  if cause is not None and str(cause) and str(cause) not in text:
    text += f" ({' '.join(str(cause).split())})"
  return f"{type(err).__name__}: {text}"[:_SHOWN]


class EndpointAnnotator:
  """An Annotator (sft.annotator.base) served by an OpenAI-compatible server; see the module docstring."""

  def __init__(
      self, url: str, *, model: str = "", api_key_env: str = DEFAULT_API_KEY_ENV, timeout_s: float = 120.0,
      retries: int = 4, concurrency: int = 8, progress: bool = True, key: str = KEY,
  ):
    self.url = url.strip().rstrip("/")
    self.model_setting, self.api_key_env = model, api_key_env
    self.timeout_s, self.retries, self.concurrency = timeout_s, retries, concurrency
    self.progress, self.key = progress, key
    self._model: str | None = None  # the name asked for, once the server was probed
    self._fingerprint: str | None = None
    self._weights = ""  # the weights' fingerprint GET /models listed ("": none), each answer's must match
    self._client: Any = None

  def __getstate__(self):  # settings and what the probe learnt; the client (and the key in it) is made anew
    return {**self.__dict__, "_client": None}

  def __repr__(self) -> str:
    return f"EndpointAnnotator({self.url!r}, model={self.model_setting!r}, concurrency={self.concurrency})"

  @property
  def where(self) -> str:
    return f"{self.key}={self.url!r}"

  @property
  def client(self) -> Any:
    if self._client is None:
      import openai  # noqa: PLC0415 (only a build that uses an endpoint pays for it)

      api_key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
      # A callable key that gives "" lets the client start without one; _headers then omits the header.
      self._client = openai.OpenAI(
          base_url=self.url, api_key=api_key or (lambda: ""), timeout=self.timeout_s, max_retries=self.retries,
      )
    return self._client

  def _headers(self) -> dict[str, Any]:
    import openai  # noqa: PLC0415

    return {} if self.client.api_key else {"Authorization": openai.Omit()}

  @property
  def model(self) -> str:
    """The model name asked for (probes the server on first use)."""
    self._probe()
    return self._model

  @property
  def fingerprint(self) -> str:
    self._probe()
    return self._fingerprint

  def _probe(self) -> None:
    """`GET /models` once: the server answers (else a ConfigError naming the URL), the model to ask for,
    and the fingerprint the server lists for it."""
    if self._model is not None:
      return
    import openai  # noqa: PLC0415

    try:
      body: Any = json.loads(self.client.models.with_raw_response.list(extra_headers=self._headers()).text)
    except openai.APIConnectionError as err:  # a timeout too
      raise ConfigError(
          f"{self.where} cannot be reached ({_described(err)}): start the server, or fix the URL"
      ) from None
    except openai.APIStatusError as err:
      if err.status_code != 404 or not self.model_setting:  # a server without /models needs the name given
        raise self._refused(err, "GET /models") from None
      body = None
    except ValueError:  # a 200 that is no JSON: no listed model
      body = None
    listed = listed_models(body)
    name = self.model_setting or (listed[0]["id"] if listed else "")
    if not name:
      raise ConfigError(f"{self.where} lists no model at GET /models: set {SETTINGS}.model to the name it serves")
    entry = next((m for m in listed if m["id"] == name), {})
    self._model, self._weights = name, weights_of(entry)
    self._fingerprint = fingerprint_of(self.url, name, served_of(entry))
    log.info(
        "annotator: %s, model %r (%s)", self.url, name,
        f"API key from ${self.api_key_env}" if self.client.api_key else "no API key",
    )
    if not self._weights:
      listed_of = served_of(entry)
      log.warning(
          "annotator: %s lists no weights' fingerprint for %r at GET /models, so the annotation cache tells its "
          "models apart by %s only: after putting other weights behind them, use another build folder (or delete "
          "annotations.sqlite)", self.url, name,
          f"the URL, the name and what it lists of the model ({listed_of})" if listed_of else "the URL and the name",
      )

  def _refused(self, err: Any, what: str) -> ConfigError:
    """The ConfigError of an answer that every request would get alike."""
    remedy = {
        401: f"set the environment variable {SETTINGS}.api_key_env names (${self.api_key_env}) to a valid API key",
        403: f"the API key in ${self.api_key_env} may not use this server or model",
        404: f"check the base URL (it usually ends in /v1) and {SETTINGS}.model",
    }.get(err.status_code, "check the server's log")
    return ConfigError(f"{self.where}: {what} answered {_described(err)}: {remedy}")

  def _ask(self, chat: Chat, decoding: Decoding) -> Generation:
    import openai  # noqa: PLC0415

    extra = {"top_k": decoding.top_k} if decoding.top_k else None  # not in the API; vLLM, TGI, sft serve take it
    try:
      raw = self.client.chat.completions.with_raw_response.create(
          model=self._model, messages=[dict(m) for m in chat], max_tokens=decoding.max_new_tokens,
          temperature=decoding.temperature, top_p=decoding.top_p, seed=decoding.seed, extra_body=extra,
          extra_headers=self._headers(),
      )
    except openai.APIStatusError as err:
      if err.status_code in (401, 403, 404):
        raise self._refused(err, "POST /chat/completions") from None
      return _broken(_described(err))
    except openai.APIError as err:  # a connection or timeout still failing after its retries
      return _broken(_described(err))
    charset = raw.http_response.charset_encoding or "UTF-8"
    try:  # strictly: U+FFFD in the place of what the model said would be stored as its answer
      text = raw.content.decode(charset)
    except (LookupError, UnicodeDecodeError) as err:  # an unknown charset, or bytes it does not read
      return _broken(f"the answer is not valid {charset} ({err})"[:_SHOWN])
    answered = system_fingerprint_of(text)
    if self._weights and answered and answered != self._weights:
      raise ConfigError(
          f"{self.where} answered with the weights {answered!r}, not the {self._weights!r} GET /models listed on first "
          "use (the server was restarted on other weights): run the build again to annotate with the new ones"
      )
    return generation_of(text)

  def generate(self, chats: Sequence[Chat], decoding: Decoding) -> list[Generation]:
    """One Generation per chat, in order; equal chats are asked once. A chat whose request fails (after
    the retries) or whose answer breaks the API's shape comes back with `error` set."""
    if not chats:
      return []
    self._probe()
    keys = [json.dumps(list(chat), sort_keys=True, default=str) for chat in chats]
    first: dict[str, Chat] = {}
    for k, chat in zip(keys, chats):
      first.setdefault(k, chat)
    distinct = list(first)
    answers: dict[str, Generation] = {}
    pool = concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(distinct)), "sft-endpoint")
    try:
      with bar(len(distinct), "annotate: asking the endpoint", " records", enabled=self.progress) as progress:
        futures = {pool.submit(self._ask, first[k], decoding): k for k in distinct}
        for future in concurrent.futures.as_completed(futures):
          answers[futures[future]] = future.result()  # a ConfigError stops the call here
          progress.update(1)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    return [answers[k] for k in keys]

  def log_likelihoods(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[float]:
    raise ConfigError(
        f"{self.where} is an OpenAI-compatible endpoint, whose chat API cannot score a given answer: "
        "set annotate.label.method='generate'"
    )
