"""One process of a multi-process run on CPU, for tests/test_multihost.py:

    python tests/multihost_worker.py <process_id> <num_processes> <port> <workdir> <out.json> [overrides]

Four devices in all, split evenly over the processes (fake CPU devices); with one process there is no
coordinator. Runs configs/quickstart.py shrunk to seconds, with `overrides` (a JSON object of dotted
config keys) on top, as the launcher does (sft.jobs); process 0 writes the returned summary to out.json.
"""

import json
import os
import sys

DEVICES = 4


def main(process_id: int, num_processes: int, port: int, workdir: str, out: str, overrides: str = "{}") -> None:
  # Before JAX loads: the backend reads the flag once.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES // num_processes}"
  import jax

  if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id, initialization_timeout=120
    )
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs.quickstart import get_config
  from sft.jobs import train_and_evaluate

  assert jax.device_count() == DEVICES and jax.process_count() == num_processes, jax.devices()
  config = small(get_config())
  for key, value in json.loads(overrides).items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  summary = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump(summary, f)


def small(c):
  """The quickstart at test size. The learning rate stays flat after warmup, so a run resumed with more
  steps follows the same schedule as one that ran them all at once; evals every 4 steps put the last
  step of this 8-step run (always evaluated) among the evals of a longer run."""
  c.tokenizer.vocab_size = 512
  c.model.d_model = 32
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.mesh.data = 1
  c.mesh.fsdp = -1  # parameters split over every device, across processes
  c.train.seq_len = 64
  c.train.batch_size = 8
  c.train.pretrain_steps = 2
  c.train.sft_steps = 6
  c.train.warmup_steps = 2
  c.train.final_lr_fraction = 1.0
  c.train.log_every = 1
  c.eval.every_steps = 4
  c.eval.batch_size = 8
  c.eval.num_generations = 8
  c.eval.max_new_tokens = 4
  c.checkpoint.every_steps = 3
  return c


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
