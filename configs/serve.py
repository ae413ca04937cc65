"""python launch.py --config=configs/serve.py --workdir=/tmp/sft-quickstart   (or: sft serve --config=serve --workdir=...)

Serves a model over HTTP with OpenAI's API (chat and text completions, streaming, logprobs) on
127.0.0.1:8000: the latest checkpoint of a training workdir, built as it was trained, or a Hugging Face folder
given as --workdir. Requests are batched as they come (continuous batching over --config.slots rows).
Point any OpenAI client at http://127.0.0.1:8000/v1; set SFT_API_KEY in the environment to require a key.
Every key and its default: sft/serve/config.py; how to use it: docs/serve.md.
"""

from sft.serve.config import serve_config


def get_config():
  return serve_config()
