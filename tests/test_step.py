"""The train step's scale options: gradient accumulation equals one big step, the chunked loss equals the
full one and holds less memory, and a run compiles its step once.

Compiling is most of this file's time: tests of the same step and shapes share one compiled step
(`shared_step`, a fresh copy of its initial state for each), and the one-step SGD reference is computed once."""

import functools
import os

import flax.linen as nn
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fresh_process import run_json

from sft.config import base_config
from sft.config_check import config_problems
from sft.errors import ConfigError
from sft.model import ModelConfig, Transformer
from sft.pipeline import train_dataset
from sft.trainer import setup, sharding
from sft.trainer import state as state_lib
from sft.trainer import step as step_lib
from sft.trainer.loss import cross_entropy, loss_fn
from sft.trainer.state import TrainState

ROWS, SEQ_LEN = 8, 32
# float32 throughout; the sums only change order (micro-batches, chunks), so differences are rounding.
RTOL, ATOL = 1e-5, 1e-6


def uneven_batch(rows=ROWS, seq_len=SEQ_LEN, vocab=512, seed=0):
  """Packed rows whose response-token counts differ a lot from row to row (row r keeps ~r/rows of its
  tokens), so micro-batches and chunks hold uneven counts and a mean of means would differ."""
  rng = np.random.default_rng(seed)
  segment_ids = np.repeat(np.array([[1] * (seq_len // 2) + [2] * (seq_len // 4) + [0] * (seq_len // 4)]), rows, 0)
  positions = np.concatenate([np.arange(seq_len // 2), np.arange(seq_len // 4), np.zeros(seq_len // 4)])
  keep_bt = rng.random((rows, seq_len)) < (np.arange(rows)[:, None] + 1) / rows
  keep_bt[0] = False  # one row with no response tokens at all
  return {
      "inputs": rng.integers(4, vocab, (rows, seq_len)).astype(np.int32),
      "targets": rng.integers(4, vocab, (rows, seq_len)).astype(np.int32),
      "loss_mask": (keep_bt & (segment_ids > 0)).astype(np.int32),
      "segment_ids": segment_ids.astype(np.int32),
      "positions": np.repeat(positions[None], rows, 0).astype(np.int32),
  }


@functools.cache
def init_params(cfg, seq_len=SEQ_LEN):
  """The initial parameters, compiled (op by op, a scanned model's init takes seconds) and kept for every test."""
  dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
  return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), *dummy)["params"])


def sgd_step(cfg, batch, **step_kwargs):
  """(metrics, gradients) of one step: with SGD at learning rate 1, params - new params."""
  model, optimizer = Transformer(cfg), optax.sgd(1.0)
  params = init_params(cfg)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  new_state, metrics = jax.jit(
      lambda s, b: step_lib.train_step(s, b, apply_fn=model.apply, optimizer=optimizer, schedule=lambda _: 1.0, **step_kwargs)
  )(state, {k: jnp.asarray(v) for k, v in batch.items()})
  return metrics, jax.tree.map(jnp.subtract, params, new_state.params)


@functools.cache
def sgd_one_step(cfg):
  """`sgd_step` on the whole of `uneven_batch()`, no accumulation: the reference, computed once."""
  return jax.device_get(sgd_step(cfg, uneven_batch()))


BATCH_RULES = (("batch", ("data", "fsdp")),)


def make_step(cfg, *, seq_len=SEQ_LEN, mesh_shape=None, rules=BATCH_RULES, devices=None, train=False, **step_kwargs):
  """(state, jitted step, batch sharding, mesh): AdamW with clipping, built as a run builds them."""
  mesh = sharding.make_mesh(mesh_shape or {"data": -1}, devices=devices)
  rules = sharding.logical_rules(rules, mesh)
  model = Transformer(cfg, train=train)
  schedule = state_lib.phase_schedule(3e-3, 10, 2, 0.1)
  optimizer = state_lib.make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
  dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
  _, shardings = state_lib.state_shardings(model, optimizer, dummy, mesh, rules)
  state = state_lib.create_train_state(model, optimizer, dummy, shardings, jax.random.key(0))
  stepper = step_lib.build_train_step(model.apply, optimizer, schedule, shardings, mesh, rules, **step_kwargs)
  return state, stepper.jitted, sharding.batch_sharding(mesh, rules), mesh


@functools.cache
def _shared(cfg, step_kwargs):
  state, step, batch_sharding, mesh = make_step(cfg, devices=jax.devices()[:1], train=True, **dict(step_kwargs))
  context = lambda: step_lib.mesh_context(mesh, sharding.logical_rules(BATCH_RULES, mesh))  # noqa: E731
  return jax.device_get(state), jax.tree.map(lambda x: x.sharding, state), step, batch_sharding, context


def shared_step(cfg, **step_kwargs):
  """`make_step` on one device with the run's train=True model, compiled once per config and options for the
  whole module: (a fresh copy of the initial state, the step, batch sharding, () -> the mesh context a run
  steps in). Tests that share a step give it the same shapes in the same context: one compiled program."""
  host_state, shardings, step, batch_sharding, context = _shared(cfg, tuple(sorted(step_kwargs.items())))
  return jax.device_put(host_state, shardings), step, batch_sharding, context


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


METRICS = ("loss", "accuracy", "loss_tokens", "tokens", "grad_norm", "param_norm")
ACCUMULATED = {"grad_accum_steps": 4, "loss_chunk_size": 12}  # micro-batches of 2 rows; chunks that do not divide T


@pytest.mark.slow  # three compiled steps; the fast tier has the AdamW equivalence below
@pytest.mark.parametrize("grad_accum_steps", [2, 4])
def test_k_micro_batches_equal_one_step_of_k_times_the_rows(tiny_model_config, grad_accum_steps):
  batch = uneven_batch()
  micro_tokens = [batch["loss_mask"][i::grad_accum_steps].sum() for i in range(grad_accum_steps)]
  assert len(set(micro_tokens)) == grad_accum_steps  # uneven: a mean of micro-batch means would differ
  one_metrics, one_grads = sgd_one_step(tiny_model_config)
  acc_metrics, acc_grads = sgd_step(tiny_model_config, batch, grad_accum_steps=grad_accum_steps)
  for key in METRICS:
    np.testing.assert_allclose(float(acc_metrics[key]), float(one_metrics[key]), rtol=RTOL, err_msg=key)
  assert float(acc_metrics["loss_tokens"]) == batch["loss_mask"].sum()
  assert_trees_close(acc_grads, one_grads)


def test_accumulation_with_the_real_optimizer_and_chunked_loss_matches(tiny_model_config):
  """Through jit_train_step (AdamW, clipping, donation): parameters after two steps agree."""
  batch = uneven_batch()

  def run(**kwargs):
    state, step, batch_sharding, context = shared_step(tiny_model_config, **kwargs)
    with context():
      for _ in range(2):
        state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
    return jax.device_get(metrics), jax.device_get(state.params)

  one_metrics, one_params = run()
  acc_metrics, acc_params = run(**ACCUMULATED)
  for key in METRICS:
    np.testing.assert_allclose(acc_metrics[key], one_metrics[key], rtol=RTOL, err_msg=key)
  # Adam divides each gradient by its own scale: a rounding-level difference in a near-zero gradient
  # moves that weight by a visible fraction of lr (3e-3). Observed: 1e-5 at most.
  assert_trees_close(acc_params, one_params, atol=3e-5)


def test_micro_batches_take_every_kth_row():
  batch = {"inputs": jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)}
  micro = step_lib.split_micro_batches(batch, 2)["inputs"]
  assert micro.shape == (2, 4, 3)
  assert micro[:, :, 0].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


@functools.cache
def loss_and_grads(cfg, chunk_size):
  """The loss, its sums and its gradients on `uneven_batch()` at the initial parameters (cached: the full
  loss is the reference of several chunk sizes)."""
  model, params = Transformer(cfg), init_params(cfg)
  batch = {k: jnp.asarray(v) for k, v in uneven_batch().items()}
  grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, model.apply, chunk_size=chunk_size), has_aux=True))
  return jax.device_get(grad_fn(params))


