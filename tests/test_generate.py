"""Generation's prefill: only each row's last prompt token is unembedded, with the same tokens as the
model's own full forward pass; the KV cache carries a sharding constraint that is a no-op without a mesh;
a decoding step moves no cache or weight bytes around, and on CPU multiplies by (out, in) copies of the
weights that give the same logits."""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh

from sft.evaluator.generate import (
    constrain_cache,
    decode,
    decode_copies,
    make_generate,
    make_greedy_generate,
    pad_prompts,
    prefill,
    prefill_into,
    strip_generation,
)
from sft.model import ModelConfig, Transformer
from sft.model.backend import use_cpu_kernels
from sft.model.layers import OUT_IN
from sft.model.transformer import init_cache, split_cache, split_layers, weights_out_in

# Each test also runs with the code GPUs and TPUs run (tests/conftest.py), in the full suite.
pytestmark = pytest.mark.both_kernel_paths

# A vocabulary much wider than anything else, so that a (B, P, V) array is the largest one by far.
CFG = ModelConfig(vocab_size=512, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, tie_embeddings=False)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]  # uneven: rows end at different slots


def _params(cfg=CFG):
  dummy = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(Transformer(cfg).init(jax.random.key(3), dummy, dummy, dummy)["params"])


@pytest.mark.slow
def test_greedy_tokens_equal_the_full_forward_pass_on_uneven_prompts():
  model, params, new = Transformer(CFG), _params(), 6
  tokens, lengths = pad_prompts(PROMPTS, pad_id=0)
  generated = np.asarray(make_greedy_generate(model, max_new_tokens=new, stop_id=-1, pad_id=0)(params, tokens, lengths))
  # Reference: every position's logits over prompt + generated tokens, right-padded, causal.
  width = max(map(len, PROMPTS)) + new
  full = np.asarray([p + list(g) + [0] * (width - len(p) - new) for p, g in zip(PROMPTS, generated)], np.int32)
  logits_btv = jax.jit(model.apply)({"params": params}, full, np.broadcast_to(np.arange(width), full.shape), np.ones_like(full))
  for row, prompt in enumerate(PROMPTS):
    greedy = np.argmax(logits_btv[row, len(prompt) - 1 : len(prompt) - 1 + new], axis=-1)
    assert greedy.tolist() == generated[row].tolist(), row
  # And the prefill's logits are those of the full pass at each row's last prompt token.
  logits_bv, _ = prefill(model, params, tokens, lengths, init_cache(CFG, len(PROMPTS), width))
  np.testing.assert_allclose(logits_bv, logits_btv[np.arange(len(PROMPTS)), lengths - 1], rtol=1e-5, atol=1e-5)


def _shapes(jaxpr):
  """Every variable's shape in a jaxpr and the jaxprs nested in it (scan, while, pjit bodies)."""
  for eqn in jaxpr.eqns:
    for var in [*eqn.invars, *eqn.outvars]:
      if hasattr(var, "aval") and hasattr(var.aval, "shape"):
        yield tuple(var.aval.shape)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _shapes(getattr(inner, "jaxpr", inner))


@pytest.mark.slow
def test_prefill_never_makes_logits_for_every_prompt_position():
  model, params = Transformer(CFG), _params()
  tokens, lengths = pad_prompts(PROMPTS, pad_id=0)
  batch, prompt_len = tokens.shape
  cache = init_cache(CFG, batch, prompt_len + 4)
  closed = jax.make_jaxpr(lambda p, t, n, c: prefill(model, p, t, n, c))(params, tokens, lengths, cache)
  shapes = set(_shapes(closed.jaxpr))
  assert (batch, 1, CFG.vocab_size) in shapes  # the last token's logits are made...
  assert not [s for s in shapes if CFG.vocab_size in s and prompt_len in s]  # ...and no logits over the prompt
  # The compiled prefill holds no (B, P, V) buffer either.
  compiled = jax.jit(lambda p, t, n, c: prefill(model, p, t, n, c)).lower(params, tokens, lengths, cache).compile()
  assert f"f32[{batch},{prompt_len},{CFG.vocab_size}]" not in compiled.as_text()


