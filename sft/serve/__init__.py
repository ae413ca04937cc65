"""Serving a model: answering prompts in-process (`respond`) and over HTTP with OpenAI's API (`sft serve`).

    import sft
    sft.respond(config, "/tmp/sft-quickstart", ["What does `json.dumps` do?"])
    from configs import serve
    sft.serve(serve.get_config(), "/tmp/sft-quickstart")       # http://127.0.0.1:8000/v1 until SIGTERM

answers (prompts in, answers out: `respond`) -> loading (a workdir or a Hugging Face folder, opened) -> engine
(continuous batching on the device) -> protocol (OpenAI's request and response shapes) -> api (the routes)
-> server (uvicorn, signals). docs/serve.md shows the clients.
"""

import sys
import types

from sft.serve.answers import load_responder, respond, serving_config

__all__ = ["load_responder", "respond", "run", "serving_config"]


def run(config, workdir):
  """`sft.serve.server.run`: serves the model of `workdir` until SIGINT or SIGTERM."""
  from sft.serve.server import run as run_server  # noqa: PLC0415 (the web stack loads only to serve)

  return run_server(config, workdir)


class _Callable(types.ModuleType):
  """The package and the job share the name `sft.serve`: calling the package serves."""

  def __call__(self, config, workdir):
    return run(config, workdir)


sys.modules[__name__].__class__ = _Callable
