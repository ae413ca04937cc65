"""Every key a run reads, with its default. Experiment files under `configs/` start from here.

Configs are locked by the launcher, so a mistyped `--config.train.stpes=5` fails instead of being
ignored, and ConfigDict refuses values of the wrong type. What a config file does to its unlocked dict
(`c.train.sft_stpes = 5`), and values that cannot work (`train.log_every = 0`),
`sft.config_check.check_config` finds: the launcher and the jobs call it before any work.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from sft.databuilder.config import build_config
from sft.errors import ConfigError
from sft.model.config import ModelConfig


def model_section() -> ml_collections.ConfigDict:
  """The `model` section: `checkpoint`, then every ModelConfig field but vocab_size, at its default."""
  section = ml_collections.ConfigDict()
  section.checkpoint = ""
  for field in dataclasses.fields(ModelConfig):
    if field.name != "vocab_size":
      section[field.name] = field.default
  return section


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"  # launch.py trains with this config ("eval": evaluates a model; "build" configs run the data builder)
  c.seed = 0  # parameter init and data order

  c.data = ml_collections.ConfigDict()
  # "build": the data builder runs with data.build into <workdir>/data (reused when it was built with
  # the same config); "dir": a folder the data builder wrote (data.dir).
  c.data.source = "build"
  c.data.build = build_config()  # by default the embedded stdlib API questions; see sft/databuilder/config.py
  c.data.build.stdlib = True
  c.data.dir = ""  # with source "dir": train-*, validation-* (and pretrain-*) ArrayRecord shards

  c.tokenizer = ml_collections.ConfigDict()
  # SentencePiece vocabulary trained on the raw text, saved in the workdir; the model's vocab_size.
  c.tokenizer.vocab_size = ModelConfig.vocab_size

  # A Hugging Face model folder to fine-tune: its config.json replaces the shape keys of the model
  # section, its tokenizer and chat template replace the trained tokenizer; the result is exported to
  # <workdir>/hf_export. The other keys, with their defaults and meaning, are ModelConfig's
  # (sft/model/config.py); vocab_size is tokenizer.vocab_size.
  c.model = model_section()

  c.train = ml_collections.ConfigDict()
  c.train.seq_len = 256  # tokens per packed row
  c.train.batch_size = 16  # rows per step, over all processes
  c.train.grad_accum_steps = 1  # micro-batches of batch_size / this many rows per step, gradients summed in one jitted step
  # "jit": one program over the mesh (data, fsdp and tensor parallel, as the mesh says); "pmap": data
  # parallel under jax.pmap, the state replicated on every device, sums and gradients added with psum
  # (needs mesh.fsdp = mesh.tensor = 1). The same update either way; a run may switch at resume.
  c.train.parallelism = "jit"
  c.train.loss_chunk_size = 0  # tokens per chunk of the logits + cross-entropy (0: whole sequence; N: no (B, T, V) logits)
  c.train.pretrain_steps = 0  # next-token steps on the raw text before SFT (0: SFT alone)
  c.train.sft_steps = 200  # steps on chat records, loss on assistant tokens only
  c.train.lr = 1e-3  # peak learning rate of each phase
  c.train.warmup_steps = 20  # linear warmup at the start of each phase
  c.train.final_lr_fraction = 0.1  # cosine decay ends at lr * this
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.1  # AdamW, not applied to norm scales
  c.train.grad_clip_norm = 1.0  # global-norm clipping
  c.train.log_every = 10  # steps between metric lines (each one waits for the device)
  # A step whose loss or gradient norm is not finite: "stop" ends the run with an error naming the step
  # (no checkpoint of a non-finite state is ever saved); "skip" leaves the state as it was (the update
  # is dropped, counted in the metrics), and stops once max_consecutive_skips steps in a row were skipped.
  c.train.on_nonfinite = "stop"
  c.train.max_consecutive_skips = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100  # also at the start and at the end
  c.eval.batch_size = 16  # rows per eval step, over all processes
  c.eval.num_generations = 64  # held-out prompts answered greedily, shared between the tasks; -1: all
  c.eval.max_new_tokens = 48
  c.eval.num_samples_to_print = 5
  # How answers are compared for exact match and token F1: "squad" (lowercase, no punctuation, no
  # articles, single spaces: SQuAD's evaluation script) or "whitespace" (single spaces only).
  c.eval.answer_normalization = "squad"
  # A generation prompt longer than the context (train.seq_len less max_new_tokens): "truncate" keeps its
  # last tokens (counted and reported); "refuse" stops with an error naming the record.
  c.eval.prompt_overflow = "truncate"
  # The eval job (job="eval", configs/eval.py): the model is the latest checkpoint of a training workdir
  # (model_workdir), or else the Hugging Face folder model.checkpoint; the records are those of eval
  # files (any format the data builder reads), or else the validation split of data.dir / data.build.
  c.eval.model_workdir = ""
  c.eval.files = ()
  # A second model for the eval job to compare with on the same items and decoding (a training workdir or a
  # Hugging Face folder): per task, the difference with its paired-bootstrap interval and a test of it.
  c.eval.compare_to = ""
  # Every figure of the report carries a 95% interval: a seeded bootstrap over items, this many resamples.
  c.eval.bootstrap_samples = 1000
  # A training run with both phases also evaluates the model at the end of pretraining, and its report
  # compares the final model with it (eval/compare.md, as the eval job's eval.compare_to): did SFT help?
  c.eval.compare_pretrained = False

  # Answering prompts with `launch.py --generate=...` from the latest checkpoint of the workdir.
  c.sample = ml_collections.ConfigDict()
  c.sample.temperature = 0.0  # 0: greedy
  c.sample.top_k = 0  # 0: no limit
  c.sample.top_p = 1.0
  c.sample.max_new_tokens = 128
  c.sample.seed = 0
  c.sample.prompt_overflow = "truncate"  # as eval.prompt_overflow, for --generate prompts

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100  # and always at the end
  c.checkpoint.max_to_keep = 2

  # Devices are arranged as (data, fsdp, tensor); -1 takes all devices left over.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # Logical axis name -> mesh axes. Changing the parallelism is an edit here, never in the model.
  c.sharding_rules = [
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("length", None),
      ("head_dim", None),
      ("layers", None),
  ]
  return c


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
