"""Run in a fresh process with 8 fake CPU devices (fsdp 4 x tensor 2): Hugging Face weights load
straight into their shards, each distinct shard reading only its own box of the files; exporting
sharded parameters writes the same bytes as exporting them from the host; LoRA adapters initialised
beside a sharded loaded base leave the base arrays untouched.

Prints one JSON line; tests/test_hf_slices.py asserts on it.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sft.config import base_config  # noqa: E402
from sft.hf import export_model, load_params, safetensors_io, to_hf_tensors  # noqa: E402
from sft.hf import weights as hf_weights  # noqa: E402
from sft.model import ModelConfig, Transformer, lora  # noqa: E402
from sft.trainer import sharding  # noqa: E402
from sft.trainer import state as state_lib  # noqa: E402

BASE = ModelConfig(vocab_size=128, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, tie_embeddings=False)
CONFIGS = {
    "llama": BASE,
    "qwen2": dataclasses.replace(BASE, qkv_bias=True),
    "qwen3": dataclasses.replace(BASE, qk_norm=True, tie_embeddings=True),
    "gemma2": dataclasses.replace(BASE, sandwich_norms=True, norm_plus_one=True, embed_scale=True, mlp_activation="gelu_tanh"),
    "gpt2": dataclasses.replace(
        BASE, num_kv_heads=4, norm_type="layer", position_embedding="learned", max_positions=16,
        mlp_activation="gelu_tanh", mlp_gated=False, linear_bias=True,
    ),
}
DUMMY = (jnp.zeros((1, 8), jnp.int32),) * 3


class Reads:
  """Bytes read from the files, attributed to the device whose shard was being built."""

  def __init__(self):
    self.current = None
    self.per_call = []  # (make_array_from_callback call, leaf shape, index, bytes read while building it)
    self.calls = 0

  def install(self):
    read, make = safetensors_io.SafetensorsFile.read, jax.make_array_from_callback
    reads = self

    def counted_read(self, name, index):
      out = read(self, name, index)
      if reads.current is not None:
        reads.current[0] += out.nbytes
      return out

    def counted_make(shape, sharding, callback, *args, **kwargs):
      reads.calls += 1
      call = reads.calls

      def wrapped(index):
        reads.current = [0]
        try:
          return callback(index)
        finally:
          reads.per_call.append((call, tuple(shape), index, reads.current[0]))
          reads.current = None

      return make(shape, sharding, wrapped, *args, **kwargs)

    safetensors_io.SafetensorsFile.read = counted_read
    jax.make_array_from_callback = counted_make


def random_params(cfg, seed):
  abstract = hf_weights.abstract_params(cfg)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def write_checkpoint(folder, params, cfg, dtype=np.float32):
  folder.mkdir(parents=True)
  tensors = {k: v.astype(dtype) for k, v in to_hf_tensors(params, cfg).items()}
  safetensors.numpy.save_file(tensors, folder / "model.safetensors")
  return tensors


def shard_bytes(reads, itemsize):
  """Per device callback: (bytes read, bytes of its shard in the file's dtype, bytes of the whole tensor)."""
  out = []
  for _, shape, index, nbytes in reads.per_call:
    box = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
    out.append((nbytes, math.prod(box) * itemsize, math.prod(shape) * itemsize))
  return out


def distinct_shard_bytes(reads, itemsize):
  """Bytes of the distinct shards (replicas counted once) of every parameter built."""
  seen = {}
  for call, shape, index, _ in reads.per_call:
    key = (call, tuple(s.indices(n) for s, n in zip(index, shape)))
    seen[key] = math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape)) * itemsize
  return sum(seen.values())


