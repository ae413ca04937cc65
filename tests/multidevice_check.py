"""Run in a fresh process with 8 fake CPU devices: the sharded step must equal the 1-device step.

Prints one JSON line with the largest differences; tests/test_multidevice.py asserts on it.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train import make_trainer  # noqa: E402

from sft.config import base_config  # noqa: E402
from sft.model import ModelConfig  # noqa: E402
from sft.trainer import sharding  # noqa: E402


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  rng = np.random.default_rng(0)
  rows, seq_len = 8, 32
  batches = []
  for _ in range(3):
    segment_ids = np.repeat(np.array([[1] * 20 + [2] * 8 + [0] * 4]), rows, 0).astype(np.int32)
    positions = np.concatenate([np.arange(20), np.arange(8), np.zeros(4)]).astype(np.int32)
    batches.append({
        "inputs": rng.integers(4, 128, (rows, seq_len)).astype(np.int32),
        "targets": rng.integers(4, 128, (rows, seq_len)).astype(np.int32),
        "loss_mask": ((rng.random((rows, seq_len)) < 0.5) & (segment_ids > 0)).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.repeat(positions[None], rows, 0),
    })

  def run(**kwargs):
    state, step, batch_sharding, (_, _, mesh) = make_trainer(cfg, seq_len=seq_len, **kwargs)
    losses = []
    with jax.set_mesh(mesh):
      for batch in batches:
        state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state

  single_losses, single_params, _ = run(devices=jax.devices()[:1])
  rules = tuple(base_config().sharding_rules)
  multi_losses, multi_params, multi_state = run(mesh_shape={"data": 2, "fsdp": 2, "tensor": 2}, rules=rules)
  q = multi_state.params["layers"]["attn"]["q"]
  q_specs = [str(x.sharding.spec) for x in jax.tree.leaves(multi_state.opt_state) if x.shape == q.shape]
  param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(multi_params)))
  print(json.dumps({
      "single_losses": single_losses,
      "multi_losses": multi_losses,
      "max_param_diff": param_diff,
      "q_spec": str(q.sharding.spec),
      "q_moment_specs": q_specs,
      "q_shards": len(q.addressable_shards),
      "q_shard_shape": list(q.addressable_shards[0].data.shape),
  }))


if __name__ == "__main__":
  main()
