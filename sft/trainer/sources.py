"""Where a run's data, tokenizer and starting weights come from, as its config says.

data.source = "build": the data builder runs with data.build into <workdir>/data (the default
                        data.build reads the embedded stdlib API docs).
data.source = "dir":    the output folder of a data build (ArrayRecord shards per split).
model.checkpoint = "":  a model trained from scratch with a SentencePiece tokenizer trained on the data.
model.checkpoint = dir: a Hugging Face model folder: its config, weights, tokenizer and chat template.

With several processes (one filesystem), process 0 alone builds the data, trains the tokenizer and
writes the export while the others wait; then every process reads the finished files.
"""

from __future__ import annotations

import collections.abc
import json
import logging
import pathlib
import shutil
from typing import Any

import grain
import jax
import ml_collections

from sft import databuilder, hf
from sft.config import check_value
from sft.config_keys import raise_problems
from sft.console import track
from sft.errors import ConfigError
from sft.model import ModelConfig, lora
from sft.tokenizer import ChatTokenizer, get_or_train_tokenizer, load_tokenizer
from sft.trainer import multihost, setup
from sft.trainer.workdir import Workdir

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
  """train, eval (the builder's validation split) and pretrain records of a data build's output; every
  missing or empty split it needs is named in one ConfigError."""
  splits, problems = {}, []
  for name, split, required in (("train", "train", True), ("eval", "validation", True), ("pretrain", "pretrain", need_pretrain)):
    paths = databuilder.split_files(folder, split)
    splits[name] = JsonRecords(paths)
    if required and not paths:
      problems.append(f"{folder} has no {split}-*.array_record shards: is it the output of a data build?")
    elif required and not len(splits[name]):
      problems.append(f"the {split} split of {folder} is empty" + (" (train.pretrain_steps > 0 needs it)" if name == "pretrain" else ""))
  raise_problems(problems, f"with the data build {folder}")
  return splits


def data_folder(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """Where a run's data build is: data.dir (data.source "dir"), or <workdir>/data, built there."""
  check_value("data.source", config.data.source)
  return pathlib.Path(config.data.dir) if config.data.source == "dir" else Workdir(workdir).data


def load_splits(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, *, annotator: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(splits, accounting): splits are train, eval and pretrain record sequences. With data.source
  "build" the build runs first when <workdir>/data holds none (`annotator` serves its annotation).
  Either way the folder must hold a finished build: a manifest whose every output is there, whole."""
  folder = data_folder(config, workdir)
  if config.data.source == "build":
    multihost.on_process_0(lambda: _ensure_built(config, folder, annotator), "building the data")
  try:
    manifest = databuilder.check_outputs(folder)
  except ConfigError as err:
    if config.data.source != "dir":
      raise
    raise ConfigError(f"data.dir={str(folder)!r}: {err} (data.dir names the output folder of a data build)") from None
  splits = read_built(folder, need_pretrain=config.train.pretrain_steps > 0)
  return splits, {"records": {k: len(v) for k, v in splits.items()}, "build": manifest["accounting"]["total"]}


def _ensure_built(config: ml_collections.ConfigDict, folder: pathlib.Path, annotator: Any) -> dict[str, Any]:
  """ensure_built, on process 0 while the others wait: so no annotation model can serve it (the model's
  mesh spans every process's devices)."""
  if annotator is not None and jax.process_count() > 1 and databuilder.load_manifest(folder) is None:
    raise ConfigError(
        "data.build.annotate.model needs a single process: build the data first (launch.py with the "
        "data.build config), then train with data.source='dir'"
    )
  return databuilder.ensure_built(config.data.build, folder, annotator=annotator)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path, splits: dict[str, Any]) -> ChatTokenizer:
  """The checkpoint's tokenizer, or the workdir's SentencePiece model (trained on the data if absent)."""
  path = setup.tokenizer_path(config, workdir)
  if config.model.checkpoint:
    tokenizer = load_tokenizer(path)
    log.info("tokenizer: %s (vocab %d) with its chat template", path, tokenizer.vocab_size)
    return tokenizer
  # Process 0 alone looks for the file and trains if it is absent (each process looking by itself
  # could see it appear meanwhile); the others then load what it left.
  made = multihost.on_process_0(lambda: _get_or_train_tokenizer(config, path, splits), "preparing the tokenizer")
  tokenizer, trained = made or get_or_train_tokenizer(path, (), config.tokenizer.vocab_size)
  log.info("tokenizer: %s %s (vocab %d)", "trained" if trained else "loaded", path, tokenizer.vocab_size)
  return tokenizer


def _get_or_train_tokenizer(config: ml_collections.ConfigDict, path: pathlib.Path, splits: dict[str, Any]):
  texts = [r["text"] for r in splits["pretrain"]]
  texts += [m["content"] for r in splits["train"] for m in r["messages"]]
  if not path.exists():
    log.info("tokenizer: training a SentencePiece model (vocab %d) on %s texts", config.tokenizer.vocab_size, f"{len(texts):,}")
    texts = track(texts, "tokenizer: reading texts", total=len(texts), unit=" texts")
  try:
    return get_or_train_tokenizer(path, texts, config.tokenizer.vocab_size)
  except ConfigError as err:  # SentencePiece refuses a vocabulary the texts cannot fill: name the key to lower
    raise ConfigError(f"tokenizer.vocab_size={config.tokenizer.vocab_size}: {err}") from None


def checkpoint_family(config: ml_collections.ConfigDict) -> str:
  return json.loads((pathlib.Path(config.model.checkpoint) / "config.json").read_text())["model_type"]


def export(config: ml_collections.ConfigDict, params: Any, cfg: ModelConfig, folder: pathlib.Path) -> pathlib.Path:
  """The fine-tuned model as a Hugging Face folder (LoRA adapters merged into the weights), with the
  tokenizer and chat template it was trained with. Every process takes part (sharded weights are
  gathered); process 0 writes."""
  params, cfg = lora.merge(params, cfg)
  # The source's config.json as the base: token ids, context length and fields this project does not model stay.
  base = hf.read_hf_config(pathlib.Path(config.model.checkpoint) / "config.json")
  hf.export_model(params, cfg, folder, checkpoint_family(config), base_config=base)
  multihost.on_process_0(lambda: _copy_tokenizer_files(pathlib.Path(config.model.checkpoint), folder), "exporting")
  return folder


def _copy_tokenizer_files(checkpoint: pathlib.Path, folder: pathlib.Path) -> None:
  for name in TOKENIZER_FILES:
    if (checkpoint / name).exists():
      shutil.copy2(checkpoint / name, folder / name)