def last_axis_shardings(abstract, mesh):
  """Every leaf split on its last axis over tensor and the one before over fsdp where they divide:
  this cuts head_dim, which the run's rules never do, so some boxes are read as whole heads."""

  def spec(a):
    axes = [None] * a.ndim
    if a.ndim >= 1 and a.shape[-1] % 2 == 0:
      axes[-1] = "tensor"
    if a.ndim >= 2 and a.shape[-2] % 4 == 0:
      axes[-2] = "fsdp"
    return NamedSharding(mesh, PartitionSpec(*axes))

  return jax.tree.map(spec, abstract)


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  rules = sharding.logical_rules(base_config().sharding_rules, mesh)
  reads = Reads()
  reads.install()
  result = {"families": {}}
  tmp = pathlib.Path(tempfile.mkdtemp())
  for i, (name, cfg) in enumerate(CONFIGS.items()):
    params = random_params(cfg, i)
    write_checkpoint(tmp / name, params, cfg)
    _, shardings = state_lib.params_shardings(Transformer(cfg), DUMMY, mesh, rules)
    reads.per_call.clear()
    loaded = load_params(tmp / name, cfg, shardings)
    per_call = shard_bytes(reads, 4)
    full = load_params(tmp / name, cfg)  # whole tensors, one device: the unsharded path
    equal = all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
    equal_full = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(full)))
    placed = all(a.sharding == s for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)))
    q = loaded["layers"]["attn"]["q"]
    result["families"][name] = {
        "equal_written": equal, "equal_unsharded": equal_full, "placed": placed,
        "calls": len(per_call), "exact_reads": sum(r == s for r, s, _ in per_call),
        "cached_reads": sum(r == 0 for r, _, _ in per_call),
        "bytes_read": sum(r for r, _, _ in per_call),
        "bytes_of_distinct_shards": distinct_shard_bytes(reads, 4),
        "params_bytes": sum(x.size * 4 for x in jax.tree.leaves(params)),
        "q_spec": str(q.sharding.spec),
        "q_read_per_device": [r for (_, shape, _, _), (r, _, _) in zip(reads.per_call, per_call) if shape == q.shape],
        "q_tensor_bytes": q.size * 4,
    }

    if name in ("llama", "gpt2"):
      # head_dim split too: boxes that are not whole heads read whole heads, and still load exactly.
      odd = last_axis_shardings(hf_weights.abstract_params(cfg), mesh)
      reads.per_call.clear()
      loaded_odd = load_params(tmp / name, cfg, odd)
      per_call = shard_bytes(reads, 4)
      result["families"][name]["odd_equal"] = all(
          np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(loaded_odd), jax.tree.leaves(params))
      )
      result["families"][name]["odd_reads_bounded"] = all(s <= r <= t for r, s, t in per_call if r)
      result["families"][name]["odd_over_reads"] = sum(r > s for r, s, _ in per_call)
      result["families"][name]["odd_max_over_read"] = max(r / s for r, s, _ in per_call if r)

      # Export from the sharded parameters: the very bytes of exporting the host copy.
      export_model(loaded, cfg, tmp / f"{name}-from-devices", "gpt2" if name == "gpt2" else "llama", max_shard_bytes=20_000)
      export_model(params, cfg, tmp / f"{name}-from-host", "gpt2" if name == "gpt2" else "llama", max_shard_bytes=20_000)
      a, b = sorted((tmp / f"{name}-from-devices").iterdir()), sorted((tmp / f"{name}-from-host").iterdir())
      result["families"][name]["export_files"] = len(a)
      result["families"][name]["export_same_bytes"] = [p.name for p in a] == [p.name for p in b] and all(
          p.read_bytes() == r.read_bytes() for p, r in zip(a, b)
      )

  # bfloat16 in the file, float32 parameters: converted shard by shard, exactly; half the bytes read.
  cfg = CONFIGS["llama"]
  params = random_params(cfg, 7)
  tensors = write_checkpoint(tmp / "bf16", params, cfg, ml_dtypes.bfloat16)
  _, shardings = state_lib.params_shardings(Transformer(cfg), DUMMY, mesh, rules)
  reads.per_call.clear()
  loaded = load_params(tmp / "bf16", cfg, shardings)
  per_call = shard_bytes(reads, 2)
  expected = load_params(tmp / "bf16", cfg)
  result["bf16"] = {
      "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected))),
      "dtype": str(jax.tree.leaves(loaded)[0].dtype),
      "exact_reads": all(r == s for r, s, _ in per_call if r),
      "q_bits": np.array_equal(
          np.asarray(loaded["layers"]["attn"]["q"][1]).reshape(32, 32).T,
          tensors["model.layers.1.self_attn.q_proj.weight"].astype(np.float32),
      ),
  }

  # LoRA beside a sharded loaded base: the adapters alone are made, placed by their shardings.
  lora_cfg = dataclasses.replace(cfg, lora_rank=4, lora_targets=("q", "v", "down"))
  model = Transformer(lora_cfg)
  _, lora_shardings = state_lib.params_shardings(model, DUMMY, mesh, rules)
  base = load_params(tmp / "bf16", cfg, lora.base_params(lora_shardings))
  adapters = lora.init_adapters(model, DUMMY, lora_shardings, jax.random.key(0))
  merged = lora.with_adapters(base, adapters)
  base_leaves = {id(x) for x in jax.tree.leaves(base)}
  result["lora"] = {
      "base_is_loaded": all(id(x) in base_leaves for x in jax.tree.leaves(lora.base_params(merged))),
      "adapter_count": len(jax.tree.leaves(adapters)),
      "placed": all(a.sharding == s for a, s in zip(jax.tree.leaves(merged), jax.tree.leaves(lora_shardings))),
      "b_zero": all(not np.any(np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(adapters)[0] if "_lora_b" in str(k[-1])),
  }
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)), jnp.int32)
  positions, segments = jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.ones((2, 8), jnp.int32)
  ours = jax.jit(model.apply)({"params": merged}, tokens, positions, segments)
  theirs = jax.jit(Transformer(cfg).apply)({"params": base}, tokens, positions, segments)
  result["lora"]["logits_max_diff"] = float(jnp.max(jnp.abs(ours - theirs)))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
