"""The one train step (with gradient accumulation), the eval step, and the scoring step.

The loss is the cross-entropy summed over every loss-masked token of the *global* batch and divided
by their number: each response token weighs the same, however the examples were packed into rows, and
however the batch was split into micro-batches or devices. The sums themselves are in sft/trainer/loss.py.

`train_step` is compiled two ways: `jit_train_step` (the global batch sharded over the mesh, the
default) and `pmap_train_step` (train.parallelism="pmap": data parallel under jax.pmap, each device
its own rows, the sums and gradients added up over devices with lax.psum before the one division).
`build_train_step` is the one way to get either, with how to place its batches and state (a Stepper):
the trainer and the benchmarks build their step with it.

Every step reports whether its loss and gradient norm were finite (the metric `nonfinite`); with
`skip_nonfinite` (train.on_nonfinite="skip") a step where they are not leaves the train state exactly as
it was, decided on the device. The loop reads the flags with the metrics it logs, and before each eval and save.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sft.trainer import sharding
from sft.trainer.loss import Batch, loss_fn, loss_sums, token_sums  # noqa: F401  (token_sums, loss_fn: the loss API)
from sft.trainer.sharding import PMAP_AXIS, mesh_context
from sft.trainer.state import TrainState


def split_micro_batches(batch: Batch, num_micro: int, sharding: NamedSharding | None = None) -> Batch:
  """(B, T) -> (k, B/k, T) with micro-batch i = rows i, i + k, i + 2k, ...

  A data-sharded batch gives each device a contiguous block of rows. Reshaping to (B/k, k, T) cuts
  every block into whole groups of k rows (given (B/k) % shards == 0: see RunSetup.check_batch), so each
  micro-batch takes B/(k * shards) rows from every device and no row crosses devices; slicing rows
  [i B/k, (i+1) B/k) instead would put each micro-batch on a few devices and idle the rest.
  `sharding` pins that layout: (None, <the batch's axes>)."""

  def split(x_bt):
    x_kbt = jnp.swapaxes(x_bt.reshape(x_bt.shape[0] // num_micro, num_micro, *x_bt.shape[1:]), 0, 1)
    return x_kbt if sharding is None else jax.lax.with_sharding_constraint(x_kbt, sharding)

  return jax.tree.map(split, batch)


def _is_none(x) -> bool:
  return x is None


def accumulated_grads(
    sums_of: Callable, params, micro_batches: Batch, trainable_mask, axis_name: str | None = None
) -> tuple[Any, dict[str, jax.Array]]:
  """Gradients of the nll summed over every micro-batch (scanned: one micro-batch's activations alive at
  a time) divided once by their total loss tokens, and the summed token sums. `sums_of(params,
  micro_batch, index)` gives a micro-batch's sums; frozen leaves (mask False) get zero gradients
  without a float32 accumulator. Under pmap (`axis_name`), the gradient sums and token sums of every
  device are added up (psum, frozen leaves left out) before the division: the global batch's mean."""
  zeros = jax.tree.map(lambda p, t: jnp.zeros(p.shape, jnp.float32) if t else None, params, trainable_mask)

  def nll_sum_of(params, micro_batch, index):
    sums = sums_of(params, micro_batch, index)
    return sums["nll_sum"], sums

  def micro_step(carry, xs):
    (grad_sum, sums), (micro_batch, index) = carry, xs
    grads, micro_sums = jax.grad(nll_sum_of, has_aux=True)(params, micro_batch, index)
    grad_sum = jax.tree.map(lambda acc, g: None if acc is None else acc + g.astype(jnp.float32), grad_sum, grads, is_leaf=_is_none)
    return (grad_sum, jax.tree.map(jnp.add, sums, micro_sums)), None

  num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
  sums0 = {k: jnp.zeros((), jnp.float32) for k in ("nll_sum", "correct_sum", "loss_tokens")}
  (grad_sum, sums), _ = jax.lax.scan(micro_step, (zeros, sums0), (micro_batches, jnp.arange(num_micro)))
  if axis_name is not None:
    grad_sum, sums = jax.lax.psum((grad_sum, sums), axis_name)
  denom = jnp.maximum(sums["loss_tokens"], 1.0)
  grads = jax.tree.map(
      lambda acc, p: jnp.zeros_like(p) if acc is None else (acc / denom).astype(p.dtype), grad_sum, params, is_leaf=_is_none
  )
  return grads, sums


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    trainable: Callable | None = None,
    dropout_rng: jax.Array | None = None,
    grad_accum_steps: int = 1,
    loss_chunk_size: int = 0,
    micro_batch_sharding: NamedSharding | None = None,
    axis_name: str | None = None,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update. Metrics are device scalars; the caller decides when to fetch them.

  With `trainable` (params -> bool tree), frozen parameters are held constant inside the loss, so no
  gradient is computed for them (LoRA). With `grad_accum_steps` k > 1 the batch is k micro-batches of
  B/k rows, scanned; the update and metrics equal one step on the whole batch up to float rounding.
  With `axis_name` (inside pmap, `batch` one device's rows) the token sums and gradient sums are added
  up over that axis first (see `accumulated_grads`, a single micro-batch when k = 1), so every device
  applies the update and reports the metrics of the global batch; dropout masks differ per device.

  Metric `nonfinite` is 1.0 when the loss or the gradient norm is not finite, `nonfinite_params` when a
  parameter is after the step (a norm overflows long before a parameter does). With `skip_nonfinite` such a
  step returns the state it was given, its step counter too (the schedule goes on from there): a select on
  the device, no host round trip. The gradients are whole by then (accumulated, and added up over devices
  under pmap), so every device decides alike."""
  mask = trainable(state.params) if trainable is not None else jax.tree.map(lambda _: True, state.params)
  step_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, state.step)
  if step_rng is not None and axis_name is not None:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

  def held(params):
    return params if trainable is None else jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)

  if grad_accum_steps == 1 and axis_name is None:
    rngs = None if step_rng is None else {"dropout": step_rng}
    loss_of = lambda params: loss_fn(held(params), batch, apply_fn, rngs, loss_chunk_size)  # noqa: E731
    (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  else:

    def sums_of(params, micro_batch, index):
      rngs = None if step_rng is None else {"dropout": jax.random.fold_in(step_rng, index)}
      return loss_sums(held(params), micro_batch, apply_fn, rngs, loss_chunk_size)

    micro_batches = split_micro_batches(batch, grad_accum_steps, micro_batch_sharding)
    grads, sums = accumulated_grads(sums_of, state.params, micro_batches, mask, axis_name)
    loss = sums["nll_sum"] / jnp.maximum(sums["loss_tokens"], 1.0)
  tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
  if axis_name is not None:
    tokens = jax.lax.psum(tokens, axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    # Not optax.apply_if_finite: its counters in the optimizer state would make earlier runs' checkpoints
    # unreadable, and it applies the update after a number of bad steps, where the loop stops the run.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {
      "loss": loss,
      "accuracy": sums["correct_sum"] / jnp.maximum(sums["loss_tokens"], 1.0),
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(new_state.params),
      "learning_rate": schedule(state.step),
      "loss_tokens": sums["loss_tokens"],
      "tokens": tokens,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "nonfinite_params": 1.0 - _all_finite(new_state.params).astype(jnp.float32),
  }
  return new_state, metrics


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def eval_step(params, batch: Batch, *, apply_fn: Callable, loss_chunk_size: int = 0) -> dict[str, jax.Array]:
  """Sums for one batch; add them up over the eval set, then divide."""
  return loss_sums(params, batch, apply_fn, chunk_size=loss_chunk_size)


def jit_train_step(
    apply_fn, optimizer, schedule, state_shardings: TrainState, batch_sharding, replicated, *, trainable=None, dropout_rng=None,
    grad_accum_steps: int = 1, loss_chunk_size: int = 0, skip_nonfinite: bool = False,
) -> Any:
  """The compiled update: state donated, laid out as `state_shardings`, metrics replicated."""
  micro_batch_sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(None, *batch_sharding.spec)) if grad_accum_steps > 1 else None

  def step(state, batch):
    return train_step(
        state, batch, apply_fn=apply_fn, optimizer=optimizer, schedule=schedule, trainable=trainable, dropout_rng=dropout_rng,
        grad_accum_steps=grad_accum_steps, loss_chunk_size=loss_chunk_size, micro_batch_sharding=micro_batch_sharding,
        skip_nonfinite=skip_nonfinite,
    )

  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )


def pmap_train_step(
    apply_fn, optimizer, schedule, *, trainable=None, dropout_rng=None, grad_accum_steps: int = 1,
    loss_chunk_size: int = 0, skip_nonfinite: bool = False,
) -> Any:
  """`train_step` under jax.pmap over this process's devices (data parallel, train.parallelism="pmap").

  Takes the state replicated (a leading device axis: sharding.replicate_for_pmap) and donated, and the
  batch as (devices, B / devices, T) (sharding.per_device_batch); each device runs its rows (in
  micro-batches of B / (devices k) rows with grad_accum_steps k), the sums and gradients are added up
  over every device of every process, and each device applies the same update. Metrics come back once
  per device, all equal: read [0]."""

  def step(state, batch):
    return train_step(
        state, batch, apply_fn=apply_fn, optimizer=optimizer, schedule=schedule, trainable=trainable, dropout_rng=dropout_rng,
        grad_accum_steps=grad_accum_steps, loss_chunk_size=loss_chunk_size, axis_name=PMAP_AXIS,
        skip_nonfinite=skip_nonfinite,
    )

  return jax.pmap(step, axis_name=PMAP_AXIS, donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class Stepper:
  """How to run `train_step` in either train.parallelism. Outside it the train state is always laid out
  as the mesh's state shardings say (what checkpoints, evaluation and export take)."""

  step: Any  # (the step's state, a placed batch) -> (the step's state, metrics: device scalars)
  place_batch: Any  # this process's rows of a batch -> the step's batch
  to_step: Any  # train state -> the step's state (pmap: replicated over the local devices)
  from_step: Any  # the inverse
  context: Any  # () -> the context manager the step runs in
  converts: bool  # whether from_step costs a copy (then it runs only for evals and saves)
  jitted: Any  # the jax.jit (or jax.pmap) function itself: lower() it for XLA's cost and memory analyses


def step_options(train_config) -> dict[str, Any]:
  """The `build_train_step` options a run config's train section sets."""
  return dict(
      parallelism=train_config.parallelism, grad_accum_steps=train_config.grad_accum_steps,
      loss_chunk_size=train_config.loss_chunk_size, skip_nonfinite=train_config.on_nonfinite == "skip",
  )


def build_train_step(
    apply_fn, optimizer, schedule, state_shardings: TrainState, mesh, rules, *, parallelism: str = "jit",
    trainable=None, dropout_rng=None, grad_accum_steps: int = 1, loss_chunk_size: int = 0, skip_nonfinite: bool = False,
) -> Stepper:
  """The train step, compiled as `parallelism` says ("jit": `jit_train_step` over `mesh`, the state laid
  out as `state_shardings`; "pmap": `pmap_train_step` over this process's devices, `state_shardings` the
  layout `from_step` gives back), with how to place its batches and state. Both donate the state."""
  options = dict(
      trainable=trainable, dropout_rng=dropout_rng, grad_accum_steps=grad_accum_steps, loss_chunk_size=loss_chunk_size,
      skip_nonfinite=skip_nonfinite,
  )
  if parallelism == "jit":
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jit_train_step(apply_fn, optimizer, schedule, state_shardings, batch_sharding, replicated, **options)
    identity = lambda x: x  # noqa: E731
    return Stepper(
        step=step, place_batch=lambda batch: sharding.global_batch(batch, batch_sharding), to_step=identity,
        from_step=identity, context=lambda: mesh_context(mesh, rules), converts=False, jitted=step,
    )
  if parallelism != "pmap":
    raise ValueError(f"parallelism must be 'jit' or 'pmap', got {parallelism!r}")
  # pmap: traced and run outside the mesh context (pmap has a mesh of its own; the model's sharding
  # constraints are no-ops there), its metrics read from this process's first device.
  pmapped = pmap_train_step(apply_fn, optimizer, schedule, **options)
  devices = jax.local_device_count()

  def step(state, batch):
    state, metrics = pmapped(state, batch)
    return state, {k: v.addressable_shards[0].data.reshape(()) for k, v in metrics.items()}

  return Stepper(
      step=step, place_batch=lambda batch: sharding.per_device_batch(batch, devices),
      to_step=sharding.replicate_for_pmap, from_step=lambda state: sharding.unreplicate_from_pmap(state, state_shardings),
      context=contextlib.nullcontext, converts=True, jitted=pmapped,
  )


def jit_eval_step(apply_fn, param_shardings, batch_sharding, replicated, *, loss_chunk_size: int = 0) -> Any:
  def step(params, batch):
    return eval_step(params, batch, apply_fn=apply_fn, loss_chunk_size=loss_chunk_size)

  return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)


def score_step(params, batch: Batch, *, apply_fn: Callable) -> dict[str, jax.Array]:
  """Per row: the summed log-likelihood of its loss-masked targets, and their count (choice ranking)."""
  logits_btv = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  mask_bt = batch["loss_mask"].astype(jnp.float32)
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])  # float32 logits
  return {"loglik_b": -jnp.sum(nll_bt * mask_bt, axis=1), "tokens_b": jnp.sum(mask_bt, axis=1)}


def jit_score_step(apply_fn, param_shardings, batch_sharding, replicated) -> Any:
  def step(params, batch):
    return score_step(params, batch, apply_fn=apply_fn)

  return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
