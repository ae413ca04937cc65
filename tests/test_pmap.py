"""train.parallelism="pmap": the same update as the jitted step, under jax.pmap with psums.

On 8 fake CPU devices (a subprocess: the device count is read once, when JAX loads) two real AdamW
steps of the pmapped step equal two steps of the jitted step on the same global batch: loss,
accuracy, token counts, norms and the updated parameters, with and without gradient accumulation.
The batch's response tokens are spread unevenly over the
devices, and one device's rows have none at all, so a mean of per-device means would differ.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fresh_process import fresh_env, run_json

from sft.config import base_config
from sft.config_check import config_problems
from sft.errors import ConfigError

TESTS = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-5  # float32: the sums only change order (devices, micro-batches)
# Adam divides each gradient by its own scale: a weight whose gradient is at rounding level (|g| ~ 1e-7,
# summed in another order) moves by a visible fraction of lr (3e-3). On this batch the jit step with
# grad_accum_steps=2 differs from the plain jit step by as much (1.4e-4) as the pmapped step does
# (1.5e-4); a tenth of lr is the bound, and almost every weight must agree to 1e-5.
ADAM_ATOL = 3e-4
METRICS = ("loss", "accuracy", "loss_tokens", "tokens", "grad_norm", "param_norm", "learning_rate")

SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import json, sys
sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from test_step import uneven_batch
from sft.model import ModelConfig, Transformer
from sft.trainer import sharding
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib

assert jax.device_count() == 8
DEVICES, ROWS, SEQ_LEN = 8, 16, 32
base = ModelConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
batch = uneven_batch(rows=ROWS, seq_len=SEQ_LEN)
batch["loss_mask"][:ROWS // DEVICES] = 0  # device 0's rows: no response tokens at all
per_device = batch["loss_mask"].reshape(DEVICES, -1).sum(1).tolist()

def build(cfg):
  mesh = sharding.make_mesh({{"data": -1}})
  rules = sharding.logical_rules((("batch", ("data", "fsdp")),), mesh)
  model = Transformer(cfg, train=True)
  schedule = state_lib.phase_schedule(3e-3, 10, 2, 0.1)
  optimizer = state_lib.make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
  dummy = (jnp.zeros((1, SEQ_LEN), jnp.int32),) * 3
  _, shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, shardings)  # as the loop lays out a pmap run's state
  initial = jax.device_get(state_lib.create_train_state(model, optimizer, dummy, shardings, jax.random.key(0)))
  fresh_state = lambda: jax.device_put(initial, shardings)  # every step donates its state
  return dict(mesh=mesh, rules=rules, model=model, schedule=schedule, optimizer=optimizer, shardings=shardings,
              replicated=replicated, fresh_state=fresh_state)

def jit_run(b, steps=2):
  batch_sharding = sharding.batch_sharding(b["mesh"], b["rules"])
  step = step_lib.jit_train_step(b["model"].apply, b["optimizer"], b["schedule"], b["shardings"], batch_sharding, b["replicated"])
  state, out = b["fresh_state"](), []
  with jax.set_mesh(b["mesh"]):
    for _ in range(steps):
      state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
      out.append({{k: float(v) for k, v in metrics.items()}})
  return out, jax.device_get(state)

def pmap_run(b, steps=2, **kwargs):
  step = step_lib.pmap_train_step(b["model"].apply, b["optimizer"], b["schedule"], **kwargs)
  state, out = sharding.replicate_for_pmap(b["fresh_state"]()), []
  for _ in range(steps):
    state, metrics = step(state, sharding.per_device_batch(batch, DEVICES))
    values = jax.device_get(metrics)
    assert all(np.all(v == v[0]) for v in values.values())  # every device holds the global metrics
    out.append({{k: float(v[0]) for k, v in values.items()}})
  copies = jax.device_get(state.params)
  spread = max(float(np.max(np.abs(x - x[:1]))) for x in jax.tree.leaves(copies))  # the copies stay identical
  state = sharding.unreplicate_from_pmap(state, b["shardings"])
  assert all(x.sharding == b["replicated"] for x in jax.tree.leaves(state))  # a checkpoint as jit mode saves it
  return out, jax.device_get(state), spread

def diffs(a, b):
  d = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  d = np.concatenate(d)
  return float(d.max()), float(np.mean(d > 1e-5))

result = {{"per_device_tokens": per_device}}
plain = build(base)
ref_metrics, ref_state = jit_run(plain)
for name, kwargs in (("plain", {{}}), ("accumulated", {{"grad_accum_steps": 2}})):
  metrics, state, spread = pmap_run(plain, **kwargs)
  (param_diff, param_frac), (opt_diff, _) = diffs(ref_state.params, state.params), diffs(ref_state.opt_state, state.opt_state)
  result[name] = {{"jit": ref_metrics, "pmap": metrics, "param_diff": param_diff, "param_frac_over_1e-5": param_frac,
                  "opt_diff": opt_diff, "step": int(state.step), "copies_spread": spread}}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def pmap_vs_jit():
  return run_json(["-c", SCRIPT.format(tests=TESTS)], cwd=TESTS)[0]


@pytest.mark.slow
def test_the_batch_is_uneven_over_devices(pmap_vs_jit):
  tokens = pmap_vs_jit["per_device_tokens"]
  assert tokens[0] == 0 and len(set(tokens)) > 4, tokens


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "accumulated"])
def test_pmap_steps_equal_jit_steps_on_8_devices(pmap_vs_jit, variant):
  """Two AdamW steps (clipping, weight decay) on the same 16-row global batch; `accumulated` is the
  pmapped step with grad_accum_steps=2 (one row per device and micro-batch) against the plain jit step."""
  result = pmap_vs_jit[variant]
  for step, (jit_metrics, pmap_metrics) in enumerate(zip(result["jit"], result["pmap"], strict=True)):
    for key in METRICS:
      np.testing.assert_allclose(pmap_metrics[key], jit_metrics[key], rtol=RTOL, err_msg=f"step {step}: {key}")
  assert result["step"] == 2
  assert result["copies_spread"] == 0.0  # every device applied the same update
  assert result["param_diff"] < ADAM_ATOL, result["param_diff"]
  assert result["param_frac_over_1e-5"] < 1e-3, result["param_frac_over_1e-5"]  # measured: 3e-5 at most
  assert result["opt_diff"] < 1e-6, result["opt_diff"]


def _pmap_config(**mesh):
  config = base_config()
  config.train.parallelism = "pmap"
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def test_pmap_is_data_parallel_only():
  assert config_problems(_pmap_config()) == []
  assert config_problems(_pmap_config(data=1, fsdp=-1)) == [
      "train.parallelism 'pmap' is data parallel only (a whole copy of the state on every device): it needs "
      "mesh.fsdp = mesh.tensor = 1, got fsdp=-1, tensor=1 (use 'jit' to shard the model)"
  ]
  assert len(config_problems(_pmap_config(data=-1, tensor=2))) == 1
  config = _pmap_config(data=1, fsdp=-1)
  config.train.parallelism = "jit"
  assert config_problems(config) == []


def test_parallelism_is_jit_or_pmap():
  config = base_config()
  config.train.parallelism = "pjit"
  assert config_problems(config) == ["train.parallelism: must be one of 'jit', 'pmap'; got 'pjit'"]


@pytest.mark.parametrize("devices, processes, bad_batch", [(4, 1, 6), (2, 3, 8)])
def test_the_batch_must_split_over_devices_and_micro_batches(monkeypatch, devices, processes, bad_batch):
  """This process has one device: the device and process counts the check reads are set here. A batch of 8
  on 2 devices x 3 processes fills the local devices but not all 6."""
  import jax

  from sft.trainer import setup, sharding

  monkeypatch.setattr(jax, "local_device_count", lambda: devices)
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  run = setup.RunSetup(None, None, sharding.make_mesh({"data": -1}), (("batch", "data"),), None, None, None)
  batch_size = 4 * devices * processes
  run.check_pmap_batch("train.batch_size", batch_size, 4)
  with pytest.raises(ConfigError, match=rf"\({batch_size}\) leaves 4 row\(s\) per device .* do not split into 3 micro-batches"):
    run.check_pmap_batch("train.batch_size", batch_size, 3)
  devices_message = rf"\({bad_batch}\) must divide by the number of devices .* \({devices} local device\(s\) x {processes} process\(es\)\)"
  with pytest.raises(ConfigError, match=devices_message):
    run.check_pmap_batch("train.batch_size", bad_batch)
  with pytest.raises(ConfigError, match="does not split over its 3 devices"):
    sharding.per_device_batch({"inputs": np.zeros((4, 2))}, 3)
  assert sharding.per_device_batch({"inputs": np.arange(8)[:, None]}, 2)["inputs"][:, :, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


WORKER = os.path.join(TESTS, "resume_worker.py")




def _train(workdir, data_dir, overrides, devices=2):
  """A tiny training run through the trainer (tests/resume_worker.py) in its own process; the runs of
  a workdir share compiled programs (the eval step, initialisation) through JAX's compilation cache."""
  env = fresh_env(JAX_COMPILATION_CACHE_DIR=str(workdir) + ".jit-cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, WORKER, str(workdir), str(data_dir), json.dumps(overrides), str(devices)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return proc.stdout + proc.stderr, rows


@pytest.mark.slow
def test_a_pmap_run_trains_and_saves_what_jit_mode_restores(tmp_path, data_dir):
  """2 devices, 2 micro-batches per device: the trainer runs, logs and evaluates in pmap mode and saves
  a checkpoint in the jit mode's format (one copy, no device axis), which a jit-mode run of the same
  workdir accepts and restores (it has no steps left to take: nothing more to compile)."""
  import orbax.checkpoint as ocp

  workdir = tmp_path / "run"
  small = {"train.sft_steps": 2, "train.grad_accum_steps": 2, "eval.every_steps": 2, "eval.num_generations": 0, "checkpoint.every_steps": 2}
  _, rows = _train(workdir, data_dir, {**small, "train.parallelism": "pmap"})
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert all(np.isfinite(r["train/loss"]) and r["train/loss_tokens"] > 0 for r in rows[1:])
  saved = ocp.PyTreeCheckpointer().metadata((workdir / "checkpoints" / "2" / "state").absolute()).item_metadata.tree
  assert saved["step"].shape == () and saved["params"]["embedding"].shape == (512, 32)  # no leading device axis
  assert saved["params"]["embedding"].sharding.axis_names == ["data", "fsdp", "tensor"]  # saved from the mesh, as jit saves
  log, _ = _train(workdir, data_dir, {**small, "train.parallelism": "jit"})
  assert "train.parallelism: \"pmap\" -> \"jit\"" in log and "resumed from" in log and "already trained for 2 steps" in log, log[-3000:]
