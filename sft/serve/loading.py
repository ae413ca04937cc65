"""Opening a model to answer with: a training workdir of this project (its config.json, latest checkpoint
and tokenizer, built as trained) or a local Hugging Face folder (config.json, *.safetensors and the
tokenizer files). Shared by the server (`sft.serve.engine`) and the data builder's local annotator
(`sft.annotator.local`); nothing is loaded until `load_model`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from typing import Any

import ml_collections

from sft import hf
from sft.config import base_config
from sft.errors import ConfigError
from sft.serve.answers import serving_config
from sft.trainer import rundir, setup
from sft.trainer import step as step_lib
from sft.trainer.workdir import Workdir

log = logging.getLogger("sft")
BACKENDS = ("auto", "workdir", "hf")
DEFAULT_CONTEXT = 2048  # a Hugging Face model's context when none is given (capped by its positions)
# The files of a Hugging Face folder that make its model and tokenizer (the weights are *.safetensors).
HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
)


def detect_backend(path: pathlib.Path, key: str = "model") -> str:
  """"workdir" or "hf", told apart as the eval job tells `eval.compare_to` apart; anything else is a ConfigError."""
  saved = rundir.load_saved_config(path)
  if Workdir(path).checkpoints.exists() or (isinstance(saved, dict) and "train" in saved):
    return "workdir"
  if saved is not None and any(path.glob("*.safetensors")):
    return "hf"
  raise ConfigError(
      f"{key}={str(path)!r} holds no model: give a training workdir with a checkpoint, or a Hugging Face folder "
      "(config.json, *.safetensors and the tokenizer files)"
  )


def check_folder(path: pathlib.Path, backend: str, key: str = "model") -> None:
  """What the backend needs is there, or a one-line ConfigError; nothing is loaded."""
  where = f"{key}={str(path)!r}"
  if backend == "workdir":
    if rundir.load_saved_config(path) is None:
      raise ConfigError(f"{where} has no config.json: is it the workdir of a training run?")
    if setup.latest_step(path) is None:
      raise ConfigError(f"{where} has no checkpoint: train there first")
    return
  has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
  missing = [name for name, ok in (
      ("config.json", (path / "config.json").is_file()),
      ("*.safetensors", any(path.rglob("*.safetensors"))),
      ("tokenizer.json or tokenizer.model", has_tokenizer),
  ) if not ok]
  if missing:
    raise ConfigError(f"{where} is no Hugging Face folder: it has no {' and no '.join(missing)}")

def resolve_backend(path: str, backend: str, key: str = "model") -> tuple[pathlib.Path, str]:
  """(the folder, "workdir" or "hf"): `backend` checked, "auto" told apart by the folder's files, and
  what the backend needs found there, or a one-line ConfigError naming `key`. Nothing is loaded."""
  if backend not in BACKENDS:
    raise ConfigError(f"{key}: the backend must be one of {BACKENDS}, got {backend!r}")
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise ConfigError(f"{key}={str(path)!r} is not a folder: give a training workdir or a Hugging Face folder")
  kind = detect_backend(folder, key) if backend == "auto" else backend
  check_folder(folder, kind, key)
  return folder, kind


# --- the fingerprint --------------------------------------------------------------------------------


def _files_under(root: pathlib.Path, prefix: str = "") -> list[tuple[str, pathlib.Path]]:
  return [(prefix + p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]


def _hf_files(folder: pathlib.Path, prefix: str = "") -> list[tuple[str, pathlib.Path]]:
  named = [(prefix + name, folder / name) for name in HF_FILES if (folder / name).is_file()]
  weights = [(prefix + p.relative_to(folder).as_posix(), p) for p in folder.rglob("*.safetensors")]
  return named + weights


def model_files(path: pathlib.Path, backend: str) -> list[tuple[str, pathlib.Path]]:
  """(name relative to the model's folder, path) of every file its weights, tokenizer and model config
  are read from, sorted by name. A workdir fine-tuned from a Hugging Face model adds that folder's
  config.json and tokenizer files (under "model.checkpoint/"): its shape and tokenizer come from there."""
  if backend == "hf":
    return sorted(_hf_files(path))
  step = setup.latest_step(path)
  files = [(Workdir(".").config.name, Workdir(path).config)]
  if Workdir(path).tokenizer.is_file():
    files.append((Workdir(".").tokenizer.name, Workdir(path).tokenizer))
  if step is not None:
    files += _files_under(Workdir(path).checkpoints / str(step), f"{setup.CHECKPOINTS}/{step}/")
  checkpoint = (rundir.load_saved_config(path) or {}).get("model", {}).get("checkpoint")
  if checkpoint:
    files += [f for f in _hf_files(pathlib.Path(checkpoint), "model.checkpoint/") if not f[0].endswith(".safetensors")]
  return sorted(files)


def fingerprint_of(path: pathlib.Path, backend: str) -> str:
  """16 hex digits of the sha256 over the backend kind and each file's name and bytes, in name order:
  the same files give the same fingerprint wherever they lie; one changed byte gives another."""
  digest = hashlib.sha256(f"sft.annotator/{backend}\n".encode())
  for name, file in model_files(path, backend):
    with open(file, "rb") as f:
      content = hashlib.file_digest(f, "sha256").hexdigest()
    digest.update(f"{name}\0{content}\n".encode())
  return digest.hexdigest()[:16]


# --- the model --------------------------------------------------------------------------------------


def _hf_context(folder: pathlib.Path, context: int) -> int:
  """A Hugging Face model's context: `context` (or DEFAULT_CONTEXT) capped by the positions its
  config.json declares."""
  hf_config = hf.read_hf_config(folder / "config.json")
  positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
  wanted = context or DEFAULT_CONTEXT
  return min(wanted, positions) if isinstance(positions, int) and positions > 0 else wanted


def _run_config(path: pathlib.Path, backend: str, context: int) -> ml_collections.ConfigDict:
  """The config the model is built from: the workdir's config.json as trained (serve's serving config),
  or the defaults with model.checkpoint the Hugging Face folder (as the eval job's model.checkpoint)."""
  if backend == "workdir":
    saved = ml_collections.ConfigDict(rundir.load_saved_config(path))
    return serving_config(saved, path, given_keys=())
  config = base_config()
  config.model.checkpoint = str(path)
  config.train.seq_len = _hf_context(path, context)
  return config


@dataclasses.dataclass
class LoadedModel:
  """A model loaded for inference: its run setup (mesh, shardings), parameters, tokenizer and context."""

  run: setup.RunSetup
  params: Any
  tokenizer: Any
  context: int
  score: Any  # (params, placed batch) -> {"loglik_b", "tokens_b"}: the evaluator's score step
  generators: dict = dataclasses.field(default_factory=dict)  # (max_new_tokens, Sampler) -> jitted generate
  copies: dict = dataclasses.field(default_factory=dict)  # use_cpu_kernels() -> generate.decode_copies(params)


def load_model(
    path: pathlib.Path, backend: str, batch_size: int, context: int, batch_key: str = "the annotator's batch_size"
) -> LoadedModel:
  """The model, its tokenizer and its context, placed on the mesh of the config it is built from, as
  serving (a workdir) and the eval job (a Hugging Face folder) place it."""
  config = _run_config(path, backend, context)
  run = setup.setup_run(config)
  run.check_batch(batch_key, batch_size)  # `batch_key` names the setting in the error
  tokenizer = setup.open_tokenizer(config, path)
  if backend == "workdir":
    params, origin = setup.serving_params(config, path, run)
    size = min(config.train.seq_len, context) if context else config.train.seq_len
  else:
    params, origin = hf.load_params(path, run.model_cfg, run.param_shardings), str(path)
    size = config.train.seq_len
  log.info("annotator: %s (context %d tokens)", origin, size)
  score = step_lib.jit_score_step(run.model.apply, run.param_shardings, run.batch_sharding, run.replicated)
  return LoadedModel(run, params, tokenizer, size, score)