# Chunks that divide T=32, that do not (the last one padded), longer than T; tied and untied (soft-capped) unembeddings.
@pytest.mark.slow  # five compiled gradients; the fast tier's AdamW equivalence has a chunked loss too
@pytest.mark.parametrize("chunk_size, tie", [(8, True), (12, False), (100, True)])
def test_chunked_loss_equals_the_full_loss_and_gradients(tiny_model_config, chunk_size, tie):
  import dataclasses

  cfg = dataclasses.replace(tiny_model_config, tie_embeddings=tie, final_logit_softcap=0.0 if tie else 5.0)
  (full_loss, full_sums), full_grads = loss_and_grads(cfg, 0)
  (loss, sums), grads = loss_and_grads(cfg, chunk_size)
  np.testing.assert_allclose(float(loss), float(full_loss), rtol=RTOL)
  for key in full_sums:
    np.testing.assert_allclose(float(sums[key]), float(full_sums[key]), rtol=RTOL, err_msg=key)
  assert_trees_close(grads, full_grads)


@pytest.mark.slow  # two compiles of a 128k-vocabulary model
def test_chunked_loss_never_holds_the_full_logits():
  """128k vocabulary, T=256: the compiled gradient's scratch memory, full vs 32-token chunks."""
  cfg = ModelConfig(vocab_size=128_000, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  model, rows, seq_len = Transformer(cfg), 2, 256
  dummy = (jnp.zeros((1, seq_len), jnp.int32),) * 3
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *dummy)["params"]))
  batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}

  def temp_bytes(chunk_size):
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, model.apply, chunk_size=chunk_size)[0]))
    return grad_fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(0), temp_bytes(32)
  logits_bytes = rows * seq_len * cfg.vocab_size * 4
  assert full >= logits_bytes  # the (B, T, V) float32 logits, at least once
  assert chunked < 0.25 * full, (chunked, full)  # measured: 76.6 MB vs 527 MB


