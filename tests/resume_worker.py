"""A small training run in its own process, for the preemption and resume tests.

  python tests/resume_worker.py WORKDIR DATA_DIR '{"train.sft_steps": 30}' [DEVICES]

Trains a tiny model on a finished data build (data.source="dir"); log lines and metrics.jsonl rows at
every step. Exits 128 + signal after a signal stopped the run (as the `sft` command does).
With RESUME_WORKER_STOP_AFTER_STEP=N in its environment it stops itself (SIGSTOP) once step N's row is
written, so that a test signals it at that very step, however slow the machine.
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sft.config import base_config  # noqa: E402
from sft.errors import ConfigError, RunStopped  # noqa: E402


def config(data_dir: str, overrides: dict):
  c = base_config()
  c.data.source = "dir"
  c.data.dir = data_dir
  c.tokenizer.vocab_size = 512
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 32, 2, 4, 2
  c.model.head_dim, c.model.mlp_dim = 8, 64
  c.train.seq_len, c.train.batch_size = 64, 8
  c.train.sft_steps, c.train.warmup_steps, c.train.log_every = 24, 4, 1
  c.eval.every_steps, c.eval.batch_size, c.eval.num_generations, c.eval.max_new_tokens = 8, 8, 4, 4
  c.checkpoint.every_steps, c.checkpoint.max_to_keep = 4, 3
  for key, value in overrides.items():
    *parents, name = key.split(".")
    node = c
    for parent in parents:
      node = node[parent]
    node[name] = value
  return c


def stop_after_step(step: int) -> None:
  """The whole process (a checkpoint being written in the background too) stops right after the row of
  `step` is written, until a signal ends it (SIGKILL) or it is continued (SIGCONT)."""
  from sft.trainer.metrics_log import MetricsLog  # noqa: PLC0415

  write = MetricsLog.write

  def write_then_stop(self, done, metrics):
    write(self, done, metrics)
    if done == step:
      os.kill(os.getpid(), signal.SIGSTOP)
      # Continued: the signal sent while stopped may have landed on another thread, whose C handler only
      # flags it for the main thread; a moment here lets that happen before the loop polls for a stop.
      time.sleep(0.2)

  MetricsLog.write = write_then_stop


def main():
  devices = int(sys.argv[4]) if len(sys.argv) > 4 else 1
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  from sft.trainer import loop  # noqa: PLC0415  (JAX loads here, after the device count is set)

  workdir, data_dir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  if "RESUME_WORKER_STOP_AFTER_STEP" in os.environ:
    stop_after_step(int(os.environ["RESUME_WORKER_STOP_AFTER_STEP"]))
  try:
    loop.train_and_evaluate(config(data_dir, overrides), workdir)
  except RunStopped as stopped:
    sys.exit(stopped.exit_code)
  except ConfigError as err:
    sys.exit(f"FATAL {err}")


if __name__ == "__main__":
  main()
