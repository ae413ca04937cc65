"""Every key a run reads: its default, its check and its meaning, declared once as a field of a section.
Experiment files under `configs/` start from `base_config()`.

The config is a locked ConfigDict made from the sections, so a mistyped `c.train.stpes = 5` in a config
file or `--config.train.stpes=5` on the command line fails where it is written, and ConfigDict refuses values
of the wrong type. `sft.config_check.check_config` checks every value against its field's check and the RULES
below (keys that only work together), and reports every problem at once: the jobs call it before any work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sft.config_keys import (
  AT_LEAST_0,
  AT_LEAST_1,
  BELOW_1,
  FRACTION,
  MESH_SIZE,
  POSITIVE,
  SEED,
  OneOf,
  Range,
  constraints,
  key,
  locked,
  section,
  strings,
  to_config_dict,
)
from sft.config_keys import at_resume as at_resume_keys
from sft.databuilder.config import Build
from sft.errors import ConfigError
from sft.model import attention
from sft.model.config import ModelConfig, model_at_resume

MESH_AXES = ("data", "fsdp", "tensor")
ANSWER_NORMALIZATIONS = ("squad", "whitespace")  # sft.evaluator.metrics implements each
OVERFLOW = OneOf(("truncate", "refuse"))


@dataclasses.dataclass(frozen=True)
class StdlibBuild(Build):
  stdlib: bool = key(True)  # a run builds the embedded stdlib API questions unless told otherwise


@dataclasses.dataclass(frozen=True)
class Data:
  # "build": the data builder runs with data.build into <workdir>/data (reused when it was built with
  # the same config); "dir": a folder the data builder wrote (data.dir).
  source: str = key("build", OneOf(("build", "dir")))
  build: Build = section(StdlibBuild)  # see sft/databuilder/config.py
  dir: str = key("")  # with source "dir": train-*, validation-* (and pretrain-*) ArrayRecord shards


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  # SentencePiece vocabulary trained on the raw text, saved in the workdir; the model's vocab_size.
  vocab_size: int = key(ModelConfig.vocab_size, AT_LEAST_1)


@dataclasses.dataclass(frozen=True)
class Train:
  seq_len: int = key(256, AT_LEAST_1)  # tokens per packed row
  batch_size: int = key(16, AT_LEAST_1)  # rows per step, over all processes
  # Micro-batches of batch_size / this many rows per step, gradients summed in one jitted step. How the same
  # global batch is cut for memory: only float rounding of the same sums changes, so a resumed run may change it.
  grad_accum_steps: int = key(1, AT_LEAST_1, at_resume=True)
  # "jit": one program over the mesh (data, fsdp and tensor parallel, as the mesh says); "pmap": data
  # parallel under jax.pmap, the state replicated on every device, sums and gradients added with psum
  # (needs mesh.fsdp = mesh.tensor = 1). The same update either way; a run may switch at resume.
  parallelism: str = key("jit", OneOf(("jit", "pmap")), at_resume=True)
  # Tokens per chunk of the logits + cross-entropy (0: whole sequence; N: no (B, T, V) logits).
  loss_chunk_size: int = key(0, AT_LEAST_0, at_resume=True)
  # Steps of each phase. A resumed run may change them: the learning-rate schedule is recomputed from the
  # new counts, and the restored optimizer goes on from its step in that schedule.
  pretrain_steps: int = key(0, AT_LEAST_0, at_resume=True)  # next-token steps on the raw text before SFT (0: SFT alone)
  sft_steps: int = key(200, AT_LEAST_0, at_resume=True)  # steps on chat records, loss on assistant tokens only
  lr: float = key(1e-3, POSITIVE)  # peak learning rate of each phase
  warmup_steps: int = key(20, AT_LEAST_0)  # linear warmup at the start of each phase
  final_lr_fraction: float = key(0.1, FRACTION)  # cosine decay ends at lr * this
  b1: float = key(0.9, BELOW_1)
  b2: float = key(0.95, BELOW_1)
  eps: float = key(1e-8, POSITIVE)
  weight_decay: float = key(0.1, AT_LEAST_0)  # AdamW, not applied to norm scales
  grad_clip_norm: float = key(1.0, POSITIVE)  # global-norm clipping
  log_every: int = key(10, AT_LEAST_1, at_resume=True)  # steps between metric lines (each one waits for the device)
  # A step whose loss or gradient norm is not finite: "stop" ends the run with an error naming the step
  # (no checkpoint of a non-finite state is ever saved); "skip" leaves the state as it was (the update
  # is dropped, counted in the metrics), and stops once max_consecutive_skips steps in a row were skipped.
  on_nonfinite: str = key("stop", OneOf(("stop", "skip")))
  max_consecutive_skips: int = key(10, AT_LEAST_1)


@dataclasses.dataclass(frozen=True)
class Eval:
  every_steps: int = key(100, AT_LEAST_1)  # also at the start and at the end
  batch_size: int = key(16, AT_LEAST_1)  # rows per eval step, over all processes
  num_generations: int = key(64, Range(0, also=(-1,)))  # held-out prompts answered greedily, shared between the tasks; -1: all
  max_new_tokens: int = key(48, AT_LEAST_1)
  num_samples_to_print: int = key(5, AT_LEAST_0)
  # How answers are compared for exact match and token F1: "squad" (lowercase, no punctuation, no
  # articles, single spaces: SQuAD's evaluation script) or "whitespace" (single spaces only).
  answer_normalization: str = key("squad", OneOf(ANSWER_NORMALIZATIONS))
  # A generation prompt longer than the context (train.seq_len less max_new_tokens): "truncate" keeps its
  # last tokens (counted and reported); "refuse" stops with an error naming the record.
  prompt_overflow: str = key("truncate", OVERFLOW)
  # The eval job (job="eval", configs/eval.py): the model is the latest checkpoint of a training workdir
  # (model_workdir), or else the Hugging Face folder model.checkpoint; the records are those of eval
  # files (any format the data builder reads), or else the validation split of data.dir / data.build.
  model_workdir: str = key("")
  files: tuple = key((), strings)
  # A second model for the eval job to compare with on the same items and decoding (a training workdir or a
  # Hugging Face folder): per task, the difference with its paired-bootstrap interval and a test of it.
  compare_to: str = key("")
  # Every figure of the report carries a 95% interval: a seeded bootstrap over items, this many resamples.
  bootstrap_samples: int = key(1000, Range(100))
  # A training run with both phases also evaluates the model at the end of pretraining, and its report
  # compares the final model with it (eval/compare.md, as the eval job's eval.compare_to): did SFT help?
  compare_pretrained: bool = key(False)


@dataclasses.dataclass(frozen=True)
class Sample:
  """Answering prompts with `launch.py --generate=...` from the latest checkpoint of the workdir."""

  temperature: float = key(0.0, AT_LEAST_0)  # 0: greedy
  top_k: int = key(0, AT_LEAST_0)  # 0: no limit
  top_p: float = key(1.0, Range(0, 1, low_open=True))
  max_new_tokens: int = key(128, AT_LEAST_1)
  seed: int = key(0, SEED)
  prompt_overflow: str = key("truncate", OVERFLOW)  # as eval.prompt_overflow, for --generate prompts


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  every_steps: int = key(100, AT_LEAST_1)  # and always at the end
  max_to_keep: int = key(2, AT_LEAST_1)


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Devices are arranged as (data, fsdp, tensor); -1 takes all devices left over (one axis at most)."""

  data: int = key(-1, MESH_SIZE)
  fsdp: int = key(1, MESH_SIZE)
  tensor: int = key(1, MESH_SIZE)


