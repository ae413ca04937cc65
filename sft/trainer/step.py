"""The loss, the one jitted train step, and the eval step.

The loss is the cross-entropy summed over every loss-masked token of the *global* batch and divided
by their number: each response token weighs the same, however the examples were packed into rows.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sft.trainer.state import TrainState

Batch = dict[str, jax.Array]


def token_sums(logits_btv: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """Sums over loss-masked tokens: cross-entropy, correct argmax predictions, and their count."""
  mask_bt = batch["loss_mask"].astype(jnp.float32)
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
  correct_bt = (jnp.argmax(logits_btv, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {
      "nll_sum": jnp.sum(nll_bt * mask_bt),
      "correct_sum": jnp.sum(correct_bt * mask_bt),
      "loss_tokens": jnp.sum(mask_bt),
  }


def loss_fn(params, batch: Batch, apply_fn: Callable) -> tuple[jax.Array, dict[str, jax.Array]]:
  logits_btv = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  sums = token_sums(logits_btv, batch)
  loss = sums["nll_sum"] / jnp.maximum(sums["loss_tokens"], 1.0)
  return loss, sums


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update. Metrics are device scalars; the caller decides when to fetch them."""
  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, apply_fn)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "accuracy": sums["correct_sum"] / jnp.maximum(sums["loss_tokens"], 1.0),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "learning_rate": schedule(state.step),
      "loss_tokens": sums["loss_tokens"],
      "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, apply_fn: Callable) -> dict[str, jax.Array]:
  """Sums for one batch; add them up over the eval set, then divide."""
  logits_btv = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  return token_sums(logits_btv, batch)


def jit_train_step(apply_fn, optimizer, schedule, state_shardings: TrainState, batch_sharding, replicated) -> Any:
  """The compiled update: state donated, laid out as `state_shardings`, metrics replicated."""

  def step(state, batch):
    return train_step(state, batch, apply_fn=apply_fn, optimizer=optimizer, schedule=schedule)

  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )


def jit_eval_step(apply_fn, param_shardings, batch_sharding, replicated) -> Any:
  def step(params, batch):
    return eval_step(params, batch, apply_fn=apply_fn)

  return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
