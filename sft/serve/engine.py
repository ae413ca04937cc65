"""The server's decoding engine: continuous batching over a fixed set of slots, in one thread.

The KV cache has `slots` rows of `context` positions. A request waits in a queue until a slot is free;
then its prompt is prefilled alone (padded to a length bucket, so few programs compile) straight into
that slot's row, and it joins the decoding batch. Each decoding call runs `chunk` steps for every slot
at once, each row at its own position with its own sampling settings and key; between calls the host
hands out the new tokens, ends the rows that stopped, and refills free slots from the queue: a
finished row's slot takes a waiting request without waiting for the others (as vLLM does).

A row's tokens never depend on its batch mates: the shapes are fixed (all slots, always), a row reads
only its own cache row, and a sampled token is drawn with the request's own key folded with its step.
So a greedy answer is the one the request gets served alone, and a seeded one repeats.

Scoring (a prompt's own token log-probabilities, for `echo` with `logprobs`) runs on the same thread
between decoding calls, so the device serves one program at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sft.evaluator.generate import constrain_cache, decode_copies
from sft.evaluator.sampling import sample_rows
from sft.model import Transformer
from sft.model.layers import OUT_IN
from sft.model.transformer import init_cache, split_cache, split_layers
from sft.serve.loading import LoadedModel
from sft.trainer import sharding

log = logging.getLogger("sft")
SMALLEST_BUCKET = 16
TOP_LOGPROBS = 5  # the alternatives a token's log-probability comes with, at most (OpenAI's completions cap)


def buckets(context: int) -> list[int]:
  """The padded prompt lengths that compile: powers of two from 16 below `context`, then `context`."""
  out, size = [], SMALLEST_BUCKET
  while size < context:
    out.append(size)
    size *= 2
  return [*out, context]


def bucket_of(length: int, context: int) -> int:
  return next(b for b in buckets(context) if b >= length)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One request's decoding settings. temperature 0 is greedy; top_k 0 and top_p 1 are no limit."""

  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  logprobs: bool = False  # each generated token's log-probability and its TOP_LOGPROBS alternatives


@dataclasses.dataclass
class Token:
  """One generated token; `logprob` and `top` ((id, logprob) pairs, best first) when asked for."""

  id: int
  logprob: float | None = None
  top: list[tuple[int, float]] | None = None
  stop: bool = False  # the stop token that ended the answer: sent (with logprobs only) for its log-probability


@dataclasses.dataclass
class Job:
  """A generation (`prompt` set, `sampling` set) or a scoring (`score` True) the engine runs.

  `emit(kind, value)` is called from the engine thread: ("token", Token) for each new token, then
  ("done", reason) with reason "stop" (a stop token) or "length", or ("scored", (logprobs, tops)), or
  ("error", message). Set `cancelled` (a client that left) and the slot is freed at the next step."""

  prompt: list[int]
  emit: Callable[[str, object], None]
  sampling: Sampling | None = None
  score: bool = False
  cancelled: bool = False
  generated: int = 0


class QueueFull(Exception):
  """More requests wait than the server takes: the client should retry later (429)."""


class Unavailable(Exception):
  """The engine takes no job: it is shutting down, or it failed (503)."""


