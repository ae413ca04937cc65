"""Sampling: greedy, temperature, top-k and top-p draw from the distributions they promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft.errors import ConfigError
from sft.evaluator import Sampler, make_generate, pad_prompts
from sft.model import ModelConfig, Transformer

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))


def draws(sampler, n=20_000):
  keys = jax.random.split(jax.random.key(0), n)
  tokens = jax.vmap(lambda k: sampler(LOGITS, k)[0])(keys)
  return np.bincount(np.asarray(tokens), minlength=4) / n


def test_greedy_is_argmax():
  assert int(Sampler()(LOGITS, jax.random.key(0))[0]) == 0


def test_temperature_one_samples_the_softmax():
  np.testing.assert_allclose(draws(Sampler(temperature=1.0)), [0.5, 0.25, 0.15, 0.1], atol=0.015)


def test_temperature_sharpens_and_flattens():
  sharp = draws(Sampler(temperature=0.5))  # p ** 2, renormalised
  np.testing.assert_allclose(sharp, np.array([0.25, 0.0625, 0.0225, 0.01]) / 0.345, atol=0.015)
  assert draws(Sampler(temperature=5.0))[3] > 0.2


def test_top_k_keeps_the_k_most_likely():
  np.testing.assert_allclose(draws(Sampler(temperature=1.0, top_k=2)), [2 / 3, 1 / 3, 0, 0], atol=0.015)


def test_top_p_keeps_the_smallest_nucleus():
  # 0.5 < 0.7 so token 1 is needed; 0.75 >= 0.7 so token 2 is not.
  np.testing.assert_allclose(draws(Sampler(temperature=1.0, top_p=0.7)), [2 / 3, 1 / 3, 0, 0], atol=0.015)
  assert draws(Sampler(temperature=1.0, top_p=0.01))[0] == 1.0  # the most likely token always stays


def test_bad_settings_are_clear_errors():
  for kwargs in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
    with pytest.raises(ConfigError):
      Sampler(**kwargs)


def test_sampled_generation_is_reproducible_and_respects_stop_ids():
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy)["params"]
  tokens, lengths = pad_prompts([[1, 2, 3], [4]], pad_id=0)
  fn = make_generate(Transformer(cfg), max_new_tokens=12, stop_ids=(5, 6), pad_id=0, sampler=Sampler(temperature=1.5))
  a = np.asarray(fn(params, tokens, lengths, jax.random.key(1)))
  b = np.asarray(fn(params, tokens, lengths, jax.random.key(1)))
  c = np.asarray(fn(params, tokens, lengths, jax.random.key(2)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for row in np.concatenate([a, c]):
    stops = [i for i, t in enumerate(row) if t in (5, 6)]
    if stops:
      assert set(row[stops[0] + 1 :]) <= {0}, row
