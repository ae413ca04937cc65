"""Every key of `sft serve`: its default, its check and its meaning, in one place. `configs/serve.py` starts
from `serve_config()`; the model served is the folder given as --workdir (a training workdir or a
Hugging Face folder)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sft.config_keys import (
  AT_LEAST_1,
  OneOf,
  Range,
  key,
  locked,
  problems_against,
  raise_problems,
  rule_problems,
  to_config_dict,
)


@dataclasses.dataclass(frozen=True)
class Serve:
  job: str = key("serve", OneOf(("serve",)))  # launch.py serves the model for this config
  backend: str = key("auto", OneOf(("auto", "workdir", "hf")))  # auto: told apart by the folder's files
  name: str = key("")  # the model's name in the API (GET /v1/models, a request's "model"); "": the folder's name
  host: str = key("127.0.0.1")  # the address to listen on; 0.0.0.0 exposes the server to the network
  port: int = key(8000, Range(0, 65535))  # 0: any free port (the log line says which)
  context: int = key(0, Range(0))  # prompt + answer tokens per request; 0: the model's (train.seq_len, or 2048 capped)
  slots: int = key(8, AT_LEAST_1)  # requests decoded together (the KV cache holds slots x context)
  decode_chunk: int = key(8, Range(1, 64))  # decoding steps per device call: fewer round trips, later admissions
  max_tokens: int = key(1024, AT_LEAST_1)  # a request's max_tokens is capped to this
  default_max_tokens: int = key(256, AT_LEAST_1)  # a chat request without max_tokens (a completion: 16, as OpenAI)
  max_waiting: int = key(256, AT_LEAST_1)  # requests queued for a slot; past it, 429 with Retry-After
  max_body_bytes: int = key(4 << 20, AT_LEAST_1)  # a larger request body is refused (413)
  # The environment variable holding the API key; when it is set, every request but /health must carry
  # "Authorization: Bearer <key>". The key itself never sits in a config.
  api_key_env: str = key("SFT_API_KEY")
  shutdown_timeout_s: float = key(30.0, Range(0))  # on SIGTERM: in-flight requests get this long, then are cancelled
  warmup: bool = key(True)  # compile the decoding step before listening, so the first request waits for no compiler


def serve_config() -> ml_collections.ConfigDict:
  """The defaults, locked: a key a config file or a flag misspells fails where it is set."""
  return locked(to_config_dict(Serve), Serve)


def _defaults_fit(v: dict[str, Any]) -> str | None:
  if v["default_max_tokens"] > v["max_tokens"]:
    return f"default_max_tokens={v['default_max_tokens']} is more than max_tokens={v['max_tokens']}, the cap"
  return None


RULES = ((("default_max_tokens", "max_tokens"), _defaults_fit),)


def check_serve_config(config: ml_collections.ConfigDict) -> None:
  """Raises one ConfigError listing every problem of a serve config."""
  problems, values, bad = problems_against(config, serve_config(), Serve)
  raise_problems([p for p in problems + rule_problems(RULES, values, bad) if p])
