"""The config check at resume (which keys a resumed run may change) and the config a run writes."""

import functools
import json
import logging
import os

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.errors import ConfigError
from sft.trainer import rundir

# The keys the trainer lets a resumed run change, as the spec states them (not read from the module).
SAFE = ("train.sft_steps", "train.pretrain_steps", "train.log_every", "eval", "sample", "checkpoint", "mesh",
        "sharding_rules", "model.remat", "model.remat_policy", "model.scan_layers", "model.attention", "train.grad_accum_steps", "train.loss_chunk_size", "train.parallelism")


@functools.lru_cache(maxsize=1)
def _base_json() -> str:
  from sft.config import base_config

  return base_config().to_json()


def _base() -> dict:
  """base_config() as config.json holds it; a fresh copy each call."""
  return json.loads(_base_json())


def _leaves(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}.{key}" if prefix else key
    if isinstance(value, dict) and value:
      yield from _leaves(value, path)
    else:
      yield path, value


def _set(tree: dict, path: str, value) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree[key]
  tree[last] = value


def _delete(tree: dict, path: str) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree[key]
  del tree[last]


def _is_safe(path: str) -> bool:
  return any(path == key or path.startswith(key + ".") for key in SAFE)


def _changed(old):
  """A strategy for a JSON value that differs from `old`."""
  if isinstance(old, bool):
    return st.just(not old)
  if isinstance(old, int):
    return st.integers(1, 10**6).map(lambda d: old + d)
  if isinstance(old, float):
    return st.floats(0.5, 1e3).map(lambda d: old + d)
  if isinstance(old, str):
    return st.text(min_size=1, max_size=8).map(lambda s: old + s)
  if isinstance(old, list):
    return st.lists(st.text(max_size=4), min_size=1, max_size=3).map(lambda extra: old + extra)
  if isinstance(old, dict):
    return st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
  return st.integers()


def test_the_base_config_has_safe_and_unsafe_keys():
  paths = [p for p, _ in _leaves(_base())]
  assert any(map(_is_safe, paths)) and not all(map(_is_safe, paths))
  assert all(any(p == k or p.startswith(k + ".") for p in paths) for k in SAFE)  # no key of SAFE is misspelt


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_changes_at_resume_are_listed_or_refused(data):
  saved, new = _base(), _base()
  leaves = dict(_leaves(saved))
  paths = data.draw(st.lists(st.sampled_from(sorted(leaves)), min_size=0, max_size=4, unique=True))
  lines = {}
  for path in paths:
    old, value = leaves[path], data.draw(_changed(leaves[path]))
    _set(new, path, value)
    if old == {}:  # a mapping that was empty: each key is a change of its own
      lines.update({f"{path}.{k}": f"{path}.{k}: (absent) -> {json.dumps(v)}" for k, v in value.items()})
    else:
      lines[path] = f"{path}: {json.dumps(old)} -> {json.dumps(value)}"
  refused = [p for p in lines if not _is_safe(p)]
  if refused:
    with pytest.raises(ConfigError) as e:
      rundir.resume_changes(saved, new, start_step=30)
    message = str(e.value)
    assert "new workdir" in message and "step 30" in message
    assert all(f"  {lines[p]}\n" in message for p in refused), message
    assert not any(f"  {lines[p]}\n" in message for p in lines if _is_safe(p)), message
  else:
    assert sorted(rundir.resume_changes(saved, new, start_step=30)) == sorted(lines.values())


def test_a_saved_config_read_back_from_json_is_no_change(tmp_path):
  from sft.config import finetune_config

  config = finetune_config("lora")  # tuples (lora_targets, sharding_rules) come back from JSON as lists
  rundir.write_run_config(tmp_path, config, 0)
  assert rundir.resume_changes(rundir.load_saved_config(tmp_path), config.to_dict(), 10) == []
  config.train.sft_steps = 3000
  assert rundir.resume_changes(rundir.load_saved_config(tmp_path), config.to_dict(), 10) == ["train.sft_steps: 1000 -> 3000"]


def test_a_key_the_saved_config_lacks_is_no_change_at_its_default():
  saved, new = _base(), _base()
  _delete(saved, "eval.answer_normalization")
  _delete(saved, "model.qk_norm")
  assert rundir.resume_changes(saved, new, 5) == []
  _set(new, "eval.answer_normalization", "whitespace")
  assert rundir.resume_changes(saved, new, 5) == ['eval.answer_normalization: (absent) -> "whitespace"']
  _set(new, "model.qk_norm", True)
  with pytest.raises(ConfigError, match=r"model\.qk_norm: \(absent\) -> true"):
    rundir.resume_changes(saved, new, 5)


def test_a_key_the_new_config_lacks_is_a_change():
  saved, new = _base(), _base()
  _set(saved, "model.retired_key", 3)
  _set(saved, "eval.retired_key", 4)
  with pytest.raises(ConfigError) as e:
    rundir.resume_changes(saved, new, 5)
  assert "model.retired_key: 3 -> (absent)" in str(e.value)
  assert "eval.retired_key" not in str(e.value).split("Keys that may change")[0]


def test_resuming_without_a_saved_config_checks_nothing(caplog):
  with caplog.at_level(logging.WARNING, logger="sft"):
    assert rundir.resume_changes(None, _base(), 5) == []
  assert "cannot be checked" in caplog.text


def test_load_saved_config(tmp_path):
  assert rundir.load_saved_config(tmp_path) is None
  path = tmp_path / "config.json"
  path.write_text('{"seed": 1}')
  assert rundir.load_saved_config(tmp_path) == {"seed": 1}
  for text in ('{"seed": ', "[1, 2]"):
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
      rundir.load_saved_config(tmp_path)


# --- writing the config --------------------------------------------------------------------------


def test_the_written_config_is_the_configs_json_and_serve_can_read_it(tmp_path):
  from sft.config import base_config

  config = base_config()
  rundir.write_run_config(tmp_path, config, 0)
  assert (tmp_path / "config.json").read_text() == config.to_json(indent=2) + "\n"
  rundir.write_run_config(tmp_path, config.to_dict(), 0)
  assert (tmp_path / "config.json").read_text() == ml_collections.ConfigDict(config.to_dict()).to_json(indent=2) + "\n"
  assert (tmp_path / "config-0.json").read_text() == (tmp_path / "config.json").read_text()
  read_back = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))  # as serve.py does
  assert read_back.model.d_model == config.model.d_model and read_back.train.lr == config.train.lr


def test_each_start_keeps_its_config_and_config_json_is_the_latest(tmp_path):
  rundir.write_run_config(tmp_path, {"train": {"sft_steps": 100}}, 0)
  rundir.write_run_config(tmp_path, {"train": {"sft_steps": 300}}, 100)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config-0.json", "config-100.json", "config.json"]
  assert json.loads((tmp_path / "config-0.json").read_text()) == {"train": {"sft_steps": 100}}
  assert json.loads((tmp_path / "config.json").read_text()) == {"train": {"sft_steps": 300}}


def test_a_failed_write_leaves_the_old_config_and_no_temporary_file(tmp_path, monkeypatch):
  rundir.write_run_config(tmp_path, {"seed": 1}, 0)
  before = sorted(p.name for p in tmp_path.iterdir())

  def broken_fsync(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", broken_fsync)
  with pytest.raises(OSError, match="disk full"):
    rundir.write_run_config(tmp_path, {"seed": 2}, 0)
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1}
