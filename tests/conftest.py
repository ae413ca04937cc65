"""Shared fixtures: a small real SentencePiece tokenizer and a tiny model config; the skip gate; the example
counts of each tier."""

import os
import sys

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

# Hypothesis example counts: the full suite (what CI runs) tries each property's own count (100 where it
# sets none, Hypothesis's default); the fast tier (`-m "not slow"`) caps every property at FAST_EXAMPLES.
# `--hypothesis-profile=ci|dev` picks one by hand.
FAST_EXAMPLES = 25
settings.register_profile("ci", deadline=None)
settings.register_profile("dev", max_examples=FAST_EXAMPLES, deadline=None)


def _fast_tier(config):
  return "not slow" in " ".join((config.getoption("markexpr") or "").split())


def pytest_configure(config):
  if not config.getoption("hypothesis_profile", None):
    settings.load_profile("dev" if _fast_tier(config) else "ci")


def pytest_collection_modifyitems(config, items):
  """In the fast tier, a property's own count is capped too (a decorator's count outranks the profile)."""
  if not _fast_tier(config) and config.getoption("hypothesis_profile", None) != "dev":
    return
  for item in items:
    test = getattr(item, "obj", None)
    own = getattr(test, "_hypothesis_internal_use_settings", None)
    if own is not None and own.max_examples > FAST_EXAMPLES:
      test._hypothesis_internal_use_settings = settings(own, max_examples=FAST_EXAMPLES)


def pytest_generate_tests(metafunc):
  """A test marked `both_kernel_paths` (a module's `pytestmark` included) runs with the CPU-tuned kernels and
  again with the code GPUs and TPUs run (sft.model.backend); the second run is in the full suite only (`slow`).
  `cpu_kernels_only` keeps a test of the CPU-tuned code itself to the first."""
  if metafunc.definition.get_closest_marker("both_kernel_paths"):
    paths = [pytest.param(True, id="cpu_kernels")]
    if not metafunc.definition.get_closest_marker("cpu_kernels_only"):
      paths.append(pytest.param(False, id="accelerator_kernels", marks=pytest.mark.slow))
    metafunc.parametrize("kernel_path", paths, indirect=True)


@pytest.fixture(autouse=True)
def kernel_path(request):
  """The kernels a `both_kernel_paths` test runs with; the backend's default for every other test."""
  from sft.model.backend import cpu_kernels

  with cpu_kernels(getattr(request, "param", None)):
    yield


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
