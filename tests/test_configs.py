"""Every experiment config loads, starts its docstring with the command that runs it, and is valid."""

import importlib
import pathlib

import pytest

from sft.config import ConfigError
from sft.model import ModelConfig

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_documents_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  assert module.__doc__.startswith(f"python launch.py --config=configs/{name}.py"), module.__doc__[:80]
  if name.startswith("build_"):  # a data build: its parameters must pass the builder's checks
    from sft.databuilder.pipeline import list_inputs, params_of

    assert list_inputs(params_of(module.get_config()))
    return
  args = ["full", "lora"] if name != "quickstart" else [None]
  for arg in args:
    config = module.get_config() if arg is None else module.get_config(arg)
    model = config.model.to_dict()
    model.pop("checkpoint")
    ModelConfig(vocab_size=config.tokenizer.vocab_size, **model)  # raises on an impossible value


def test_unknown_config_argument_is_an_error():
  from configs import llama

  with pytest.raises(ConfigError, match="'full' or 'lora'"):
    llama.get_config("qlora")
