"""The code GPUs and TPUs run, run on CPU: with the CPU-tuned kernels switched off (sft.model.backend), the
forward pass, the train step's gradients and greedy decoding equal the CPU code's, for tied and untied
embeddings and LoRA; each setting traces the operations it names, and a jitted function called under the
other setting is traced again rather than served the first setting's code."""

import dataclasses

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_step import uneven_batch

from sft.errors import ConfigError
from sft.evaluator.generate import make_generate, pad_prompts
from sft.model import Transformer, backend, transformer
from sft.model.backend import cpu_kernels, use_cpu_kernels
from sft.trainer import sharding
from sft.trainer import step as step_lib
from sft.trainer.state import TrainState

ROWS, SEQ_LEN = 8, 32
# float32 throughout: the two paths differ in summation order only.
RTOL, ATOL = 1e-5, 1e-6
# An untied unembedding and LoRA on every projection together: each compile is seconds, and the LoRA
# model multiplies by its base weights as the plain model does.
VARIANTS = {"tied": {}, "untied_lora": {"tie_embeddings": False, "lora_rank": 2, "lora_targets": ("q", "k", "v", "o", "gate", "up", "down")}}
both_variants = pytest.mark.parametrize("variant", list(VARIANTS))


def _model(tiny_model_config, variant=None, **overrides):
  """(config, params): every parameter random (LoRA's B too, which starts at zero, so that the adapters
  add to every projection and get gradients of their own), without compiling the model's init."""
  cfg = dataclasses.replace(tiny_model_config, **VARIANTS.get(variant, {}), **overrides)
  dummy = jnp.zeros((1, SEQ_LEN), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy)["params"]))
  rng = np.random.default_rng(0)
  return cfg, jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)


def _batch():
  return {k: jnp.asarray(v) for k, v in uneven_batch(ROWS, SEQ_LEN).items()}


def _both_ways(fn):
  """fn() with the CPU-tuned kernels on, then off."""
  out = {}
  for enabled in (True, False):
    with cpu_kernels(enabled):
      out[enabled] = jax.device_get(fn())
  return out[True], out[False]


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@both_variants
def test_the_forward_pass_is_the_same_both_ways(tiny_model_config, variant):
  cfg, params = _model(tiny_model_config, variant)
  batch, apply = _batch(), jax.jit(Transformer(cfg).apply)
  cpu, accelerator = _both_ways(lambda: apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]))
  np.testing.assert_allclose(accelerator, cpu, rtol=RTOL, atol=1e-5)
  assert apply._cache_size() == 2  # one jitted function, traced under each setting


@pytest.mark.parametrize("variant", ["tied", pytest.param("untied_lora", marks=pytest.mark.slow)])
def test_the_train_step_is_traced_again_under_the_other_setting_and_its_gradients_agree(tiny_model_config, variant, monkeypatch):
  """The run's step builder (jit_train_step) with SGD at learning rate 1: params - new params are the
  gradients. Built once and called under each setting, it is traced twice, each trace taking its
  setting's unembedding (not the first compilation served twice), and the gradients agree."""
  decisions = []  # what the unembedding chose, at each trace of it

  def recorded():
    decisions.append(use_cpu_kernels())
    return decisions[-1]

  monkeypatch.setattr(transformer, "use_cpu_kernels", recorded)
  cfg, params = _model(tiny_model_config, variant)
  optimizer, batch = optax.sgd(1.0), _batch()
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  replicated = NamedSharding(sharding.make_mesh({"data": -1}, devices=jax.devices()[:1]), PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, state)
  step = step_lib.jit_train_step(Transformer(cfg).apply, optimizer, lambda _: 1.0, shardings, replicated, replicated)
  results, traced = {}, []
  for enabled in (True, False, True):
    decisions.clear()
    with cpu_kernels(enabled):
      new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)  # the step donates its state
      results[enabled] = jax.device_get((jax.tree.map(jnp.subtract, params, new_state.params), metrics))
      lowered = step.lower(state, batch).as_text()
    traced.append(list(decisions))
    assert ("optimization_barrier" in lowered) == enabled  # the CPU unembedding's backward pass
  # Traced under each setting with its own choice; back under the first, its trace and compilation reused.
  assert traced == [[True], [False], []], traced
  assert step._cache_size() == 2
  (cpu_grads, cpu_metrics), (accelerator_grads, accelerator_metrics) = results[True], results[False]
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(accelerator_metrics[key], cpu_metrics[key], rtol=RTOL, err_msg=key)
  if cfg.lora_rank:  # the adapters learn on both paths
    assert np.abs(accelerator_grads["layers"]["mlp"]["down_lora_a"]).max() > 1e-4
  _assert_trees_close(accelerator_grads, cpu_grads)