def test_the_unembedding_accumulates_in_float32(tiny_model_config):
  """bf16 activations and weights, float32 logits that were never rounded to bf16."""
  import dataclasses

  cfg = dataclasses.replace(tiny_model_config, dtype="bfloat16")
  model, params = Transformer(cfg), init_params(cfg)
  tokens = jnp.arange(SEQ_LEN)[None] % cfg.vocab_size

  @jax.jit  # as a step runs the model (and one compile, not thousands of op-by-op dispatches)
  def logits_and_hidden(params):
    args = ({"params": params}, tokens, tokens, jnp.ones_like(tokens))
    return model.apply(*args), model.apply(*args, return_hidden=True)

  logits_btv, x_btd = logits_and_hidden(params)
  exact_btv = jnp.einsum("BTD,VD->BTV", x_btd.astype(jnp.float32), params["embedding"].astype(jnp.bfloat16).astype(jnp.float32))
  assert logits_btv.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits_btv), np.asarray(exact_btv), rtol=1e-5, atol=1e-6)
  assert not np.array_equal(np.asarray(logits_btv), np.asarray(logits_btv.astype(jnp.bfloat16).astype(jnp.float32)))


@hypothesis.settings(max_examples=40, deadline=None)  # the first example compiles
@hypothesis.given(
    logits=hnp.arrays(np.float32, (3, 5, 7), elements=st.floats(-60, 60, width=32)),
    targets=hnp.arrays(np.int32, (3, 5), elements=st.integers(0, 6)),
)
def test_cross_entropy_equals_optax_and_so_does_its_gradient(logits, targets):
  ours, ref, ours_grad, ref_grad = cross_entropies(logits, targets)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-6, atol=1e-6)


