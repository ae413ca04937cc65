"""Answering prompts with a trained model: the latest checkpoint of a workdir, built as its config.json
says (or, before any training, the Hugging Face checkpoint the config names). The data builder's
annotators are `sft.annotator`'s.

    import sft
    sft.respond(config, "/tmp/sft-quickstart", ["What does `json.dumps` do?"])

The config given steers the answering (its sample, mesh and sharding_rules sections, and the runtime
model keys such as dtype); the model, its tokenizer and its context (train.seq_len) are the trained
ones. A prompt longer than the context less sample.max_new_tokens keeps its last tokens (counted in a
warning), or with sample.prompt_overflow="refuse" is an error.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Callable, Collection, Sequence

import jax
import ml_collections
import numpy as np

from sft.config import check_value
from sft.errors import ConfigError
from sft.evaluator.generate import (
    fit_prompts,
    make_generate,
    pad_prompts,
    prompt_room,
    strip_generation,
)
from sft.evaluator.sampling import Sampler
from sft.trainer import setup
from sft.trainer.workdir import Workdir

log = logging.getLogger("sft")
# What the given config decides when the model comes from a workdir's config.json.
SERVING_SECTIONS = ("sample", "mesh", "sharding_rules")


def respond(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, prompts: Sequence[str], *,
    given_keys: Collection[str] | None = None,
) -> list[str]:
  """One answer per prompt, each prompt sent as a single user turn in the model's chat format.
  `given_keys`: see `load_responder`."""
  return load_responder(config, workdir, given_keys=given_keys)(prompts) if prompts else []


def serving_config(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, given_keys: Collection[str] | None = None
) -> ml_collections.ConfigDict:
  """The config the workdir's model is served with: its config.json with `config`'s sections that steer
  answering (setup.trained_config); `config` itself for a workdir without config.json when it names a
  Hugging Face model.checkpoint."""
  run_config = setup.trained_config(config, workdir, sections=SERVING_SECTIONS, given_keys=given_keys)
  if run_config is not None:
    return run_config
  if config.model.checkpoint:
    return config
  workdir = pathlib.Path(workdir)
  paths = Workdir(workdir)
  missing = [p.name for p in (paths.config, paths.tokenizer, paths.checkpoints) if not p.exists()]
  raise ConfigError(
      f"{workdir} has no {' and no '.join(missing)}, so the model trained there cannot be rebuilt: train there "
      "first (or set model.checkpoint to serve a Hugging Face model)"
  )


def _render(tokenizer, chat, index: int) -> list[int]:
  try:
    return tokenizer.render_prompt(chat)[0]
  except ValueError as err:  # a template's refusal, TokenizerFailure: one line naming the prompt
    raise ConfigError(f"prompt {index + 1}: {err}") from None


def load_responder(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, given_keys: Collection[str] | None = None
) -> Callable[[Sequence[str]], list[str]]:
  """Loads the model once (parameters only); the function it returns answers a batch of prompts per call.

  The model is built as the workdir's config.json says. `given_keys` are the dotted keys the user set
  (the command line's overrides): a model-building key among them that differs from the trained value
  is refused, the other keys of `config` that build the model are not used. None: every key of `config`
  is compared."""
  config = serving_config(config, workdir, given_keys=given_keys)
  run = setup.setup_run(config)
  tokenizer = setup.open_tokenizer(config, workdir)
  sc = config.sample
  overflow = sc.get("prompt_overflow", "truncate")  # a config.json saved before the key existed
  check_value("sample.prompt_overflow", overflow)
  room = prompt_room(config.train.seq_len, sc.max_new_tokens, "sample.max_new_tokens")
  params, origin = setup.serving_params(config, workdir, run)
  log.info("serving %s", origin)
  generate = make_generate(
      run.model, max_new_tokens=sc.max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
      sampler=Sampler(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p),
  )

  def fit(prompts: Sequence[str]) -> list[list[int]]:
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "-"}] for p in prompts]
    tokens = [_render(tokenizer, c, i) for i, c in enumerate(chats)]
    fitted, cut = fit_prompts(tokens, room)
    if cut and overflow == "refuse":
      first = cut[0]
      raise ConfigError(
          f"prompt {first + 1} ({_quote(prompts[first])}) is {len(tokens[first])} tokens, more than the {room} that "
          f"fit train.seq_len={config.train.seq_len} with sample.max_new_tokens={sc.max_new_tokens} ({len(cut)} such "
          "prompt(s) in all): shorten it, or set sample.prompt_overflow='truncate' to keep its last tokens"
      )
    if cut:
      log.warning(
          "%d of %d prompts are longer than the %d tokens that fit train.seq_len=%d with sample.max_new_tokens=%d: "
          "their first tokens are cut", len(cut), len(prompts), room, config.train.seq_len, sc.max_new_tokens,
      )
    return fitted

  def answer(prompts: Sequence[str]) -> list[str]:
    tokens_bp, lengths_b = pad_prompts(fit(prompts), tokenizer.pad_id)
    with run.on_mesh():
      out_bn = np.asarray(jax.device_get(generate(params, tokens_bp, lengths_b, jax.random.key(sc.seed))))
    return [tokenizer.decode(strip_generation(row, tokenizer.stop_ids)) for row in out_bn]

  return answer


def _quote(prompt: str, limit: int = 40) -> str:
  return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")