class Engine:
  """See the module docstring. `start()` runs the loop in a daemon thread; `submit(job)` queues a job
  (QueueFull past `max_waiting`, Unavailable once stopping or failed); `stop(deadline)` finishes or cancels what runs."""

  def __init__(self, model: LoadedModel, *, slots: int, chunk: int, max_waiting: int, context: int):
    self.model, self.slots, self.chunk, self.max_waiting, self.context = model, slots, chunk, max_waiting, context
    self.tokenizer = model.tokenizer
    self.stop_ids = tuple(self.tokenizer.stop_ids)
    self._waiting: collections.deque[Job] = collections.deque()
    self._lock = threading.Condition()
    self._rows: list[Job | None] = [None] * slots
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._draining_until: float | None = None
    self.failed: str | None = None  # the engine's fatal error, reported by /health
    self.steps = 0
    run, cfg = model.run, model.run.model_cfg
    self._run = run
    # A prompt is prefilled in a batch of one row per batch shard of the mesh (copies of it), so that the
    # batch divides over the devices; only row 0 is kept.
    self._prefill_rows = sharding.batch_shards(run.mesh, run.rules)
    with run.on_mesh():
      self._variables = _decode_variables(model.params)
      self._cache = jax.jit(lambda: constrain_cache(split_cache(init_cache(cfg, slots, context))))()
    self._last_b = np.zeros(slots, np.int32)
    self._pos_b = np.zeros(slots, np.int32)
    self._state = {
        "temperature_b": np.zeros(slots, np.float32), "top_k_b": np.zeros(slots, np.int32),
        "top_p_b": np.ones(slots, np.float32), "seed_b": np.zeros((slots, 2), np.uint32),
        "step_b": np.zeros(slots, np.int32),
    }
    self._prefill = jax.jit(
        functools.partial(_prefill_into, model=run.model), static_argnames=("logprobs",), donate_argnames=("cache",)
    )
    self._decode = jax.jit(
        functools.partial(_decode_chunk, model=run.model),
        static_argnames=("steps", "logprobs"), donate_argnames=("cache",),
    )
    self._score = jax.jit(functools.partial(_score_prompt, model=run.model))

  # --- the queue, from any thread ------------------------------------------------------------------

  def submit(self, job: Job) -> None:
    with self._lock:
      if self._stopping:
        raise Unavailable("the server is shutting down")
      if self.failed or (self._thread is not None and not self._thread.is_alive()):
        raise Unavailable(f"the server's engine failed: {self.failed or 'it stopped'}")
      if len(self._waiting) >= self.max_waiting:
        raise QueueFull(f"{len(self._waiting)} requests are waiting already")
      self._waiting.append(job)
      self._lock.notify()

  @property
  def waiting(self) -> int:
    return len(self._waiting)

  @property
  def running(self) -> int:
    return sum(job is not None for job in self._rows)

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, name="sft-engine", daemon=True)
    self._thread.start()

  def stop(self, deadline_s: float) -> None:
    """Takes no new job; what is queued or decoding gets `deadline_s` seconds to finish, then is cancelled
    (each told "error": the server is shutting down)."""
    with self._lock:
      self._stopping = True
      self._draining_until = time.monotonic() + deadline_s
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(deadline_s + 30)

  # --- the loop, on the engine thread ---------------------------------------------------------------

  def _loop(self) -> None:
    try:
      with self._run.on_mesh():
        while True:
          if self._past_deadline():
            self._cancel_all("the server shut down before this request finished")
            return
          self._admit()
          if self.running:
            self._step()
            continue
          with self._lock:
            if self._stopping and not self._waiting:
              return
            if not self._waiting:
              self._lock.wait(timeout=0.5)
    except Exception as err:  # noqa: BLE001  (the engine is dead: every client hears why, /health says so)
      log.exception("serve: the engine stopped")
      self.failed = f"{type(err).__name__}: {err}"
      self._cancel_all(f"the server's engine failed: {self.failed}")

  def _past_deadline(self) -> bool:
    return self._draining_until is not None and time.monotonic() > self._draining_until

  def _cancel_all(self, message: str) -> None:
    with self._lock:
      jobs = [*self._waiting, *[j for j in self._rows if j is not None]]
      self._waiting.clear()
      self._rows = [None] * self.slots
    for job in jobs:
      job.emit("error", message)

  def _admit(self) -> None:
    """Fills free slots from the queue (scoring jobs run at once and take no slot)."""
    while True:
      with self._lock:
        free = [s for s, job in enumerate(self._rows) if job is None]
        job = self._waiting.popleft() if self._waiting and (free or self._waiting[0].score) else None
      if job is None:
        return
      if job.cancelled:
        continue
      if job.score:
        self._run_score(job)
      else:
        self._start(job, free[0])

  def _padded(self, prompt: list[int]) -> np.ndarray:
    """(rows, bucket) copies of the prompt, right-padded to its length bucket (see `_prefill_rows`)."""
    tokens_rp = np.zeros((self._prefill_rows, bucket_of(len(prompt), self.context)), np.int32)
    tokens_rp[:, : len(prompt)] = prompt
    return tokens_rp

  def _run_score(self, job: Job) -> None:
    lp_p, top_ids_pn, top_lp_pn = jax.device_get(
        self._score(self.model.params, self._padded(job.prompt), np.int32(len(job.prompt)))
    )
    n = len(job.prompt)
    logprobs = [None] + [float(x) for x in lp_p[: n - 1]]
    tops = [None] + [list(zip(map(int, i), map(float, v))) for i, v in zip(top_ids_pn[: n - 1], top_lp_pn[: n - 1])]
    job.emit("scored", (logprobs, tops))

  def _start(self, job: Job, slot: int) -> None:
    s = job.sampling
    seed = _seed_words(s.seed)
    self._cache, first, lp, top_ids, top_lps = self._prefill(
        self.model.params, self._cache, self._padded(job.prompt), np.int32(len(job.prompt)), np.int32(slot),
        np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p), seed, logprobs=s.logprobs,
    )
    first, lp, top_ids, top_lps = jax.device_get((first, lp, top_ids, top_lps))
    st = self._state
    st["temperature_b"][slot], st["top_k_b"][slot], st["top_p_b"][slot] = s.temperature, s.top_k, s.top_p
    st["seed_b"][slot], st["step_b"][slot] = seed, 1
    self._last_b[slot], self._pos_b[slot] = int(first), len(job.prompt)
    self._rows[slot] = job
    self._hand_out(slot, [int(first)], [float(lp)], [list(zip(map(int, top_ids), map(float, top_lps)))])

  def _step(self) -> None:
    """One decoding call over every slot; then each live row gets its new tokens."""
    # A chunk never runs a row past its budget by much: the smallest budget left bounds it (at least 1).
    left = [j.sampling.max_tokens - j.generated for j in self._rows if j is not None]
    steps = _chunk_steps(self.chunk, min(left))
    with_logprobs = any(j is not None and j.sampling.logprobs for j in self._rows)
    self._cache, tokens_bc, lp_bc, top_ids_bcn, top_lps_bcn = self._decode(
        self._variables, self._cache, self._last_b, self._pos_b, self._state, steps=steps, logprobs=with_logprobs,
    )
    tokens_bc, lp_bc, top_ids_bcn, top_lps_bcn = jax.device_get((tokens_bc, lp_bc, top_ids_bcn, top_lps_bcn))
    self.steps += steps
    self._last_b = np.asarray(tokens_bc[:, -1], np.int32).copy()
    self._pos_b = np.minimum(self._pos_b + steps, self.context - 1).astype(np.int32)
    self._state["step_b"] = self._state["step_b"] + steps
    for slot, job in enumerate(self._rows):
      if job is None:
        continue
      tops = [None] * steps
      if job.sampling.logprobs:
        tops = [list(zip(map(int, i), map(float, v))) for i, v in zip(top_ids_bcn[slot], top_lps_bcn[slot])]
      self._hand_out(slot, tokens_bc[slot].tolist(), lp_bc[slot].tolist(), tops)

  def _hand_out(self, slot: int, tokens: list[int], logprobs: list[float], tops: list) -> None:
    """Emits a row's new tokens up to its stop token or budget; ends the row there, or when cancelled."""
    job = self._rows[slot]
    for token, lp, top in zip(tokens, logprobs, tops):
      if job.cancelled:
        break
      if token in self.stop_ids:
        if job.sampling.logprobs:  # a scoring client (echo with max_tokens=1) reads the last token's logprob
          job.emit("token", Token(token, lp, top, stop=True))
        job.emit("done", "stop")
        self._rows[slot] = None
        return
      job.generated += 1
      job.emit("token", Token(token, lp, top) if job.sampling.logprobs else Token(token))
      if job.generated >= job.sampling.max_tokens:
        job.emit("done", "length")
        self._rows[slot] = None
        return
    if job.cancelled:
      self._rows[slot] = None


