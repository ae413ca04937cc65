"""Answering prompts with a trained model: the latest checkpoint of a workdir (or, before any
training, the Hugging Face checkpoint the config names).

    import sft
    sft.respond(config, "/tmp/sft-quickstart", ["What does `json.dumps` do?"])
"""

from __future__ import annotations

import pathlib
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sft import hf, pipeline
from sft.config import ConfigError
from sft.evaluator.generate import make_generate, pad_prompts, strip_generation
from sft.evaluator.sampling import Sampler
from sft.model import Transformer
from sft.trainer import sharding, sources
from sft.trainer import state as state_lib
from sft.trainer.checkpoint import Checkpointer
from sft.trainer.loop import build_optimizer


def _tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  if config.model.checkpoint:
    return pipeline.HFTokenizer(config.model.checkpoint)
  path = workdir / "tokenizer.model"
  if not path.exists():
    raise ConfigError(f"{workdir} has no tokenizer.model: train there first (or set model.checkpoint)")
  return pipeline.Tokenizer.load(path)


def respond(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, prompts: Sequence[str]) -> list[str]:
  """One answer per prompt, each prompt sent as a single user turn in the model's chat format."""
  return load_responder(config, workdir)(prompts) if prompts else []


def load_responder(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Callable[[Sequence[str]], list[str]]:
  """Loads the model once; the function it returns answers a batch of prompts per call."""
  workdir = pathlib.Path(workdir)
  model_cfg = sources.model_config(config)
  model = Transformer(model_cfg)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = sharding.logical_rules(config.sharding_rules, mesh)
  tokenizer = _tokenizer(config, workdir)
  _, optimizer, _ = build_optimizer(config, model_cfg)
  dummy = (jnp.zeros((1, config.train.seq_len), jnp.int32),) * 3
  abstract, shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)

  checkpoints = workdir / "checkpoints"
  step = Checkpointer(checkpoints, max_to_keep=1, save_interval_steps=1).latest_step() if checkpoints.exists() else None
  if step is not None:
    params = Checkpointer(checkpoints, max_to_keep=1, save_interval_steps=1).restore(
        step, state_lib.abstract_with_shardings(abstract, shardings), {}
    ).params
  elif config.model.checkpoint:
    params = hf.load_params(config.model.checkpoint, model_cfg, shardings.params)
  else:
    raise ConfigError(f"{workdir} has no checkpoint to answer with: train there first (or set model.checkpoint)")

  sc = config.sample
  generate = make_generate(
      model, max_new_tokens=sc.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
      sampler=Sampler(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p),
  )

  def answer(prompts: Sequence[str]) -> list[str]:
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "-"}] for p in prompts]
    tokens_bp, lengths_b = pad_prompts([tokenizer.render_prompt(c)[0] for c in chats], tokenizer.pad_id)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      out_bn = np.asarray(jax.device_get(generate(params, tokens_bp, lengths_b, jax.random.key(sc.seed))))
    return [tokenizer.decode(strip_generation(row, tokenizer.stop_ids, tokenizer.pad_id)) for row in out_bn]

  return answer