def _sharding_rules(value) -> str | None:
  for rule in value:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      return f"each rule is (logical axis name, mesh axes), got {rule!r}"
    axes = rule[1]
    if not (axes is None or isinstance(axes, str) or (isinstance(axes, (list, tuple)) and not strings(axes))):
      return f"the mesh axes of {rule[0]!r} are None, a name or names, got {axes!r}"
  return None


@dataclasses.dataclass(frozen=True)
class Run:
  """A run config (the `model` section, ModelConfig's fields, is added by `base_config`). Evaluation,
  sampling, checkpointing, the device layout and the sharding steer how a run goes, not the weights it
  trains: a resumed run may change them."""

  job: str = key("train", OneOf(("train", "eval", "build")))  # "eval": evaluates a model; "build": the data builder
  seed: int = key(0, SEED)  # parameter init and data order
  data: Data = section(Data)
  tokenizer: Tokenizer = section(Tokenizer)
  train: Train = section(Train)
  eval: Eval = section(Eval, at_resume=True)
  sample: Sample = section(Sample, at_resume=True)
  checkpoint: Checkpoint = section(Checkpoint, at_resume=True)
  mesh: MeshShape = section(MeshShape, at_resume=True)
  # Logical axis name -> mesh axes. Changing the parallelism is an edit here, never in the model.
  sharding_rules: list = key(
      [
          ("batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("heads", "tensor"),
          ("kv_heads", "tensor"),
          ("mlp", "tensor"),
          ("vocab", "tensor"),
          ("length", None),
          ("head_dim", None),
          ("layers", None),
      ],
      _sharding_rules,
      at_resume=True,
  )


def model_section() -> ml_collections.ConfigDict:
  """The `model` section: `checkpoint`, then every ModelConfig field but vocab_size, at its default.
  ModelConfig checks these keys itself; vocab_size is tokenizer.vocab_size."""
  section = ml_collections.ConfigDict()
  # A Hugging Face model folder to fine-tune: its config.json replaces the shape keys of the model
  # section, its tokenizer and chat template replace the trained tokenizer; the result is exported to
  # <workdir>/hf_export.
  section.checkpoint = ""
  for field in dataclasses.fields(ModelConfig):
    if field.name != "vocab_size":
      section[field.name] = field.default
  return section


def base_config() -> ml_collections.ConfigDict:
  """Every run key at its default, locked (the model section after the tokenizer, as a reader expects)."""
  sections = to_config_dict(Run)
  ordered = ml_collections.ConfigDict()
  for field in dataclasses.fields(Run):
    ordered[field.name] = sections[field.name]
    if field.name == "tokenizer":
      ordered.model = model_section()
  return locked(ordered, Run)


# Dotted key -> its check, as its field declares it (the model section is ModelConfig's to check).
CHECKS = constraints(Run)


def check_value(key: str, value: Any) -> None:
  """`value` against the check `key` declares: for a library function handed a value directly (a
  notebook), with the config's own rule and message."""
  problem = CHECKS[key](value)
  if problem:
    raise ConfigError(f"{key}: {problem}")


# Keys a resumed run may change: they steer evaluation, sampling, checkpointing, logging, the device
# layout (a checkpoint restores onto any mesh) and how the same maths is computed, not the weights.
AT_RESUME = (*at_resume_keys(Run), *(f"model.{name}" for name in model_at_resume()))


# --- keys that only work together: (the keys read, the check of their values), checked once they are each valid


def mesh_problem(sizes: dict[str, int]) -> str | None:
  """The mesh sizes' rule, for the config and for `sft.trainer.sharding.make_mesh`."""
  if list(sizes.values()).count(-1) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    return f"mesh: sizes are positive, with at most one -1 (the devices left over); got {sizes}"
  return None


def _some_steps(v: dict[str, Any]) -> str | None:
  if v["job"] == "eval" or v["train.pretrain_steps"] + v["train.sft_steps"] >= 1:
    return None
  return "train.pretrain_steps + train.sft_steps: at least one step to train, got 0"


def _one_mesh_remainder(v: dict[str, Any]) -> str | None:
  return mesh_problem({axis: v[f"mesh.{axis}"] for axis in MESH_AXES})


def _data_dir_named(v: dict[str, Any]) -> str | None:
  if v["job"] == "eval" and v["eval.files"]:  # the eval job reads its files instead
    return None
  return "data.dir: the folder of a data build, needed with data.source 'dir'" if v["data.source"] == "dir" and not v["data.dir"] else None


def _data_dir_used(v: dict[str, Any]) -> str | None:
  # A folder named but not read would train on the rebuilt default data without a word.
  if v["data.source"] == "dir" or not v["data.dir"] or (v["job"] == "eval" and v["eval.files"]):
    return None
  return (f"data.dir={v['data.dir']!r} is only read with data.source 'dir', and data.source is {v['data.source']!r} "
          "(the data would be built from data.build instead): set data.source='dir', or leave data.dir empty")


def _eval_model_named(v: dict[str, Any]) -> str | None:
  if v["job"] != "eval" or v["eval.model_workdir"] or v["model.checkpoint"]:
    return None
  return "the eval job needs a model: eval.model_workdir (a training workdir) or model.checkpoint (a Hugging Face folder)"


def _micro_batches_divide(v: dict[str, Any]) -> str | None:
  if v["train.batch_size"] % v["train.grad_accum_steps"]:
    return f"train.grad_accum_steps ({v['train.grad_accum_steps']}) must divide train.batch_size ({v['train.batch_size']})"
  return None


def _pmap_data_parallel(v: dict[str, Any]) -> str | None:
  if v["train.parallelism"] != "pmap" or (v["mesh.fsdp"], v["mesh.tensor"]) == (1, 1):
    return None
  return (f"train.parallelism 'pmap' is data parallel only (a whole copy of the state on every device): it needs "
          f"mesh.fsdp = mesh.tensor = 1, got fsdp={v['mesh.fsdp']}, tensor={v['mesh.tensor']} (use 'jit' to shard the model)")


def _splash_blocks(v: dict[str, Any]) -> str | None:
  return attention.splash_problem(v["train.seq_len"]) if v["model.attention"] == "splash" else None


RULES = (
    (("job", "train.pretrain_steps", "train.sft_steps"), _some_steps),
    (("mesh.data", "mesh.fsdp", "mesh.tensor"), _one_mesh_remainder),
    (("train.batch_size", "train.grad_accum_steps"), _micro_batches_divide),
    (("train.parallelism", "mesh.fsdp", "mesh.tensor"), _pmap_data_parallel),
    (("job", "eval.files", "data.source", "data.dir"), _data_dir_named),
    (("job", "eval.files", "data.source", "data.dir"), _data_dir_used),
    (("job", "eval.model_workdir", "model.checkpoint"), _eval_model_named),
    (("model.attention", "train.seq_len"), _splash_blocks),
)


def finetune_config(mode: str) -> ml_collections.ConfigDict:
  """Fine-tuning a local Hugging Face checkpoint on chat records from a folder.

  mode "full" trains every weight (float32 master weights, bfloat16 compute, rematerialised layers,
  FSDP over all devices); mode "lora" trains rank-16 adapters on every projection.
  """
  if mode not in ("full", "lora"):
    raise ConfigError(f"the config argument is 'full' or 'lora', got {mode!r}")
  c = base_config()
  c.model.checkpoint = "/path/to/hf_model"  # set with --config.model.checkpoint
  c.data.source = "dir"
  c.data.dir = "/path/to/data"  # the output folder of a data build, e.g. <workdir>/data of a quickstart run
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.mesh.data = 1
  c.mesh.fsdp = -1  # parameters, gradients and optimizer state split over every device
  c.train.seq_len = 2048
  c.train.batch_size = 32
  c.train.pretrain_steps = 0
  c.train.sft_steps = 1000
  c.train.lr = 2e-5
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.eval.every_steps = 200
  c.eval.batch_size = 32
  c.eval.num_generations = 64
  c.eval.max_new_tokens = 128
  c.checkpoint.every_steps = 200
  if mode == "lora":
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.model.lora_dropout = 0.05
    c.model.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.model.remat = False
    c.train.lr = 2e-4
  return c
