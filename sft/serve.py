"""Answering prompts with a trained model: the latest checkpoint of a workdir (or, before any
training, the Hugging Face checkpoint the config names); and `ModelGenerator`, the model-backed
generator that the data builder's annotation stages are given.

    import sft
    sft.respond(config, "/tmp/sft-quickstart", ["What does `json.dumps` do?"])
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sft.errors import ConfigError
from sft.evaluator.generate import make_generate, pad_prompts, strip_generation
from sft.evaluator.sampling import Sampler
from sft.trainer import setup

log = logging.getLogger("sft")


def respond(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, prompts: Sequence[str]) -> list[str]:
  """One answer per prompt, each prompt sent as a single user turn in the model's chat format."""
  return load_responder(config, workdir)(prompts) if prompts else []


def load_responder(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Callable[[Sequence[str]], list[str]]:
  """Loads the model once (parameters only); the function it returns answers a batch of prompts per call."""
  run = setup.setup_run(config)
  tokenizer = setup.open_tokenizer(config, workdir)
  params, origin = setup.serving_params(config, workdir, run)
  log.info("serving %s", origin)
  sc = config.sample
  generate = make_generate(
      run.model, max_new_tokens=sc.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
      sampler=Sampler(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p),
  )

  def answer(prompts: Sequence[str]) -> list[str]:
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "-"}] for p in prompts]
    tokens_bp, lengths_b = pad_prompts([tokenizer.render_prompt(c)[0] for c in chats], tokenizer.pad_id)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      out_bn = np.asarray(jax.device_get(generate(params, tokens_bp, lengths_b, jax.random.key(sc.seed))))
    return [tokenizer.decode(strip_generation(row, tokenizer.stop_ids, tokenizer.pad_id)) for row in out_bn]

  return answer


class ModelGenerator:
  """`generate(prompts) -> answers` with the latest checkpoint of a workdir trained by this project (its
  config.json says how the model is built): the data builder's annotation model. Loaded on first use,
  so the object pickles to Beam workers as a path."""

  def __init__(self, workdir: str, batch_size: int = 32, max_new_tokens: int = 128):
    if not (pathlib.Path(workdir) / "config.json").exists():
      raise ConfigError(f"annotate.model_workdir={workdir!r} has no config.json: train a model there first")
    self.workdir, self.batch_size, self.max_new_tokens = workdir, batch_size, max_new_tokens
    self._respond = None

  def __getstate__(self):
    return {**self.__dict__, "_respond": None}

  def generate(self, prompts: Sequence[str]) -> list[str]:
    if self._respond is None:
      config = ml_collections.ConfigDict(json.loads((pathlib.Path(self.workdir) / "config.json").read_text()))
      config.sample.max_new_tokens = self.max_new_tokens
      self._respond = load_responder(config, self.workdir)
    out = []
    for start in range(0, len(prompts), self.batch_size):
      out += self._respond(list(prompts[start:start + self.batch_size]))
    return out
