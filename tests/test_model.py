"""The model: packing is exact, attention is causal and segment-aware, KV-cache decoding is exact."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft.evaluator.generate import make_greedy_generate, pad_prompts
from sft.model import ModelConfig, Transformer, apply_rope, attention_mask, decode_mask
from sft.trainer.step import loss_fn

# Each test also runs with the code GPUs and TPUs run (tests/conftest.py), in the full suite.
pytestmark = pytest.mark.both_kernel_paths

RNG = np.random.default_rng(0)
# GPT-2's shape: LayerNorm, learned positions, a plain GELU MLP and biases on every projection.
GPT2 = ModelConfig(
    vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=128, norm_type="layer",
    position_embedding="learned", max_positions=32, mlp_activation="gelu_tanh", mlp_gated=False, linear_bias=True,
)


def _params(cfg, length=8):
  dummy = jnp.zeros((1, length), jnp.int32)
  return nn.unbox(Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy)["params"])


def _example(length, vocab):
  tokens = RNG.integers(4, vocab, length + 1).astype(np.int32)
  mask = (RNG.random(length) < 0.6).astype(np.int32)
  mask[-1] = 1
  return tokens[:-1], tokens[1:], mask


def _row(examples, seq_len):
  """Packs examples into one row by hand, as grain's first-fit packing lays them out."""
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  at = 0
  for sid, (inp, tgt, mask) in enumerate(examples, 1):
    n = len(inp)
    row["inputs"][at : at + n], row["targets"][at : at + n], row["loss_mask"][at : at + n] = inp, tgt, mask
    row["segment_ids"][at : at + n], row["positions"][at : at + n] = sid, np.arange(n)
    at += n
  return row


def _stack(rows):
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_attention_mask_worked_example():
  mask = attention_mask(jnp.array([[1, 1, 2, 0]]))[0, 0]
  np.testing.assert_array_equal(
      mask,
      [[1, 0, 0, 0],
       [1, 1, 0, 0],
       [0, 0, 1, 0],
       [0, 0, 0, 1]],
  )  # fmt: skip


def test_sliding_window_mask_worked_example():
  mask = attention_mask(jnp.array([[1, 1, 1, 1]]), sliding_window=2)[0, 0]
  np.testing.assert_array_equal(
      mask,
      [[1, 0, 0, 0],
       [1, 1, 0, 0],
       [0, 1, 1, 0],
       [0, 0, 1, 1]],
  )  # fmt: skip
  decode = decode_mask(jnp.array([3]), num_new=1, cache_len=5, sliding_window=2)[0, 0]
  np.testing.assert_array_equal(decode, [[0, 0, 1, 1, 0]])


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 16))
  def score(pq, pk):
    inv_freq = 10_000.0 ** (-jnp.arange(0, 16, 2) / 16)
    return jnp.sum(apply_rope(q, jnp.array([[pq]]), inv_freq) * apply_rope(k, jnp.array([[pk]]), inv_freq))
  np.testing.assert_allclose(score(3, 1), score(13, 11), rtol=1e-5)
  assert not np.isclose(score(3, 1), score(3, 2))


@pytest.mark.slow
@pytest.mark.parametrize("gpt2", [False, True], ids=["llama", "gpt2"])
def test_packing_is_exact_for_logits_loss_and_gradients(tiny_model_config, gpt2):
  cfg, seq_len = GPT2 if gpt2 else tiny_model_config, 24
  params = _params(cfg)
  model = Transformer(cfg)
  examples = [_example(n, cfg.vocab_size) for n in (7, 5, 9, 6, 3)]
  packed = _stack([_row(examples[:3], seq_len), _row(examples[3:], seq_len)])
  alone = [_stack([_row([ex], seq_len)]) for ex in examples]

  apply = jax.jit(model.apply)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, model.apply), has_aux=True))
  # Per-segment logits are those of the example run alone.
  logits = apply({"params": params}, packed["inputs"], packed["positions"], packed["segment_ids"])
  starts = [(0, 0), (0, 7), (0, 12), (1, 0), (1, 6)]
  for (row, start), ex, single in zip(starts, examples, alone):
    n = len(ex[0])
    single_logits = apply({"params": params}, single["inputs"], single["positions"], single["segment_ids"])
    np.testing.assert_allclose(logits[row, start : start + n], single_logits[0, :n], atol=1e-5, rtol=1e-5)

  # The packed loss is the token-weighted mean of the examples' summed losses; so are the gradients.
  (loss, sums), grads = grad_fn(params, packed)
  nll_sum, tokens, grad_sum = 0.0, 0.0, jax.tree.map(jnp.zeros_like, params)
  for single in alone:
    (_, single_sums), g = grad_fn(params, single)
    n = single_sums["loss_tokens"]
    nll_sum, tokens = nll_sum + single_sums["nll_sum"], tokens + n
    grad_sum = jax.tree.map(lambda acc, gi, n=n: acc + gi * n, grad_sum, g)
  assert float(sums["loss_tokens"]) == float(tokens)
  np.testing.assert_allclose(loss, nll_sum / tokens, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / tokens, atol=1e-6, rtol=1e-4), grads, grad_sum)