def test_the_cache_constraint_follows_the_rules_and_is_a_no_op_without_a_mesh():
  cache = init_cache(CFG, 2, 8)
  for x, y in zip(constrain_cache(cache), cache):
    assert x is y  # no mesh, no rules: the arrays themselves
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  rules = (("batch", "data"), ("layers", None), ("length", None), ("kv_heads", None), ("head_dim", None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    text = jax.jit(constrain_cache).lower(cache).as_text()
  assert text.count("sharding_constraint") + text.count("@Sharding") >= 2, text[:2000]


def _while_bodies(hlo: str) -> dict[str, str]:
  """{op_name of each while loop: its body computation's text} in compiled HLO text."""
  computations = {}
  for block in hlo.split("\n\n"):
    head = re.match(r"\s*(ENTRY )?%(\S+) ", block)
    if head:
      computations[head.group(2)] = block
  return {op: computations[body] for body, op in re.findall(r"while\(.*?body=%(\S+?),.*?op_name=\"([^\"]+)\"", hlo)}


@pytest.mark.slow
def test_a_decoding_step_copies_neither_the_cache_nor_the_weights():
  """The token loop's compiled body holds no copy or transpose bigger than a token's activations: the
  cache is read in place (keys (B, K, H, S), values (B, K, S, H)) and no weight is re-laid out per token
  (before, every step transposed each layer's whole cache and its output projection)."""
  cfg = ModelConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, tie_embeddings=False)
  model, params = Transformer(cfg), _params(cfg)
  tokens, lengths = pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8]], pad_id=0)
  generate = make_generate(model, max_new_tokens=11, stop_ids=(), pad_id=0)
  bodies = _while_bodies(generate.lower(params, tokens, lengths, jax.random.key(0)).compile().as_text())
  (body,) = [text for op, text in bodies.items() if op.endswith("jit(generate)/while")]
  moved = []
  for name, dims, op in re.findall(r"%(\S+) = \w+\[([0-9,]*)\]\S* (\w+)\(", body):
    if op in ("copy", "transpose") or name.startswith(("copy", "transpose")):
      moved.append((name, math.prod(int(d) for d in dims.split(",") if d)))
  largest_activation = 2 * cfg.num_heads * cfg.head_dim  # a token's queries, B x N x H
  assert [m for m in moved if m[1] > largest_activation] == [], moved


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {"qkv_bias": True, "qk_norm": True},
        {"mlp_gated": False, "linear_bias": True, "norm_type": "layer", "position_embedding": "learned", "mlp_activation": "gelu_tanh"},
        {"lora_rank": 2, "lora_targets": ("q", "o", "up", "down")},
    ],
    ids=["llama", "tied", "qwen", "gpt2", "lora"],
)
def test_a_decoding_step_on_out_in_copies_equals_one_on_the_weights(overrides):
  """weights_out_in's copies give the same logits and cache as the parameters, for every kind of
  projection (q/k/v/o, gated or plain MLP, biases, LoRA) and an untied unembedding; and they are what
  the step multiplies by: zeroing them changes the logits."""
  cfg = dataclasses.replace(CFG, **overrides)
  model, layer_params = Transformer(cfg), split_layers(_params(cfg))
  if cfg.lora_rank:  # B starts at zero: give the LoRA path something to add
    layer_params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(path) else x, layer_params
    )
  copies = weights_out_in(layer_params)
  tokens_b1, slot_b = np.asarray([[3], [9]], np.int32), np.asarray([2, 5], np.int32)
  cache = split_cache(init_cache(cfg, 2, 8))
  step = jax.jit(lambda variables: model.apply(variables, tokens_b1, slot_b[:, None], cache=cache, cache_index_b=slot_b))
  logits_ref, cache_ref = step({"params": layer_params})
  logits, cache_out = step({"params": layer_params, OUT_IN: copies})
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=5e-5)  # float32 summation order
  for got, want in zip(jax.tree.leaves(cache_out), jax.tree.leaves(cache_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
  assert ("unembed" in copies) == (not cfg.tie_embeddings)
  zeroed, _ = step({"params": layer_params, OUT_IN: jax.tree.map(jnp.zeros_like, copies)})
  assert not np.allclose(zeroed, logits_ref, atol=1e-3)


@pytest.mark.slow
@pytest.mark.cpu_kernels_only
def test_the_token_loop_multiplies_by_weights_stored_out_in_on_cpu():
  """Every projection in the compiled token loop contracts its weight's minor axis (an (out, in)
  copy): without the barrier in generate, XLA cancels the copies' transposes and multiplies by the
  (in, out) weights again, ~1.5x slower on CPU at a few rows."""
  model, params = Transformer(CFG), _params()
  tokens, lengths = pad_prompts(PROMPTS, pad_id=0)
  generate = make_generate(model, max_new_tokens=5, stop_ids=(), pad_id=0)
  for copies in (None, decode_copies(params)):  # made in the call, or once and passed in
    hlo = generate.lower(params, tokens, lengths, jax.random.key(0), copies).compile().as_text()
    projections = re.findall(
        r"dot\(%\S+, %\S+\), lhs_contracting_dims=\{1\}, rhs_contracting_dims=\{(\d)\}, metadata=\{op_name=\"jit\(generate\)/while/body/", hlo
    )
    assert len(projections) == 7 * CFG.num_layers + 1, projections  # q, k, v, o, gate, up, down per layer; the unembedding
    assert set(projections) == {"1"}, projections


def test_copies_made_once_answer_as_the_copies_each_call_makes():
  """decode_copies(params), passed to many calls, gives every call's tokens bit for bit, and is what the
  loop multiplies by (zeroed copies change the answers); the accelerators' code takes none."""
  model, params, key = Transformer(CFG), _params(), jax.random.key(0)
  tokens, lengths = pad_prompts(PROMPTS, pad_id=0)
  generate = make_generate(model, max_new_tokens=6, stop_ids=(), pad_id=0)
  copies = decode_copies(params)
  assert bool(copies) == use_cpu_kernels()
  per_call = np.asarray(generate(params, tokens, lengths, key))
  np.testing.assert_array_equal(generate(params, tokens, lengths, key, copies), per_call)
  if copies:
    zeroed = jax.tree.map(jnp.zeros_like, copies)
    assert not np.array_equal(generate(params, tokens, lengths, key, zeroed), per_call)


def _prefilled_in_groups(model, params, new):
  """PROMPTS prefilled into a 4-row batch (room 8 + new) by prefill_into, a group at a time at each
  group's own width, into rows out of order: prompt 0 to row 2 (a group of 2 naming it twice), prompts
  1 and 2 to rows 0 and 1; row 3 is left empty. Returns (logits, cache, lengths, where each prompt went)."""
  fill = jax.jit(functools.partial(prefill_into, model=model), donate_argnums=(1, 2))
  cache, logits_bv = init_cache(CFG, 4, 8 + new), jnp.zeros((4, CFG.vocab_size), jnp.float32)
  for group, rows in (([PROMPTS[1], PROMPTS[2]], [0, 1]), ([PROMPTS[0], PROMPTS[0]], [2, 2])):
    tokens_rw, lengths_r = pad_prompts(group, pad_id=0)
    cache, logits_bv = fill(params, cache, logits_bv, tokens_rw, lengths_r, np.asarray(rows, np.int32))
  return logits_bv, cache, np.asarray([2, 4, 7, 1], np.int32), [2, 0, 1]


def test_prompts_prefilled_a_group_at_a_time_answer_as_one_batch():
  """decode over a batch that prefill_into filled group by group gives generate's answers for the same
  prompts; a row that is not live (empty) never holds the loop."""
  model, params, new, key = Transformer(CFG), _params(), 6, jax.random.key(0)
  tokens, lengths = pad_prompts(PROMPTS, pad_id=0)
  want = np.asarray(make_generate(model, max_new_tokens=new, stop_ids=(), pad_id=0)(params, tokens, lengths, key))
  logits_bv, cache, lengths_b, rows = _prefilled_in_groups(model, params, new)
  live_b = np.asarray([True, True, True, False])
  answer = functools.partial(decode, model=model, max_new_tokens=new, pad_id=0)
  got = np.asarray(jax.jit(functools.partial(answer, stop_ids=()))(params, logits_bv, cache, lengths_b, key, None, live_b))
  np.testing.assert_array_equal(got[rows], want)
  assert len({tuple(r) for r in want}) == len(want)  # distinct answers: a row mix-up would show
  # Every live row stops at its first token: the loop ends there, whatever the empty row would draw.
  stops = tuple(int(t) for t in want[:, 0])
  first_only = jax.jit(functools.partial(answer, stop_ids=stops))
  ended = np.asarray(first_only(params, logits_bv, cache, lengths_b, key, None, live_b))
  assert (ended[:, 1:] == 0).all()
  held = np.asarray(first_only(params, logits_bv, cache, lengths_b, key, None, None))  # the empty row counted
  assert int(held[3, 0]) not in stops and (held[3, 1:] != 0).any()


@given(st.lists(st.integers(0, 9), max_size=20), st.sets(st.integers(0, 9), max_size=3))
def test_an_answer_is_every_id_before_its_first_stop_pad_ids_included(ids, stops):
  """Decoding pads only after a row's stop, so an id equal to the pad id before it is the model's own
  (id 0 is "!" in GPT-2-style vocabularies, and the pad of a tokenizer that names none)."""
  first = next((i for i, t in enumerate(ids) if t in stops), len(ids))
  assert strip_generation(np.asarray(ids, np.int32), tuple(stops)) == ids[:first]
  assert strip_generation([5, 0, 7, 2, 0, 0], 2) == [5, 0, 7]
