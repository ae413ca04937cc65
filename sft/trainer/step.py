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


def loss_fn(params, batch: Batch, apply_fn: Callable, rngs=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  kwargs = {"rngs": rngs} if rngs is not None else {}
  logits_btv = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], **kwargs)
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
    trainable: Callable | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update. Metrics are device scalars; the caller decides when to fetch them.

  With `trainable` (params -> bool tree), frozen parameters are held constant inside the loss, so no
  gradient is computed for them (LoRA)."""

  def loss_of(params):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable(params))
    rngs = None if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, state.step)}
    return loss_fn(params, batch, apply_fn, rngs)

  (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
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


def jit_train_step(
    apply_fn, optimizer, schedule, state_shardings: TrainState, batch_sharding, replicated, *, trainable=None, dropout_rng=None
) -> Any:
  """The compiled update: state donated, laid out as `state_shardings`, metrics replicated."""

  def step(state, batch):
    return train_step(
        state, batch, apply_fn=apply_fn, optimizer=optimizer, schedule=schedule, trainable=trainable, dropout_rng=dropout_rng
    )

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


def score_step(params, batch: Batch, *, apply_fn: Callable) -> dict[str, jax.Array]:
  """Per row: the summed log-likelihood of its loss-masked targets, and their count (choice ranking)."""
  logits_btv = apply_fn({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  mask_bt = batch["loss_mask"].astype(jnp.float32)
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), batch["targets"])
  return {"loglik_b": -jnp.sum(nll_bt * mask_bt, axis=1), "tokens_b": jnp.sum(mask_bt, axis=1)}


def jit_score_step(apply_fn, param_shardings, batch_sharding, replicated) -> Any:
  def step(params, batch):
    return score_step(params, batch, apply_fn=apply_fn)

  return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