def _chunk_steps(chunk: int, smallest_left: int) -> int:
  """Steps of the next decoding call: `chunk`, or fewer (a power of two, so few programs compile) when
  the row closest to its budget needs fewer."""
  steps = chunk
  while steps > 1 and steps // 2 >= smallest_left:
    steps //= 2
  return steps


def _seed_words(seed: int) -> np.ndarray:
  """A 64-bit seed as the two 32-bit words a row's key is built from."""
  return np.asarray([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint32)


def _row_key(seed_2: jax.Array, step: jax.Array) -> jax.Array:
  """The key a row draws its token at `step` with: from its request's seed and the step alone."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed_2[0]), seed_2[1]), step)


def _decode_variables(params) -> dict:
  """Per-layer parameters (and, on the CPU, the (out, in) weight copies) for the decoding loop, made once."""
  variables = {"params": split_layers(params)}
  copies = decode_copies(params)
  if copies:
    variables[OUT_IN] = copies
  return variables


def _top(logprobs_bv: jax.Array) -> tuple[jax.Array, jax.Array]:
  values, ids = jax.lax.top_k(logprobs_bv, TOP_LOGPROBS)
  return ids.astype(jnp.int32), values


def _prefill_into(
    params, cache, tokens_rp, length, slot, temperature, top_k, top_p, seed_2, *, model: Transformer, logprobs: bool
):
  """Runs one prompt (copied on every row, right-padded to its bucket) and writes row 0's keys and values
  into row `slot` of the engine's cache; returns (cache, its first token, that token's log-probability,
  top ids, top logprobs)."""
  rows, width = tokens_rp.shape
  row_cache = constrain_cache(init_cache(model.cfg, rows, width))
  positions_rp = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width))
  hidden_rpd, row_cache = model.apply(
      {"params": params}, tokens_rp, positions_rp, cache=row_cache, cache_index_b=jnp.zeros((rows,), jnp.int32),
      return_hidden=True,
  )
  last_11d = jax.lax.dynamic_slice_in_dim(hidden_rpd[:1], length - 1, 1, axis=1)
  logits_1v = model.apply({"params": params}, last_11d, method=Transformer.unembed)[:, 0].astype(jnp.float32)
  first = sample_rows(logits_1v, _row_key(seed_2, 0)[None], temperature[None], top_k[None], top_p[None])[0]
  out = []
  for (k_big, v_big), (k_rows, v_rows) in zip(cache, split_cache(row_cache)):
    # keys (B, K, H, S) take row 0's (1, K, H, P) at [slot, 0, 0, 0]; values (B, K, S, H) its (1, K, P, H).
    out.append((
        jax.lax.dynamic_update_slice(k_big, k_rows[:1].astype(k_big.dtype), (slot, 0, 0, 0)),
        jax.lax.dynamic_update_slice(v_big, v_rows[:1].astype(v_big.dtype), (slot, 0, 0, 0)),
    ))
  log_v = jax.nn.log_softmax(logits_1v[0])
  ids, values = _top(log_v[None]) if logprobs else (jnp.zeros((1, TOP_LOGPROBS), jnp.int32), jnp.zeros((1, TOP_LOGPROBS)))
  return constrain_cache(out), first, log_v[first], ids[0], values[0]


def _decode_chunk(variables, cache, last_b, pos_b, state, *, model: Transformer, steps: int, logprobs: bool):
  """`steps` decoding steps for every slot: row b feeds its last token at cache slot pos_b[b] and draws
  the next with its own settings. Returns (cache, tokens (B, steps), their logprobs (B, steps), top ids
  and logprobs (B, steps, TOP_LOGPROBS), zeros without `logprobs`)."""
  context = cache[0][0].shape[-1]
  batch = last_b.shape[0]

  def body(carry, i):
    cache, last_b = carry
    slot_b = jnp.minimum(pos_b + i, context - 1)
    logits_b1v, cache = model.apply(variables, last_b[:, None], slot_b[:, None], cache=cache, cache_index_b=slot_b)
    logits_bv = logits_b1v[:, 0].astype(jnp.float32)
    keys_b = jax.vmap(_row_key)(state["seed_b"], state["step_b"] + i)
    next_b = sample_rows(logits_bv, keys_b, state["temperature_b"], state["top_k_b"], state["top_p_b"])
    log_bv = jax.nn.log_softmax(logits_bv)
    chosen_b = jnp.take_along_axis(log_bv, next_b[:, None], axis=-1)[:, 0]
    if logprobs:
      ids_bn, values_bn = _top(log_bv)
    else:
      ids_bn, values_bn = jnp.zeros((batch, TOP_LOGPROBS), jnp.int32), jnp.zeros((batch, TOP_LOGPROBS))
    return (constrain_cache(cache), next_b), (next_b, chosen_b, ids_bn, values_bn)

  (cache, _), (tokens_cb, lp_cb, ids_cbn, values_cbn) = jax.lax.scan(body, (cache, last_b), jnp.arange(steps))
  return cache, tokens_cb.T, lp_cb.T, ids_cbn.transpose(1, 0, 2), values_cbn.transpose(1, 0, 2)


def _score_prompt(params, tokens_rp, length, *, model: Transformer):
  """Each prompt token's log-probability given the ones before it (position p scores token p + 1), with
  its TOP_LOGPROBS alternatives: (P,), (P, N), (P, N). The prompt is copied on every row (see
  `Engine._prefill_rows`); row 0 is read."""
  rows, width = tokens_rp.shape
  positions_rp = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width))
  segments_rp = (positions_rp < length).astype(jnp.int32)
  logits_rpv = model.apply({"params": params}, tokens_rp, positions_rp, segments_rp)
  log_pv = jax.nn.log_softmax(logits_rpv[0].astype(jnp.float32))
  next_p = jnp.concatenate([tokens_rp[0, 1:], jnp.zeros((1,), jnp.int32)])
  chosen_p = jnp.take_along_axis(log_pv, next_p[:, None], axis=-1)[:, 0]
  ids_pn, values_pn = _top(log_pv)
  return chosen_p, ids_pn, values_pn