@both_variants
def test_greedy_decoding_is_the_same_both_ways(tiny_model_config, tokenizer, variant):
  cfg, params = _model(tiny_model_config, variant)
  prompts = [tokenizer.encode(text) for text in ("def dumps(obj):", "Split the string", "Return a copy of s.")]
  tokens, lengths = pad_prompts(prompts, tokenizer.pad_id)
  generate = make_generate(Transformer(cfg), max_new_tokens=8, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  cpu_ids, accelerator_ids = _both_ways(lambda: generate(params, tokens, lengths, jax.random.key(0)))
  assert accelerator_ids.tolist() == cpu_ids.tolist()
  assert generate._cache_size() == 2
  assert len({tuple(row) for row in cpu_ids.tolist()}) > 1  # rows that differ: the prompts reached the answers


def _eqns(jaxpr, inside=()):
  """(the names of the primitives an equation sits in, the equation) for a jaxpr and every jaxpr nested in it."""
  for eqn in jaxpr.eqns:
    yield inside, eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _eqns(getattr(inner, "jaxpr", inner), (*inside, eqn.primitive.name))


def _count(jaxpr, primitive):
  return sum(eqn.primitive.name == primitive for _, eqn in _eqns(jaxpr))


def _projections(jaxpr, vocab_size, inside=None):
  """The (lhs rank, rhs rank) of every weight product (a dot_general without batch axes) but the
  unembedding's, optionally only those nested in a `inside` primitive."""
  return [
      (eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim)
      for where, eqn in _eqns(jaxpr)
      if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1] == ((), ())
      and vocab_size not in eqn.invars[1].aval.shape and (inside is None or inside in where)
  ]


def test_each_setting_traces_the_operations_it_names(tiny_model_config):
  """On: every projection one 2-D (tokens, in) @ (in, out) product, the unembedding the custom-VJP
  product whose backward pass holds a barrier. Off: einsums over (B, T, in) activations (the attention
  output's two contracted axes merged: a 2-D weight), a plain unembedding, no barrier."""
  cfg, params = _model(tiny_model_config)
  model, batch = Transformer(cfg), _batch()

  def loss(p):
    return jnp.sum(model.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"]) ** 2)

  for enabled in (True, False):
    with cpu_kernels(enabled):
      forward = jax.make_jaxpr(loss)(params).jaxpr
      backward = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    projections = _projections(forward, cfg.vocab_size)
    assert len(projections) == 7, projections  # q, k, v, o, gate, up, down (one scanned layer)
    if enabled:
      assert set(projections) == {(2, 2)}, projections
    else:
      assert {lhs for lhs, _ in projections} == {3} and projections[3] == (3, 2), projections  # o: (N*H, D)
    assert _count(forward, "custom_vjp_call") == int(enabled)
    assert _count(backward, "optimization_barrier") == int(enabled)


def test_decoding_multiplies_by_out_in_copies_only_with_the_cpu_kernels(tiny_model_config):
  """On: one barrier over the (out, in) weight copies before the token loop, whose projections are
  2-D products of a few rows. Off: no copies, the loop multiplies (B, 1, in) by the weights themselves."""
  cfg, params = _model(tiny_model_config, tie_embeddings=False)  # the unembedding copied (out, in) too
  tokens, lengths = pad_prompts([[5, 6, 7], [8, 9]], pad_id=0)
  generate = make_generate(Transformer(cfg), max_new_tokens=4, stop_ids=(), pad_id=0)
  for enabled in (True, False):
    with cpu_kernels(enabled):
      jaxpr = jax.make_jaxpr(generate)(params, tokens, lengths, jax.random.key(0)).jaxpr
    in_loop = _projections(jaxpr, cfg.vocab_size, inside="while")
    assert len(in_loop) == 7 * cfg.num_layers, in_loop  # per-layer decoding: every layer traced
    assert {lhs for lhs, _ in in_loop} == ({2} if enabled else {3}), in_loop
    assert _count(jaxpr, "optimization_barrier") == int(enabled)


@pytest.fixture
def env_default(monkeypatch):
  """Sets SFT_CPU_KERNELS and forgets the process default read from it, before and after the test."""
  def set_env(value):
    monkeypatch.setenv(backend.ENV, value)
    backend._default.cache_clear()

  yield set_env
  monkeypatch.undo()
  backend._default.cache_clear()


def test_the_default_follows_the_backend_then_the_environment_and_a_context_overrides_both(env_default):
  env_default("")
  assert use_cpu_kernels() == (jax.default_backend() == "cpu")
  for value, enabled in (("0", False), ("1", True)):
    env_default(value)
    assert use_cpu_kernels() is enabled
    with cpu_kernels(not enabled):
      assert use_cpu_kernels() is not enabled
      with cpu_kernels(None):
        assert use_cpu_kernels() is enabled
    assert use_cpu_kernels() is enabled
  with pytest.raises(TypeError, match="True, False or None"):
    cpu_kernels("0")  # a truthy string would silently mean the opposite


@hypothesis.settings(max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(value=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1))
def test_a_bad_environment_value_is_a_clear_error(env_default, value):
  hypothesis.assume(value not in ("0", "1"))
  env_default(value)
  with pytest.raises(ConfigError, match=rf"^{backend.ENV}=.*: set it to 1 .*, 0 .* or unset it$") as err:
    use_cpu_kernels()
  assert repr(value) in str(err.value)