@pytest.mark.slow
def test_loss_is_over_all_response_tokens_not_a_mean_of_row_means(tiny_model_config):
  cfg = tiny_model_config
  params, model = _params(cfg), Transformer(cfg)
  long_ex, short_ex = _example(12, cfg.vocab_size), _example(3, cfg.vocab_size)
  batch = _stack([_row([long_ex], 12), _row([short_ex], 12)])
  logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  loss, _ = loss_fn(params, batch, model.apply)
  np.testing.assert_allclose(loss, jnp.sum(nll * mask) / jnp.sum(mask), rtol=1e-5)
  row_means = jnp.sum(nll * mask, 1) / jnp.sum(mask, 1)
  assert not np.isclose(loss, jnp.mean(row_means), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("gpt2", [False, True], ids=["llama", "gpt2"])
def test_kv_cache_greedy_decoding_equals_full_forward(tie, gpt2):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=64, tie_embeddings=tie)
  if gpt2:
    cfg = dataclasses.replace(GPT2, vocab_size=64, tie_embeddings=tie)
  model, params = Transformer(cfg), _params(cfg)
  prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
  tokens, lengths = pad_prompts(prompts, pad_id=0)
  generated = make_greedy_generate(model, max_new_tokens=6, stop_id=-1, pad_id=0)(params, tokens, lengths)
  apply = jax.jit(model.apply)
  width = 16  # reference: rerun the whole (padded) sequence for every new token; causal, so padding is unseen
  for prompt, row in zip(prompts, np.asarray(generated)):
    seq = list(prompt)
    for _ in range(6):
      x = jnp.asarray([seq + [0] * (width - len(seq))])
      logits = apply({"params": params}, x, jnp.arange(width)[None], jnp.ones_like(x))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert list(row) == seq[len(prompt) :]


@pytest.mark.slow
def test_generation_stops_at_the_stop_token_and_pads_after():
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=64)
  model, params = Transformer(cfg), _params(cfg)
  tokens, lengths = pad_prompts([[5, 6, 7]], pad_id=0)
  free = np.asarray(make_greedy_generate(model, max_new_tokens=5, stop_id=-1, pad_id=0)(params, tokens, lengths))[0]
  stop = int(free[1])  # make the second generated token the stop token
  stopped = np.asarray(make_greedy_generate(model, max_new_tokens=5, stop_id=stop, pad_id=0)(params, tokens, lengths))[0]
  first_stop = list(free).index(stop)
  assert list(stopped[: first_stop + 1]) == list(free[: first_stop + 1])
  assert list(stopped[first_stop + 1 :]) == [0] * (4 - first_stop)


@pytest.mark.slow
def test_a_gpt2_shaped_model_trains():
  params = _params(GPT2)
  layer = params["layers"]
  assert params["position_embedding"].shape == (32, 32) and set(params["final_norm"]) == {"scale", "bias"}
  assert "gate" not in layer["mlp"] and layer["mlp"]["up"].shape == (2, 32, 128)
  assert {"q_bias", "k_bias", "v_bias", "o_bias"} <= set(layer["attn"]) and {"up_bias", "down_bias"} <= set(layer["mlp"])
  model = Transformer(GPT2)
  batch = _stack([_row([_example(n, GPT2.vocab_size) for n in (9, 7)], 20), _row([_example(15, GPT2.vocab_size)], 20)])
  grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, model.apply)[0]))
  first, grads = grad_fn(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:  # every parameter, biases and positions included, learns
    assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
  for _ in range(20):
    loss, grads = grad_fn(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  assert float(grad_fn(params)[0]) < float(first)


def test_full_size_shapes_by_eval_shape():
  """A ~0.8B-parameter shape, checked without allocating it."""
  cfg = ModelConfig(vocab_size=32_000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=128, mlp_dim=5632)
  dummy = jax.ShapeDtypeStruct((2, 4096), jnp.int32)
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), dummy, dummy, dummy)
  params = nn.unbox(variables)["params"]
  assert params["layers"]["attn"]["q"].shape == (16, 2048, 16, 128)
  assert params["layers"]["attn"]["k"].shape == (16, 2048, 4, 128)
  n = sum(x.size for x in jax.tree.leaves(params))
  per_layer = 2 * 2048 * 16 * 128 + 2 * 2048 * 4 * 128 + 3 * 2048 * 5632 + 2 * 2048
  assert n == 16 * per_layer + 32_000 * 2048 + 2048
  out = jax.eval_shape(lambda p, x: Transformer(cfg).apply({"params": p}, x, x, x), params, dummy)
  assert out.shape == (2, 4096, 32_000) and out.dtype == jnp.float32


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="multiple of model.num_kv_heads"):
    ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4, mlp_dim=8)
  with pytest.raises(ValueError, match="model.dtype"):
    ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=8, dtype="fp8")
  with pytest.raises(ValueError, match="model.norm_type"):
    dataclasses.replace(GPT2, norm_type="batch")
  with pytest.raises(ValueError, match="model.position_embedding"):
    dataclasses.replace(GPT2, position_embedding="alibi")
  with pytest.raises(ValueError, match="model.max_positions"):
    dataclasses.replace(GPT2, max_positions=0)
  with pytest.raises(ValueError, match="even for rotary"):
    ModelConfig(head_dim=5)
  assert dataclasses.replace(GPT2, head_dim=5).head_dim == 5  # no rotation, no constraint


@pytest.mark.slow
def test_learned_positions_refuse_sequences_past_the_table():
  from sft.errors import ConfigError  # noqa: PLC0415
  from sft.evaluator.generate import make_generate  # noqa: PLC0415

  cfg = ModelConfig(
      vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
      norm_type="layer", position_embedding="learned", max_positions=8, mlp_gated=False, linear_bias=True,
  )
  model = Transformer(cfg)
  tokens = np.ones((1, 6), np.int32)
  positions = np.arange(6, dtype=np.int32)[None]
  params = model.init(jax.random.key(0), tokens, positions, positions * 0 + 1)["params"]
  generate = make_generate(model, max_new_tokens=4, stop_ids=(), pad_id=0)
  with pytest.raises(ConfigError, match="8 positions"):
    generate(params, tokens, np.array([6], np.int32), jax.random.key(0))
