"""What a run checks beyond the config's keys: the data it is given (every problem at once, nothing left
behind), values handed to library functions directly, and the runtime model keys declared once."""

import json

import pytest
from test_configs import problems_of

from sft.config import base_config
from sft.databuilder import build_config, build_dataset
from sft.errors import ConfigError
from sft.model.config import model_at_resume, runtime_fields, served_as_given
from sft.trainer import inspect as trainer_inspect
from sft.trainer import loop, rundir, sources
from sft.trainer.checkpoint import Checkpointer


def run_on_a_small_build(tmp_path, chat_records, *, validation_fraction):
  """A run config reading a build of 20 chats (no pretrain split)."""
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "chats.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in chat_records[:20]))
  build = build_config()
  build.input_dir, build.filter.language.enabled = str(raw), False
  build.output.validation_fraction = validation_fraction
  build_dataset(build, tmp_path / "data", progress=False)
  config = base_config()
  config.data.source, config.data.dir = "dir", str(tmp_path / "data")
  return config


def test_a_data_folder_that_is_not_a_build_names_data_dir(tmp_path):
  config = base_config()
  config.data.source, config.data.dir = "dir", str(tmp_path / "placeholder")
  with pytest.raises(ConfigError, match=r"^data.dir='.*placeholder': .*no manifest.json"):
    sources.load_splits(config, tmp_path / "run")


def test_the_runtime_model_keys_are_declared_once():

  assert set(model_at_resume()) <= set(served_as_given()) <= set(runtime_fields())
  assert {"dtype", "param_dtype", "lora_rank"} <= set(runtime_fields()) and "d_model" not in runtime_fields()
  trained = json.loads(base_config().to_json())
  changed = base_config()
  changed.model.remat_policy, changed.train.grad_accum_steps = "save_dots", 2  # how, not what: allowed at resume
  assert len(rundir.resume_changes(trained, changed, 5)) == 2
  changed.model.lora_rank = 4  # what is trained: refused
  with pytest.raises(ConfigError, match="model.lora_rank: 0 -> 4"):
    rundir.resume_changes(trained, changed, 5)


def test_every_empty_split_is_named_at_once_and_a_refused_run_leaves_no_config(tmp_path, chat_records):
  config = run_on_a_small_build(tmp_path, chat_records, validation_fraction=0.0)  # no validation, no pretrain split
  config.train.pretrain_steps = 1
  with pytest.raises(ConfigError) as refused:
    loop.train_and_evaluate(config, tmp_path / "run")
  assert str(refused.value).startswith("2 problems with the data build"), refused.value
  assert "the validation split" in str(refused.value) and "the pretrain split" in str(refused.value)
  assert not (tmp_path / "run" / "config.json").exists()


def test_a_vocabulary_the_data_cannot_fill_names_its_key(tmp_path, chat_records):
  config = run_on_a_small_build(tmp_path, chat_records, validation_fraction=0.2)
  config.tokenizer.vocab_size = 50_000
  with pytest.raises(ConfigError, match=r"^tokenizer.vocab_size=50000: cannot train a tokenizer"):
    loop.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()


def test_library_entry_points_apply_the_declared_rules_to_values_handed_to_them(tmp_path):
  with pytest.raises(ConfigError, match=r"^checkpoint.max_to_keep: must be >= 1, got 0"):
    Checkpointer(tmp_path / "ckpt", max_to_keep=0, save_interval_steps=1)  # 0 would delete what it saves
  config = base_config()
  config.train.grad_accum_steps = 3  # does not divide 16
  with pytest.raises(ConfigError, match="train.grad_accum_steps \\(3\\) must divide"):
    loop.train_and_evaluate(config, tmp_path / "run")
  with pytest.raises(ConfigError, match="train.grad_accum_steps \\(3\\) must divide"):
    trainer_inspect.inspect_training_rows(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  config = base_config()
  config.unlock()
  config.data.source = "buld"
  with pytest.raises(ConfigError, match="data.source: must be one of 'build', 'dir'"):
    sources.data_folder(config, tmp_path / "run")
  config = base_config()
  config.model.lora_targets = [["q"]]  # not hashable: a clear problem, not a TypeError
  assert problems_of(config) == "model.lora_targets must hold projection names (strings), got [['q']]"
