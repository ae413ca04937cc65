"""Train state, optimizer and learning-rate schedule, and creating the state already sharded."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft.errors import ConfigError


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any


def phase_schedule(peak_lr: float, steps: int, warmup_steps: int, final_lr_fraction: float) -> optax.Schedule:
  """Linear warmup to `peak_lr` at update `warmup_steps - 1`, cosine decay to `final_lr_fraction *
  peak_lr` at the last update. Shifted by one so that the first update is not taken at rate 0."""
  warmup_steps = min(max(warmup_steps, 1), max(steps, 1))
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak_lr,
      warmup_steps=warmup_steps,
      decay_steps=max(steps, warmup_steps + 1),
      end_value=peak_lr * final_lr_fraction,
  )
  return lambda step: base(step + 1)


def joined_schedule(phases: list[tuple[int, optax.Schedule]]) -> optax.Schedule:
  """One schedule over consecutive phases (pretraining, then SFT), each restarting its warmup."""
  phases = [(n, s) for n, s in phases if n > 0]
  if not phases:
    raise ConfigError("there are no training steps: set train.sft_steps (or train.pretrain_steps) above 0")
  boundaries, total = [], 0
  for n, _ in phases[:-1]:
    total += n
    boundaries.append(total)
  return optax.join_schedules([s for _, s in phases], boundaries)


def _decay_mask(params):
  # Norm scales are not decayed; with stacked layers they are 2-D, so the name decides, not ndim.
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
    trainable: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; with `trainable` (params -> bool tree), frozen parameters get
  no update and no optimizer state (LoRA)."""
  adamw = optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask),
  )
  if trainable is None:
    return adamw
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def state_shardings(
    model: nn.Module, optimizer: optax.GradientTransformation, dummy_inputs: tuple, mesh: Mesh, rules
) -> tuple[TrainState, TrainState]:
  """(abstract state, its shardings), from the model's logical axis names and the rules. No memory used."""
  abstract_params, param_shardings = params_shardings(model, dummy_inputs, mesh, rules)
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = _like_params(abstract_opt_state, abstract_params, param_shardings, replicated)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt_state)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  return abstract, shardings


def params_shardings(model: nn.Module, dummy_inputs: tuple, mesh: Mesh, rules) -> tuple[Any, Any]:
  """(abstract parameters, their NamedShardings), from the model's logical axis names. No memory used."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs)["params"]
  return nn.unbox(boxed), nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)


def _like_params(opt_state: Any, abstract_params: Any, param_shardings: Any, default) -> Any:
  """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path and has its
  shape (Adam's moments) is laid out like that parameter; anything else (counters) gets `default`.
  Matching by path also covers states where frozen parameters have no entry (LoRA)."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings)):
    by_path[tuple(path)] = (leaf.shape, sharding)

  def pick(path, leaf):
    for start in range(len(path)):
      match = by_path.get(tuple(path[start:]))
      if match and match[0] == leaf.shape:
        return match[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def create_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, dummy_inputs: tuple, shardings: TrainState, rng: jax.Array
) -> TrainState:
  """Initialises parameters and optimizer state directly into their shards (no full copy anywhere)."""

  def init(rng):
    params = nn.unbox(model.init(rng, *dummy_inputs)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  return jax.jit(init, out_shardings=shardings)(rng)


def train_state_from_params(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """A fresh train state around given (already placed) parameters, e.g. a loaded checkpoint."""

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  # Donated: the state's parameters are the loaded buffers themselves, not a copy of them.
  return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (what orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

