"""Shared fixtures: a small real SentencePiece tokenizer and a tiny model config; the skip gate; the example
counts of each tier; a compilation cache for the session."""

import os
import shutil
import sys
import tempfile

import jax
import pytest
from hypothesis import settings

# Tests import `sft` and `configs` from the checkout, whatever the working directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# A run with skipped tests fails unless SFT_ALLOW_SKIPS=1 (tests/skips_plugin.py).
pytest_plugins = ["skips_plugin"]

from sft.databuilder import api_records, pretrain_texts, read_module  # noqa: E402
from sft.model import ModelConfig  # noqa: E402
from sft.tokenizer import train_tokenizer  # noqa: E402

# Example counts live here, not in the tests: the full suite (what CI runs) tries as many as the most any
# property asked for before; the fast tier (`-m "not slow"`) a few of each. `--hypothesis-profile=ci|dev`
# picks one by hand. A test keeps its own count only where its examples are costly, said beside it.
settings.register_profile("ci", max_examples=400, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)


def _fast_tier(config):
  return "not slow" in " ".join((config.getoption("markexpr") or "").split())


def pytest_configure(config):
  if not config.getoption("hypothesis_profile", None):
    settings.load_profile("dev" if _fast_tier(config) else "ci")
  _compilation_cache(config)


def _compilation_cache(config):
  """Programs compiled once per session, not once per test: the tests build the same tiny models again and
  again, and XLA's result is the same either way. A fresh folder per session (runs side by side share
  nothing); a JAX_COMPILATION_CACHE_DIR set by hand wins."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  folder = tempfile.mkdtemp(prefix="sft-test-jit-cache-")
  config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def stdlib_sample():
  """ApiDocs of a few standard-library modules, read from their source."""
  import inspect
  import json.decoder
  import json.encoder
  import shlex
  import string
  import textwrap

  docs = []
  for module in (json.decoder, json.encoder, shlex, string, textwrap):
    docs += read_module(inspect.getsource(module), module.__name__)
  return docs


@pytest.fixture(scope="session")
def tokenizer(stdlib_sample):
  records, _ = api_records(stdlib_sample)
  texts = [r["text"] for r in pretrain_texts(stdlib_sample)] + [m["content"] for r in records for m in r["messages"]]
  return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="session")
def chat_records(stdlib_sample):
  return api_records(stdlib_sample)[0]


@pytest.fixture
def tiny_model_config():
  return ModelConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, chat_records):
  """A data build of the chat records (no language filter, 10% validation): what tiny training runs read."""
  import json

  from sft.databuilder import build_config, build_dataset

  raw = tmp_path_factory.mktemp("raw")
  (raw / "chats.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in chat_records))
  config = build_config()
  config.input_dir = str(raw)
  config.filter.language.enabled = False
  config.output.validation_fraction = 0.1
  out = tmp_path_factory.mktemp("built") / "data"
  build_dataset(config, out, progress=False)
  return out
