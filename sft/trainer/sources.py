"""Where a run's data, tokenizer and starting weights come from, as its config says.

data.source = "stdlib": the embedded default, built into <workdir>/data.
data.source = "dir":    a folder with train.jsonl and eval.jsonl (and pretrain.jsonl if
                        train.pretrain_steps > 0), e.g. the output of the data builder.
model.checkpoint = "":  a model trained from scratch with a SentencePiece tokenizer trained on the data.
model.checkpoint = dir: a Hugging Face model folder: its config, weights, tokenizer and chat template.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

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


def load_splits(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[dict[str, list], dict[str, Any]]:
  """(splits, summary): splits are train, eval and pretrain record lists."""
  if config.data.source == "stdlib":
    return databuilder.get_or_build_stdlib_dataset(workdir / "data", eval_fraction=config.data.eval_fraction, salt=config.data.salt)
  if config.data.source != "dir":
    raise ConfigError(f"data.source must be 'stdlib' or 'dir', got {config.data.source!r}")
  folder = pathlib.Path(config.data.dir)
  splits = {}
  for name, required in (("train", True), ("eval", True), ("pretrain", config.train.pretrain_steps > 0)):
    path = folder / f"{name}.jsonl"
    if path.exists():
      splits[name] = databuilder.read_jsonl(path)
    elif required:
      raise ConfigError(f"data.dir={str(folder)!r} has no {name}.jsonl" + (" (train.pretrain_steps > 0 needs it)" if name == "pretrain" else ""))
    else:
      splits[name] = []
  summary = {"records": {k: len(v) for k, v in splits.items()}, "dropped_by_reason": {}}
  return splits, summary


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