@jax.jit
def cross_entropies(logits, targets):
  """(ours, optax's, and the gradients of their weighted sums): compiled once for every example, as a step runs them."""
  ours = lambda x: jnp.sum(cross_entropy(x, targets) * jnp.arange(15.0).reshape(3, 5))  # noqa: E731
  ref = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * jnp.arange(15.0).reshape(3, 5))  # noqa: E731
  values = cross_entropy(logits, targets), optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return *values, jax.grad(ours)(logits), jax.grad(ref)(logits)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_unembedding_gradient_equals_autodiff(tiny_model_config, tie, dtype):
  """The unembedding's hand-written backward pass (a transposed copy of the hidden states) gives the
  gradients plain autodiff of the same product gives, for the hidden states and the table."""
  import dataclasses

  from sft.model.transformer import _spec, unembed_logits

  cfg = dataclasses.replace(tiny_model_config, tie_embeddings=tie, dtype=dtype)
  rng = np.random.default_rng(0)
  shape = (cfg.vocab_size, cfg.d_model) if tie else (cfg.d_model, cfg.vocab_size)
  x_btd = jnp.asarray(rng.normal(size=(2, 5, cfg.d_model)), cfg.compute_dtype)
  table = jnp.asarray(rng.normal(size=shape), jnp.float32)
  weights_btv = jnp.asarray(rng.normal(size=(2, 5, cfg.vocab_size)), jnp.float32)

  def autodiff(x, t):
    return jnp.einsum(_spec(tie), x, t.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)

  ours = jax.grad(lambda x, t: jnp.sum(unembed_logits(x, t, cfg) * weights_btv), argnums=(0, 1))(x_btd, table)
  ref = jax.grad(lambda x, t: jnp.sum(autodiff(x, t) * weights_btv), argnums=(0, 1))(x_btd, table)
  tol = 1e-5 if dtype == "float32" else 1e-2
  for a, b in zip(ours, ref):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("scan_layers", [pytest.param(False, marks=pytest.mark.slow), True])  # True: the shared step
def test_the_train_step_writes_no_activation_transposed(tiny_model_config, scan_layers):
  """On CPU every projection is one 2-D product (sft.model.layers._contract), and the compiled step
  writes no (features, tokens) copy of an activation or its gradient but the unembedding's transposed
  hidden states (its hand-written backward). With 3-D einsums, XLA wrote the MLP's and attention's
  gradients that way from inside elementwise fusions, at a tenth of memory speed."""
  import dataclasses
  import re

  cfg = dataclasses.replace(tiny_model_config, scan_layers=scan_layers)
  state, step, batch_sharding, context = shared_step(cfg)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in uneven_batch().items()}, batch_sharding)
  with context():
    hlo = step.lower(state, batch).compile().as_text()
  hlo = re.sub(r"\n%fused[^\n]*\{\n.*?\n\}\n", "\n", hlo, flags=re.S)  # the ops XLA runs, not those inside fusions
  widths = {cfg.d_model, cfg.mlp_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim}
  transposed = [
      (name, int(width))
      for name, width in re.findall(rf"%(\S+) = f32\[(\d+),{ROWS * SEQ_LEN}\]\{{1,0\}} (?:fusion|copy|transpose)\(", hlo)
      if ("copy" in name or "transpose" in name) and int(width) in widths
  ]
  assert len(transposed) <= 1 and all(width == cfg.d_model for _, width in transposed), transposed


