"""Where a run's data, tokenizer and starting weights come from, as its config says.

data.source = "build": the data builder runs with data.build into <workdir>/data (the default
                        data.build reads the embedded stdlib API docs).
data.source = "dir":    the output folder of a data build (ArrayRecord shards per split).
model.checkpoint = "":  a model trained from scratch with a SentencePiece tokenizer trained on the data.
model.checkpoint = dir: a Hugging Face model folder: its config, weights, tokenizer and chat template.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

import grain
import ml_collections

from sft import databuilder, hf, pipeline
from sft.config import ConfigError
from sft.model import ModelConfig, lora

log = logging.getLogger("sft")
# Files that make a Hugging Face folder's tokenizer; copied beside an exported model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)


class JsonRecords(collections.abc.Sequence):
  """The records of ArrayRecord shards (one JSON object each), random access, decoded on demand."""

  def __init__(self, paths: list[pathlib.Path]):
    self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths]) if paths else None

  def __len__(self) -> int:
    return len(self._source) if self._source is not None else 0

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(index)
    return json.loads(self._source[index % len(self)])


def read_built(folder: pathlib.Path, *, need_pretrain: bool) -> dict[str, Any]:
  """train, eval (the builder's validation split) and pretrain records of a data build's output."""
  splits = {}
  for name, split, required in (("train", "train", True), ("eval", "validation", True), ("pretrain", "pretrain", need_pretrain)):
    paths = databuilder.write.split_files(folder, split)
    if required and not paths:
      raise ConfigError(f"{folder} has no {split}-*.array_record shards: is it the output of a data build?")
    splits[name] = JsonRecords(paths)
    if required and not len(splits[name]):
      raise ConfigError(f"the {split} split of {folder} is empty" + (" (train.pretrain_steps > 0 needs it)" if name == "pretrain" else ""))
  return splits


def load_splits(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """(splits, accounting): splits are train, eval and pretrain record sequences."""
  need_pretrain = config.train.pretrain_steps > 0
  if config.data.source == "dir":
    folder = pathlib.Path(config.data.dir)
    manifest = databuilder.load_manifest(folder)
  elif config.data.source == "build":
    folder = workdir / "data"
    params = databuilder.pipeline.params_of(config.data.build)
    manifest = databuilder.load_manifest(folder)
    if manifest is not None and manifest["config_hash"] != databuilder.pipeline.config_hash(params):
      raise ConfigError(
          f"{folder} holds data built with another data.build config (manifest.json has it); "
          "use a new workdir or delete that folder"
      )
    if manifest is None:
      manifest = databuilder.build_dataset(config.data.build, folder, progress=False)
  else:
    raise ConfigError(f"data.source must be 'build' or 'dir', got {config.data.source!r}")
  splits = read_built(folder, need_pretrain=need_pretrain)
  accounting = manifest["accounting"]["total"] if manifest else {}
  return splits, {"records": {k: len(v) for k, v in splits.items()}, "build": accounting}


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """From the checkpoint's config.json when there is one (dtype and remat still from the run config)."""
  model = config.model.to_dict()
  checkpoint = model.pop("checkpoint")
  if not checkpoint:
    return ModelConfig(vocab_size=config.tokenizer.vocab_size, **model)
  config_path = pathlib.Path(checkpoint) / "config.json"
  if not config_path.exists():
    raise ConfigError(f"model.checkpoint={checkpoint!r} has no config.json")
  cfg = hf.from_hf_config(json.loads(config_path.read_text()), dtype=model["dtype"], param_dtype=model["param_dtype"])
  log.info("model: shape and numerics from %s (the model.* shape keys of the config are not used)", config_path)
  lora = {k: model[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
  return dataclasses.replace(cfg, remat=model["remat"], **lora)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path, splits: dict[str, list]):
  if config.model.checkpoint:
    tokenizer = pipeline.HFTokenizer(config.model.checkpoint)
    log.info("tokenizer: %s (vocab %d) with its chat template", config.model.checkpoint, tokenizer.vocab_size)
    return tokenizer
  texts = [r["text"] for r in splits["pretrain"]]
  texts += [m["content"] for r in splits["train"] for m in r["messages"]]
  tokenizer, trained = pipeline.get_or_train_tokenizer(workdir / "tokenizer.model", texts, config.tokenizer.vocab_size)
  log.info("tokenizer: %s %s (vocab %d)", "trained" if trained else "loaded", workdir / "tokenizer.model", tokenizer.vocab_size)
  return tokenizer


def checkpoint_family(config: ml_collections.ConfigDict) -> str:
  return json.loads((pathlib.Path(config.model.checkpoint) / "config.json").read_text())["model_type"]


def export(config: ml_collections.ConfigDict, params: Any, cfg: ModelConfig, folder: pathlib.Path) -> pathlib.Path:
  """The fine-tuned model as a Hugging Face folder (LoRA adapters merged into the weights), with the
  tokenizer and chat template it was trained with."""
  params, cfg = lora.merge(params, cfg)
  hf.export_model(params, cfg, folder, checkpoint_family(config))
  for name in TOKENIZER_FILES:
    source = pathlib.Path(config.model.checkpoint) / name
    if source.exists():
      shutil.copy2(source, folder / name)
  return folder
