"""Every experiment config loads, starts its docstring with the command that runs it, and is valid."""

import importlib
import pathlib

import pytest

from sft.errors import ConfigError
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
  from configs import finetune

  with pytest.raises(ConfigError, match="'full' or 'lora'"):
    finetune.get_config("qlora")


def test_the_model_section_is_made_from_model_config():
  # One source of truth: every ModelConfig field but vocab_size (tokenizer.vocab_size) at its default, and
  # the checkpoint path; a field added to ModelConfig becomes a config key with nothing else to edit.
  import dataclasses

  from sft.config import base_config
  from sft.trainer.setup import model_config

  config = base_config()
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  assert set(config.model) == (set(fields) - {"vocab_size"}) | {"checkpoint"}
  for name, default in fields.items():
    if name != "vocab_size":
      assert config.model[name] == default, name
  assert config.tokenizer.vocab_size == fields["vocab_size"]
  assert model_config(config) == ModelConfig()
  config.model.num_layers = 3
  assert model_config(config) == ModelConfig(num_layers=3)
