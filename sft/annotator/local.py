"""Annotating with a model on this machine's accelerators: a training workdir of this project (its
config.json, latest checkpoint and tokenizer, served as trained) or a local Hugging Face folder
(config.json, *.safetensors and the tokenizer files).

    annotator = open_annotator("/tmp/sft-quickstart")          # "auto": a workdir or a Hugging Face folder
    annotator.generate([[{"role": "user", "content": "Hi"}]], Decoding(max_new_tokens=64))
    annotator.log_likelihoods([[{"role": "user", "content": "2 + 2?"}]], ["4"])

Prompts are batched by length bucket and prefilled a few at a time at about their own length (see
`batches`: an answer never depends on the prompts batched with it); a run compiles a decoding program
per bucket and a prefill program per bucket and width it uses. The object pickles as its path and
settings (Beam workers) and loads the model on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from sft.annotator.base import Chat, Decoding, Generation
from sft.annotator.batches import (
    CPU_LANES,
    PREFILL_ROWS,
    Programs,
    by_bucket,
    dedup,
    fill_rows,
    in_lanes,
    make_programs,
    prefill_groups,
    row_keys,
    score_rows,
)
from sft.console import bar
from sft.errors import ConfigError
from sft.evaluator.generate import check_positions, decode_copies, fit_prompts, prompt_room, strip_generation
from sft.evaluator.sampling import Sampler
from sft.model.backend import cpu_kernels, use_cpu_kernels
from sft.serve import loading
from sft.trainer import sharding

log = logging.getLogger("sft")
BACKENDS = loading.BACKENDS
KEY = "annotate.model"  # the build config's key that names the model, in every error about it
# A chat ends with the user's turn; the renderer wants the assistant turn its prompt leads into.
_PLACEHOLDER = {"role": "assistant", "content": "-"}
def open_annotator(
    path: str, backend: str = "auto", *, batch_size: int = 32, context: int = 0, progress: bool = True,
    key: str = KEY,
) -> LocalAnnotator:
  """The annotator of a training workdir ("workdir") or a Hugging Face folder ("hf"); "auto" tells them
  apart from the folder's files. Checks the folder (a one-line ConfigError naming annotate.model) and
  loads nothing: the model loads on first use.

  `batch_size`: rows per compiled call. `context`: prompt + answer tokens; 0 is the workdir's
  train.seq_len, or for a Hugging Face model 2048 capped by its positions (a given context is capped
  by them too). `progress`: a progress bar over the prompts of each call. `key`: the config key every
  error names (the audit's machine reviewer is judge.model)."""
  if backend not in BACKENDS:
    raise ConfigError(f"the annotator backend must be one of {BACKENDS}, got {backend!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f"the annotator's batch_size must be at least 1, got {batch_size!r}")
  if not isinstance(context, int) or context < 0:
    raise ConfigError(f"the annotator's context must be >= 0 (0: the model's own), got {context!r}")
  _, kind = loading.resolve_backend(path, backend, key)
  return LocalAnnotator(str(path), kind, batch_size=batch_size, context=context, progress=progress)


class LocalAnnotator:
  """An Annotator (sft.annotator.base) backed by a model loaded here; see the module docstring.

  `prompts_cut` counts the prompts (and scored chats) longer than the context that lost their first
  tokens, over every call."""

  def __init__(self, path: str, backend: str, *, batch_size: int = 32, context: int = 0, progress: bool = True):
    if backend not in ("workdir", "hf"):
      raise ConfigError(f"a LocalAnnotator's backend is 'workdir' or 'hf', got {backend!r}: see open_annotator")
    self.path, self.backend = str(path), backend
    self.batch_size, self.context_setting, self.progress = batch_size, context, progress
    self.prompts_cut = 0
    self._fingerprint: str | None = None
    self._model: loading.LoadedModel | None = None

  def __getstate__(self):  # the path and settings: a worker process loads the model itself
    return {**self.__dict__, "_model": None}

  def __repr__(self) -> str:
    return f"LocalAnnotator({self.path!r}, {self.backend!r}, batch_size={self.batch_size})"

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      files = loading.fingerprint_of(pathlib.Path(self.path), self.backend)
      # A given context cuts long prompts elsewhere than the model's own: other answers, another key.
      self._fingerprint = f"{files}/context={self.context_setting}" if self.context_setting else files
    return self._fingerprint

  @property
  def model(self) -> loading.LoadedModel:
    if self._model is None:
      self._model = loading.load_model(pathlib.Path(self.path), self.backend, self.batch_size, self.context_setting)
    return self._model

  @property
  def context(self) -> int:
    """Prompt + answer tokens (loads the model)."""
    return self.model.context

  def _programs(self, decoding: Decoding) -> Programs:
    model = self.model
    sampler = Sampler(temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
    key = (decoding.max_new_tokens, sampler)
    if key not in model.generators:
      tok = model.tokenizer
      model.generators[key] = make_programs(
          model.run.model, max_new_tokens=decoding.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
          sampler=sampler,
      )
    return model.generators[key]

  def _prefill_rows(self) -> int:
    """PREFILL_ROWS, rounded up to a multiple of the mesh's batch shards (each prefill call's batch divides)."""
    shards = sharding.batch_shards(self.model.run.mesh, self.model.run.rules)
    return -(-PREFILL_ROWS // shards) * shards

  def _count_cut(self, cut: int, total: int, what: str, room: int) -> None:
    if cut:
      self.prompts_cut += cut
      log.warning(
          "annotator: %d of %d %s are longer than the %d tokens that fit the context of %d: their first tokens are cut",
          cut, total, what, room, self.context,
      )

  def _copies(self) -> dict:
    """decode_copies of the parameters for the code traced now, made once per model."""
    model, on_cpu = self.model, use_cpu_kernels()
    if on_cpu not in model.copies:
      with model.run.on_mesh():
        model.copies[on_cpu] = decode_copies(model.params)
    return model.copies[on_cpu]

  def _lanes(self) -> int:
    """Batches in flight: CPU_LANES on a one-device CPU mesh (at most its cores), else one."""
    mesh = self.model.run.mesh
    if mesh.devices.size != 1 or mesh.devices.flat[0].platform != "cpu":
      return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(CPU_LANES, cores))

  def _in_lanes(self, fn: Callable, batches: Iterable) -> Iterator:
    """batches.in_lanes over `_lanes()` lanes, each in this thread's mesh and CPU-kernel setting."""
    on_cpu, run = use_cpu_kernels(), self.model.run

    @contextlib.contextmanager
    def context():
      with run.on_mesh(), cpu_kernels(on_cpu):
        yield

    return in_lanes(fn, batches, self._lanes(), context)

  def _bar(self, total: int, desc: str):
    return bar(total, desc, " records", enabled=self.progress)

  def generate(self, chats: Sequence[Chat], decoding: Decoding) -> list[Generation]:
    """One Generation per chat, in order: each chat rendered with the model's chat template up to the
    assistant's turn, answered with a KV cache; greedy at temperature 0. A sampled answer depends on
    decoding.seed and its own prompt tokens only. Equal prompts are answered once."""
    if not chats:
      return []
    model = self.model
    tok = model.tokenizer
    programs = self._programs(decoding)  # checks the decoding before any rendering
    room = prompt_room(model.context, decoding.max_new_tokens, "max_new_tokens")
    prompts, cut = fit_prompts([_render(tok, chat, i) for i, chat in enumerate(chats)], room)
    self._count_cut(len(cut), len(chats), "prompts", room)
    distinct, index = dedup(prompts, tuple)
    out: list[Generation | None] = [None] * len(distinct)
    stops = set(tok.stop_ids)
    copies, group_rows = self._copies(), self._prefill_rows()

    def run_batch(batch: tuple[int, list[int]]) -> tuple[list[int], np.ndarray]:
      """A bucket's batch: its prompts prefilled a group at a time into the batch's cache, then decoded
      together; the rows it lacks are padding (zero cache, not live)."""
      bucket, rows = batch
      prompts = [distinct[r] for r in rows]
      cache, logits_bv = programs.empty(self.batch_size, bucket + decoding.max_new_tokens)
      for width, members in prefill_groups([len(p) for p in prompts], bucket, group_rows):
        tokens_rw, lengths_r = fill_rows([prompts[m] for m in members], width, group_rows, tok.pad_id)
        rows_r = np.asarray([*members, *[members[0]] * (group_rows - len(members))], np.int32)
        cache, logits_bv = programs.prefill(model.params, cache, logits_bv, tokens_rw, lengths_r, rows_r)
      lengths_b = np.ones(self.batch_size, np.int32)
      lengths_b[: len(prompts)] = [len(p) for p in prompts]
      keys_b = row_keys(decoding.seed, [*prompts, *[prompts[0]] * (self.batch_size - len(prompts))])
      live_b = np.arange(self.batch_size) < len(prompts)
      out_bn = programs.decode(model.params, logits_bv, cache, lengths_b, keys_b, copies, live_b)
      return rows, np.asarray(jax.device_get(out_bn))

    batches = list(by_bucket([len(p) for p in distinct], room, self.batch_size))
    check_positions(model.run.model.cfg, batches[-1][0] + decoding.max_new_tokens)  # the largest bucket, before any work
    with self._bar(len(distinct), "annotate: generating") as progress, model.run.on_mesh():
      for rows, out_bn in self._in_lanes(run_batch, batches):
        for r, ids in zip(rows, out_bn):
          out[r] = Generation(
              tok.decode(strip_generation(ids, tok.stop_ids)), any(int(t) in stops for t in ids)
          )
        progress.update(len(rows))
    return [out[i] for i in index]

  def log_likelihoods(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[float]:
    """The summed log-probability of each answer as the assistant's turn after its chat, its end of turn
    included (tokenizer.tokenize_chat's loss-masked tokens), scored by the evaluator's score step. A
    chat and answer longer than the context keep their last tokens (counted in `prompts_cut`)."""
    if len(chats) != len(answers):
      raise ValueError(f"log_likelihoods takes one answer per chat, got {len(chats)} chats and {len(answers)} answers")
    if not chats:
      return []
    model = self.model
    encoded = [_encode(model.tokenizer, chat, answer, i) for i, (chat, answer) in enumerate(zip(chats, answers))]
    width = model.context
    cut = [i for i, (tokens, _) in enumerate(encoded) if len(tokens) - 1 > width]
    encoded = [(t[-(width + 1):], m[-(width + 1):]) if len(t) - 1 > width else (t, m) for t, m in encoded]
    self._count_cut(len(cut), len(chats), "scored chats", width)
    distinct, index = dedup(encoded, lambda pair: (pair[0].tobytes(), pair[1].tobytes()))
    out = np.zeros(len(distinct), np.float64)
    run = model.run
    with self._bar(len(distinct), "annotate: scoring") as progress, run.on_mesh():
      for bucket, rows in by_bucket([len(t) - 1 for t, _ in distinct], width, self.batch_size):
        batch = score_rows([distinct[r] for r in rows], bucket, self.batch_size)
        scored = jax.device_get(model.score(model.params, sharding.global_batch(batch, run.batch_sharding)))
        out[rows] = np.asarray(scored["loglik_b"])[: len(rows)]
        progress.update(len(rows))
    return [float(out[i]) for i in index]


def _render(tokenizer, chat: Chat, index: int) -> list[int]:
  try:
    return tokenizer.render_prompt([*chat, _PLACEHOLDER])[0]
  except (ValueError, TypeError, KeyError) as err:  # a template's refusal, TokenizerFailure, a malformed chat
    raise ConfigError(f"annotator: chat {index + 1} cannot be rendered: {err}") from None


def _encode(tokenizer, chat: Chat, answer: str, index: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, loss mask) of the chat with the answer as its assistant turn: the mask the answer's turn
  alone (tokenize_chat's last run of trained tokens: its text and end of turn), never an earlier
  assistant turn of the chat, which is context, not the answer scored."""
  try:
    tokens, mask = tokenizer.tokenize_chat([*chat, {"role": "assistant", "content": answer}])
  except (ValueError, TypeError, KeyError) as err:
    raise ConfigError(f"annotator: chat {index + 1} with its answer cannot be tokenized: {err}") from None
  return np.asarray(tokens, np.int32), last_run(np.asarray(mask, np.int32))


def last_run(mask_t: np.ndarray) -> np.ndarray:
  """The mask with its last run of ones kept and every earlier one zeroed: [1, 1, 0, 1, 1] -> [0, 0, 0, 1, 1]."""
  ones_t = np.flatnonzero(mask_t)
  if not len(ones_t):
    return mask_t
  gaps = np.flatnonzero(np.diff(ones_t) > 1)
  start = ones_t[gaps[-1] + 1] if len(gaps) else ones_t[0]
  out_t = np.zeros_like(mask_t)
  out_t[start:] = mask_t[start:]
  return out_t
