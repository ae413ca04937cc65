"""Run setup shared by training, serving and evaluation: the model a run config describes, the mesh
and its sharding rules, the parameters' shapes and shardings (no memory used), the tokenizer, and the
parameters to answer with."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Collection, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft import hf
from sft.errors import ConfigError
from sft.model import ModelConfig, Transformer, lora
from sft.model.config import runtime_fields, served_as_given
from sft.tokenizer import ChatTokenizer, load_tokenizer
from sft.trainer import rundir, sharding
from sft.trainer import state as state_lib
from sft.trainer.checkpoint import Checkpointer
from sft.trainer.workdir import Workdir

log = logging.getLogger("sft")
TOKENIZER_FILE = Workdir(".").tokenizer.name  # the SentencePiece model a run from scratch trains in its workdir
CHECKPOINTS = Workdir(".").checkpoints.name
# Model keys a served model takes from the config it is served with (declared with ModelConfig's fields).
RUNTIME_MODEL_KEYS = served_as_given()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """From the checkpoint's config.json when there is one (dtypes, remat, attention and LoRA still from the run config);
  a malformed config.json is a ConfigError naming the file and key."""
  model = config.model.to_dict()
  checkpoint = model.pop("checkpoint")
  if not checkpoint:
    return ModelConfig(vocab_size=config.tokenizer.vocab_size, **model)
  config_path = pathlib.Path(checkpoint) / "config.json"
  if not config_path.exists():
    raise ConfigError(f"model.checkpoint={checkpoint!r} has no config.json")
  cfg = hf.from_hf_config(hf.read_hf_config(config_path), dtype=model["dtype"], param_dtype=model["param_dtype"], source=str(config_path))
  log.info("model: shape and numerics from %s (the model.* shape keys of the config are not used)", config_path)
  runtime = {k: model[k] for k in runtime_fields()}  # dtypes, remat, attention kernel, LoRA: the run config's
  if not cfg.mlp_gated and "gate" in runtime["lora_targets"]:  # the presets name every projection; GPT-2 has no gate
    runtime["lora_targets"] = tuple(t for t in runtime["lora_targets"] if t != "gate")
    log.info("LoRA: %s has no gate projection; adapters on %s", config_path, runtime["lora_targets"])
  return dataclasses.replace(cfg, **runtime)


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What every job builds from a run config before touching data or weights."""

  model_cfg: ModelConfig
  model: Transformer
  mesh: Mesh
  rules: tuple
  dummy_inputs: tuple  # (tokens, positions, segment ids) of one row: shapes for eval_shape and init
  abstract_params: Any  # ShapeDtypeStructs
  param_shardings: Any  # NamedShardings, same tree

  def on_mesh(self):
    """The context every jitted step of the run traces and runs in: the mesh, and the logical axis rules."""
    return sharding.mesh_context(self.mesh, self.rules)

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, self.rules)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def check_batch(self, name: str, batch_size: int, micro_batches: int = 1) -> None:
    """Every process and batch shard gets whole rows; with `micro_batches` (gradient accumulation),
    every micro-batch too, so that splitting the batch moves no row between devices."""
    shards = sharding.batch_shards(self.mesh, self.rules)
    if batch_size % shards or batch_size % jax.process_count():
      raise ConfigError(
          f"{name} ({batch_size}) must divide by the batch shards of the mesh ({shards}) "
          f"and by the number of processes ({jax.process_count()})"
      )
    if (batch_size // micro_batches) % shards:  # micro_batches divides batch_size: a rule of the config
      raise ConfigError(
          f"{name} ({batch_size}) split into {micro_batches} micro-batches must leave a whole number of rows "
          f"per micro-batch and batch shard of the mesh ({shards})"
      )

  def check_pmap_batch(self, name: str, batch_size: int, micro_batches: int = 1) -> None:
    """train.parallelism="pmap": every process gets an equal block of rows, every one of its devices an
    equal part of that, and every device whole micro-batches (`micro_batches`: gradient accumulation)."""
    devices, processes = jax.local_device_count(), jax.process_count()
    if batch_size % (devices * processes):
      raise ConfigError(
          f"{name} ({batch_size}) must divide by the number of devices with train.parallelism='pmap' "
          f"({devices} local device(s) x {processes} process(es))"
      )
    per_device = batch_size // (devices * processes)
    if per_device % micro_batches:
      raise ConfigError(
          f"{name} ({batch_size}) leaves {per_device} row(s) per device with train.parallelism='pmap', "
          f"which do not split into {micro_batches} micro-batches (gradient accumulation)"
      )


def setup_run(config: ml_collections.ConfigDict) -> RunSetup:
  """Model config, mesh, rules and parameter shardings; raises ConfigError before any work is done."""
  model_cfg = model_config(config)
  if model_cfg.position_embedding == "learned" and config.train.seq_len > model_cfg.max_positions:
    raise ConfigError(f"train.seq_len={config.train.seq_len} is more than the model's {model_cfg.max_positions} learned positions")
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = sharding.logical_rules(config.sharding_rules, mesh)
  model = Transformer(model_cfg)
  dummy = (jnp.zeros((1, config.train.seq_len), jnp.int32),) * 3
  abstract, shardings = state_lib.params_shardings(model, dummy, mesh, rules)
  return RunSetup(model_cfg, model, mesh, rules, dummy, abstract, shardings)


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """The Hugging Face checkpoint folder, or the tokenizer a run from scratch trained in `workdir`."""
  return pathlib.Path(config.model.checkpoint) if config.model.checkpoint else Workdir(workdir).tokenizer


def open_tokenizer(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> ChatTokenizer:
  """The tokenizer of a trained workdir (or of the configured checkpoint), for serving and evaluation."""
  path = tokenizer_path(config, workdir)
  if not path.exists():
    raise ConfigError(f"{workdir} has no {TOKENIZER_FILE}: train there first (or set model.checkpoint)")
  return load_tokenizer(path)


def latest_step(workdir: str | pathlib.Path) -> int | None:
  directory = Workdir(workdir).checkpoints
  if not directory.exists():
    return None
  return Checkpointer(directory, max_to_keep=1, save_interval_steps=1).latest_step()


def serving_params(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, run: RunSetup) -> tuple[Any, str]:
  """(parameters, where they came from): the workdir's latest checkpoint (parameters only, no
  optimizer state), else the configured Hugging Face checkpoint."""
  step = latest_step(workdir)
  if step is not None:
    checkpointer = Checkpointer(Workdir(workdir).checkpoints, max_to_keep=1, save_interval_steps=1)
    abstract = state_lib.abstract_with_shardings(run.abstract_params, run.param_shardings)
    return checkpointer.restore_params(step, abstract), f"{Workdir(workdir).checkpoints / str(step)}"
  if config.model.checkpoint:
    return checkpoint_params(config, run, run.param_shardings, jax.random.key(config.get("seed", 0))), config.model.checkpoint
  raise ConfigError(f"{workdir} has no checkpoint to answer with: train there first (or set model.checkpoint)")


def checkpoint_params(config: ml_collections.ConfigDict, run: RunSetup, param_shardings: Any, rng: jax.Array) -> Any:
  """The configured Hugging Face checkpoint's weights placed per `param_shardings` (each device reads
  its own shard), with fresh LoRA adapters beside them when LoRA is on: only the adapters are
  initialised (A random, B zero, so the model is the checkpoint's), never a second copy of the base."""
  base_cfg = dataclasses.replace(run.model_cfg, lora_rank=0)
  params = hf.load_params(config.model.checkpoint, base_cfg, lora.base_params(param_shardings))
  if run.model_cfg.lora_rank:
    params = lora.with_adapters(params, lora.init_adapters(run.model, run.dummy_inputs, param_shardings, rng))
  return params


# --- the config a trained model is served with -----------------------------------------------------


def _builds_the_model(key: str) -> bool:
  """Keys whose value the served model is built from: the model's (but the runtime keys), its tokenizer's,
  and its context."""
  section, _, name = key.partition(".")
  if section == "model":
    return name.split(".")[0] not in RUNTIME_MODEL_KEYS
  return section == "tokenizer" or key == "train.seq_len"


def _is_given(key: str, given_keys: Collection[str] | None) -> bool:
  return given_keys is None or any(key == g or key.startswith(g + ".") for g in given_keys)


def model_differences(
    saved: dict[str, Any], config: ml_collections.ConfigDict, given_keys: Collection[str] | None
) -> list[str]:
  """Lines "key: trained with A, given B" for each model-building key of `config` (those of `given_keys`
  only, when given) whose value differs from the trained one. A key the saved config lacks (saved before
  the key existed) was trained at its default."""
  return [
      f"{key}: trained with {json.dumps(old)}, given {json.dumps(value)}"
      for key, old, value in rundir.changed_keys(saved, config)
      if _builds_the_model(key) and _is_given(key, given_keys)
  ]


def trained_config(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, sections: Sequence[str],
    given_keys: Collection[str] | None = None,
) -> ml_collections.ConfigDict | None:
  """The config that rebuilds the model trained in `workdir`: its config.json (model, tokenizer,
  train.seq_len, model.checkpoint), with `config`'s `sections` (what steers answering or evaluating) and
  runtime model keys (RUNTIME_MODEL_KEYS: those of `given_keys` only, when given). None when the workdir
  has no config.json.

  `given_keys`: the dotted keys the user set (on the command line); None: every key of `config`. A
  given model-building key whose value differs from the trained one is a ConfigError showing each
  difference: the model is served as trained, never as a config describes it."""
  saved = rundir.load_saved_config(workdir)
  if saved is None:
    return None
  changed = model_differences(saved, config, given_keys)
  if changed:
    raise ConfigError(
        f"{pathlib.Path(workdir) / rundir.CONFIG_FILE} says how its model was trained, and the given config differs "
        f"({'; '.join(changed)}): leave these keys out to serve the model as trained, or train a model with them in a "
        "new workdir"
    )
  run_config = ml_collections.ConfigDict(saved)
  for section in sections:
    run_config[section] = config[section]
  for key in RUNTIME_MODEL_KEYS:
    if key in config.model and _is_given(f"model.{key}", given_keys):
      run_config.model[key] = config.model[key]
  return run_config

