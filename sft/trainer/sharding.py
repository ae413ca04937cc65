"""Device mesh from the config, logical-axis rules, and placement of batches on the mesh (or, in pmap
mode, of batches and the replicated state on this process's devices)."""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sft.config import MESH_AXES, mesh_problem
from sft.errors import ConfigError
from sft.model import axes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor). One size may be -1: it takes the devices left over."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  problem = mesh_problem(dict(zip(MESH_AXES, sizes)))
  if problem:
    raise ConfigError(problem)
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ConfigError(f"{len(devices)} devices do not divide into a mesh with fixed sizes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, there are {len(devices)}")
  if devices == list(jax.devices()):
    # Lays the mesh out along the physical interconnect (matters on TPU slices and GPU hosts).
    device_grid = mesh_utils.create_device_mesh(sizes, devices)
  else:
    device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(rules: Sequence[Sequence], mesh: Mesh) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Checks a config's rules table: known logical names, known mesh axes, no name twice."""
  checked = []
  for rule in rules:
    if len(rule) != 2:
      raise ConfigError(f"a sharding rule is (logical_name, mesh_axes); got {rule!r}")
    name, target = rule[0], rule[1]
    if name not in axes.ALL:
      raise ConfigError(f"sharding rule for unknown logical axis {name!r}; known: {axes.ALL}")
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
      if t not in mesh.axis_names:
        raise ConfigError(f"sharding rule {name!r} -> {t!r}: no such mesh axis in {mesh.axis_names}")
    checked.append((name, None if not targets else targets[0] if len(targets) == 1 else targets))
  names = [n for n, _ in checked]
  if len(set(names)) != len(names):
    raise ConfigError(f"a logical axis appears twice in the sharding rules: {names}")
  return tuple(checked)


def logical_sharding(logical_axes: tuple[str | None, ...], mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return logical_sharding((axes.BATCH, axes.LENGTH), mesh, rules)


def batch_shards(mesh: Mesh, rules) -> int:
  """Into how many pieces the batch dimension is split (the global batch must divide by it)."""
  spec = batch_sharding(mesh, rules).spec
  first = spec[0] if len(spec) else None
  names = () if first is None else (first,) if isinstance(first, str) else first
  return math.prod(mesh.shape[n] for n in names)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Stitches every process's rows into one global array per key, sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def process_rows(sharding: NamedSharding, batch_size: int, seq_len: int) -> slice:
  """The rows of a global (batch_size, seq_len) batch that this process's devices hold: what it feeds
  to `global_batch`. One block for every mesh this project builds (a process owns a block of devices)."""
  held = set()
  for index in sharding.addressable_devices_indices_map((batch_size, seq_len)).values():
    held.update(range(batch_size)[index[0]])
  lo, hi = min(held), max(held) + 1
  if len(held) != hi - lo:
    raise ConfigError(f"this process's devices hold rows {sorted(held)} of the batch, not one block: change the mesh")
  return slice(lo, hi)


# --- train.parallelism="pmap": a leading axis over this process's devices ----------------------------

PMAP_AXIS = "batch"  # the pmapped step's device axis: the name its psums add up over


def replicate_for_pmap(tree):
  """Arrays replicated over a mesh (every local device holds the whole array) -> the same arrays with
  a leading axis over this process's devices, as jax.pmap takes them. No transfer: each device's
  entry is the copy it already holds."""
  local = jax.local_devices()
  pmap_sharding = NamedSharding(Mesh(np.asarray(local), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

  def replicate(x):
    by_device = {shard.device: shard.data for shard in x.addressable_shards}
    if not x.sharding.is_fully_replicated or set(by_device) != set(local):
      raise ValueError(f"replicate_for_pmap takes arrays replicated over every local device, got {x.sharding}")
    return jax.make_array_from_single_device_arrays((len(local), *x.shape), pmap_sharding, [by_device[d][None] for d in local])

  return jax.tree.map(replicate, tree)


def unreplicate_from_pmap(tree, shardings):
  """The inverse of `replicate_for_pmap`: each leaf once, laid out as `shardings` (replicated
  NamedShardings over a mesh whose addressable devices are this process's), from the copies the local
  devices hold: what checkpoints and the eval step take, the same as in jit mode."""

  def unreplicate(x, sharding):
    by_device = {shard.device: shard.data for shard in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape[1:], sharding, [by_device[d].reshape(x.shape[1:]) for d in sharding.addressable_devices]
    )

  return jax.tree.map(unreplicate, tree, shardings)


def per_device_batch(local_batch: Mapping[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
  """This process's rows (B, T) -> (devices, B / devices, T): device i takes the i-th block of rows."""
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.shape[0] % devices:
      raise ConfigError(f"a batch of {v.shape[0]} rows on this process does not split over its {devices} devices")
    out[k] = v.reshape(devices, v.shape[0] // devices, *v.shape[1:])
  return out


def pmap_process_rows(batch_size: int) -> slice:
  """The rows of the global batch that this process feeds to its devices in pmap mode: the
  process_index-th of process_count equal blocks (the psum adds up every process's devices)."""
  per_process = batch_size // jax.process_count()
  return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def mesh_context(mesh, rules) -> contextlib.ExitStack:
  """The context the jitted steps trace and run in: the mesh, and the logical axis rules."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack
