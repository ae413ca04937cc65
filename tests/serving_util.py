"""Tiny models to serve and a server running in this process on a free port, for the serving tests.

    with running_server(config, folder) as (base_url, server):   # base_url: http://127.0.0.1:<port>/v1
        openai.OpenAI(base_url=base_url, api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

import contextlib
import pathlib
import threading
import time

import flax.linen as nn
import jax

from sft.config import base_config
from sft.serve.api import create_app
from sft.serve.config import serve_config
from sft.serve.server import build_server
from sft.trainer import rundir, setup
from sft.trainer.checkpoint import Checkpointer

SEQ_LEN = 128


def tiny_workdir(folder: pathlib.Path, tokenizer, seq_len: int = SEQ_LEN, step: int = 1):
  """(folder, model, params): a training workdir with a checkpoint (at `step`) of random parameters, the
  conftest's SentencePiece tokenizer beside it."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / setup.TOKENIZER_FILE).write_bytes(tokenizer.model_proto)
  config = base_config()
  config.tokenizer.vocab_size = 512
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  config.train.seq_len = seq_len
  rundir.write_run_config(folder, config, 0)
  run = setup.setup_run(config)
  params = nn.unbox(run.model.init(jax.random.key(7), *run.dummy_inputs)["params"])
  checkpointer = Checkpointer(folder / setup.CHECKPOINTS, max_to_keep=1, save_interval_steps=1)
  checkpointer.save(step, {"params": params}, {}, force=True)
  checkpointer.close()
  return folder, run.model, jax.device_get(params)


def make_workdir(folder: pathlib.Path, tokenizer, seq_len: int = SEQ_LEN) -> pathlib.Path:
  """A training workdir with a checkpoint of random parameters (the conftest's SentencePiece tokenizer)."""
  return tiny_workdir(folder, tokenizer, seq_len)[0]


def make_hf_folder(folder: pathlib.Path, template: str | None = None, eos_token: str = "<|im_end|>") -> pathlib.Path:
  """A Hugging Face llama folder (random weights, larger than the default init so answers vary) with a chat
  template tokenizer (ChatML unless `template` is given)."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from test_hf import COMMON  # noqa: PLC0415
  from test_hf_tokenizer import CHATML, make_folder  # noqa: PLC0415

  folder.mkdir(parents=True, exist_ok=True)
  make_folder(folder, template or CHATML, eos_token=eos_token)
  config = transformers.LlamaConfig(**{**COMMON, "vocab_size": 400}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(folder)
  return folder


def test_config(**overrides):  # noqa: PT028
  """A serve config for tests: a small context, 4 slots, any free port."""
  config = serve_config()
  config.update(dict(context=SEQ_LEN, slots=4, decode_chunk=4, name="tiny", port=0, max_tokens=64, default_max_tokens=16))
  config.update(overrides)
  return config


@contextlib.contextmanager
def running_server(config, folder):
  """(base URL of the API, the Server) while uvicorn serves `folder` on a thread of this process."""
  import uvicorn  # noqa: PLC0415

  server = build_server(config, folder)
  uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=config.port, log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not uv.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start")
    time.sleep(0.02)
  port = uv.servers[0].sockets[0].getsockname()[1]
  try:
    yield f"http://127.0.0.1:{port}/v1", server
  finally:
    uv.should_exit = True
    thread.join(30)
    server.engine.stop(0)


test_config.__test__ = False  # a helper, not a test, in the modules that import it