@pytest.mark.parametrize("kwargs", [{}, ACCUMULATED])
def test_a_run_compiles_its_train_step_once(tiny_model_config, tokenizer, chat_records, kwargs):
  """The pipeline's batches, a host read between steps: one compiled program (the step is shared with the
  tests above, which give it the same shapes)."""
  state, step, batch_sharding, context = shared_step(tiny_model_config, **kwargs)
  batches = iter(train_dataset(chat_records, tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=ROWS, seed=0))
  with context():
    for _ in range(3):
      state, metrics = step(state, sharding.global_batch(next(batches), batch_sharding))
      float(metrics["loss"])  # a host read between steps, as the loop's log lines do
  assert int(state.step) == 3
  assert step._cache_size() == 1


def test_grad_accum_steps_must_divide_the_batch():
  config = base_config()
  config.train.batch_size, config.train.grad_accum_steps = 16, 3
  assert config_problems(config) == ["train.grad_accum_steps (3) must divide train.batch_size (16)"]
  config.train.grad_accum_steps, config.train.loss_chunk_size = 0, -1
  assert config_problems(config) == ["train.grad_accum_steps: must be >= 1, got 0", "train.loss_chunk_size: must be >= 0, got -1"]


def test_micro_batches_must_split_over_the_batch_shards(monkeypatch):
  """Two batch shards (patched: this machine may have one device): 8 rows in 4 micro-batches give each shard
  one row of each; in 8 micro-batches of one row, a shard would get half a row."""
  monkeypatch.setattr(sharding, "batch_shards", lambda mesh, rules: 2)
  run = setup.RunSetup(None, None, sharding.make_mesh({"data": -1}), (("batch", "data"),), None, None, None)
  run.check_batch("train.batch_size", 8, 4)
  with pytest.raises(ConfigError, match="split into 8 micro-batches"):
    run.check_batch("train.batch_size", 8, 8)


MULTIDEVICE = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import json, sys
sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
import jax, numpy as np
from test_step import make_step, uneven_batch
from sft.config import base_config
from sft.model import ModelConfig
from sft.trainer import sharding

cfg = ModelConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
batch = uneven_batch(rows=16)
MOVES = ("all-to-all", "collective-permute")

def run(**kwargs):
  state, step, batch_sharding, mesh = make_step(cfg, **kwargs)
  with jax.set_mesh(mesh):
    placed = sharding.global_batch(batch, batch_sharding)
    hlo = step.lower(state, placed).compile().as_text()
    state, metrics = step(state, placed)
  moves = {{op: hlo.count(f" {{op}}(") + hlo.count(f" {{op}}-start(") for op in MOVES}}
  return {{"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]), "moves": moves}}, jax.device_get(state.params)

one, params_one = run(devices=jax.devices()[:1])
mesh = dict(mesh_shape={{"data": 2, "fsdp": 2, "tensor": 2}}, rules=tuple(base_config().sharding_rules))
sharded, _ = run(**mesh)
accumulated, params_acc = run(**mesh, grad_accum_steps=4)
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_acc)))
print(json.dumps({{"one": one, "sharded": sharded, "accumulated": accumulated, "max_param_diff": diff}}))
"""


@pytest.mark.slow  # a fresh process compiling three steps for 8 devices
def test_accumulation_on_8_devices_moves_no_rows_and_matches_one_device():
  """data 2 x fsdp 2 x tensor 2, 16 rows in 4 micro-batches of one row per batch shard: the same update
  as one device's, and no more all-to-alls or permutes (rows moving between devices) than the step
  without accumulation (the tensor-parallel model has a few of its own), nor a full rematerialisation."""
  tests = os.path.dirname(os.path.abspath(__file__))
  result, proc = run_json(["-c", MULTIDEVICE.format(tests=tests)], cwd=tests)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(result["accumulated"][key], result["one"][key], rtol=RTOL, err_msg=key)
  assert result["max_param_diff"] < 3e-5  # Adam's per-weight scaling, as in the one-device test
  assert result["accumulated"]["moves"] == result["sharded"]["moves"]
  assert "Involuntary full rematerialization" not in proc.stderr
