"""`sft serve`: the model of a folder loaded once, its engine started, the API listening (uvicorn) until
SIGINT or SIGTERM. On a signal the server stops accepting connections, in-flight requests get
`shutdown_timeout_s` to finish, then what is left is cancelled (each client told so in an error event)
and the process ends as the signal's default would (uvicorn raises it again once it is done: exit status
143 in a shell for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading

import ml_collections

from sft.errors import ConfigError
from sft.serve import loading, protocol
from sft.serve.api import Server, create_app
from sft.serve.config import check_serve_config
from sft.serve.engine import Engine, Job, Sampling

log = logging.getLogger("sft")
GRACE_S = 5.0  # after the engine's deadline, for the last events to reach their clients


def model_context(model: loading.LoadedModel, wanted: int) -> int:
  """The engine's context: the config's `context` (0: the model's own), at most the model's own."""
  own = model.context
  if wanted > own:
    raise ConfigError(f"context={wanted} is more than the {own} tokens this model was built for: lower it (0: the model's own)")
  return wanted or own


def api_key(env_name: str) -> str | None:
  """The key every request must carry, from the environment (None when unset or empty)."""
  return os.environ.get(env_name) or None if env_name else None


def warm_up(engine: Engine) -> None:
  """Compiles the smallest prefill bucket and the decoding step on a throwaway job."""
  done = []
  job = Job([engine.tokenizer.pad_id + 0] * 2, emit=lambda kind, value: done.append(kind),
            sampling=Sampling(max_tokens=engine.chunk + 1))
  engine._start(job, 0)  # noqa: SLF001  (before the loop runs: this thread owns the engine)
  while engine.running:
    engine._step()  # noqa: SLF001


def build_server(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Server:
  """The model loaded and its engine started; the returned Server is what `create_app` serves."""
  check_serve_config(config)
  folder, backend = loading.resolve_backend(str(workdir), config.backend, "--workdir")
  model = loading.load_model(folder, backend, config.slots, config.context, "slots")
  context = model_context(model, config.context)
  engine = Engine(model, slots=config.slots, chunk=config.decode_chunk, max_waiting=config.max_waiting, context=context)
  if config.warmup:
    warm_up(engine)
  engine.start()
  limits = protocol.Limits(context=context, max_tokens=config.max_tokens, default_max_tokens=config.default_max_tokens)
  return Server(
      engine=engine, name=config.name or folder.resolve().name, fingerprint=loading.fingerprint_of(folder, backend),
      limits=limits, api_key=api_key(config.api_key_env), max_body_bytes=config.max_body_bytes,
  )


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
  """Serves until a signal; see the module docstring."""
  import uvicorn  # noqa: PLC0415

  server = build_server(config, workdir)
  deadline_s = config.shutdown_timeout_s

  class Uvicorn(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets)
      bound = [sock.getsockname() for srv in self.servers for sock in srv.sockets]
      port = bound[0][1] if bound else config.port  # --config.port=0: the port the system gave
      log.warning(
          "serving %s as %r on http://%s:%d/v1 (%d slots, context %d)%s", workdir, server.name, config.host, port,
          config.slots, server.limits.context, ", API key required" if server.api_key else "",
      )

    async def shutdown(self, sockets=None):
      # Before uvicorn's graceful wait: the engine drains for shutdown_timeout_s, then tells every job
      # still running or waiting that the server is going (an error event, not a cut stream).
      server.accepting = False
      threading.Thread(target=server.engine.stop, args=(deadline_s,), daemon=True).start()
      await super().shutdown(sockets)

  app = create_app(server)
  uv = Uvicorn(uvicorn.Config(
      # uvicorn's own cut is a backstop past the engine's deadline: the clients' error events go out first.
      app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=deadline_s + GRACE_S,
  ))
  try:
    uv.run()
  finally:
    server.engine.stop(0)
