"""Sampling: greedy, temperature, top-k and top-p draw from the distributions they promise; generation
stops at the chat template's end of turn; its ids can be placed replicated for multi-process runs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fresh_process import fresh_env, run_json
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_hf_tokenizer import CHAT, CHATML, FAMILIES, make_folder

from sft.errors import ConfigError
from sft.evaluator import Evaluator, Sampler, make_generate, pad_prompts, strip_generation
from sft.model import ModelConfig, Transformer
from sft.tokenizer.hf_tokenizer import HFTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


@pytest.mark.slow
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


# --- stopping at the end of turn ----------------------------------------------------------------------


class ScriptedModel:
  """Stands in for a Transformer that has learned one chat by heart: at position t it predicts
  `script[t + 1]`, so greedy decoding after a prefix of the script writes the rest of it."""

  def __init__(self, script, vocab_size):
    self.script = jnp.asarray(script, jnp.int32)
    self.vocab_size = vocab_size
    self.cfg = ModelConfig(vocab_size=vocab_size, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8)

  def apply(self, variables, tokens_bt, positions_bt=None, cache=None, cache_index_b=None, return_hidden=False, method=None):
    if method is not None:  # Transformer.unembed: its "hidden states" are already the logits
      return tokens_bt
    next_bt = self.script[jnp.minimum(positions_bt + 1, len(self.script) - 1)]
    return jax.nn.one_hot(next_bt, self.vocab_size) * 10.0, cache


def test_generation_stops_at_the_template_end_of_turn_not_only_at_eos(tmp_path):
  """Qwen's eos is <|endoftext|> and its turns end with <|im_end|>: a model that answers and then goes
  on to write the next user turn, as fine-tuned models do, is cut at <|im_end|>."""
  tok = HFTokenizer(make_folder(tmp_path, CHATML, specials=FAMILIES["qwen"][2], eos_token="<|endoftext|>"))
  chat = [{"role": "user", "content": "What does json.dumps do?"}, {"role": "assistant", "content": "Serialize obj."}]
  invented = [*chat, {"role": "user", "content": "And loads?"}, {"role": "assistant", "content": "Deserialize a str."}]
  script, _ = tok.tokenize_chat(invented)
  prompt, reference = tok.render_prompt(chat)
  model = ScriptedModel(script, tok.vocab_size)
  tokens_bp, lengths_b = pad_prompts([prompt, prompt], tok.pad_id)

  def answer(stop_ids):
    fn = make_generate(model, max_new_tokens=len(script) - len(prompt), stop_ids=stop_ids, pad_id=tok.pad_id)
    rows = np.asarray(fn({}, tokens_bp, lengths_b, jax.random.key(0)))
    return rows[0], tok.decode(strip_generation(rows[0], stop_ids))

  row, text = answer(tok.stop_ids)
  end = list(row).index(tok.token_id("<|im_end|>"))
  assert text == reference and set(row[end + 1 :].tolist()) == {tok.pad_id}
  row, text = answer((tok.eos_id,))  # the eos alone, as before: the answer runs into the invented turn
  assert text.startswith(reference) and "And loads?" in text and tok.pad_id not in row.tolist()


@pytest.mark.parametrize("normalization, expected", [("squad", 1.0), ("whitespace", 0.0)])
def test_the_evaluator_compares_answers_as_configured(tmp_path, normalization, expected):
  tok = HFTokenizer(make_folder(tmp_path, CHATML, specials=FAMILIES["qwen"][2], eos_token="<|endoftext|>"))
  chat = [{"role": "user", "content": "What does json.dumps do?"}, {"role": "assistant", "content": "Serialize obj."}]
  written = [chat[0], {"role": "assistant", "content": "Serialize THE obj"}, {"role": "user", "content": "And loads?"}]
  script, _ = tok.tokenize_chat([*written, {"role": "assistant", "content": "Deserialize."}])
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  evaluator = Evaluator(
      [{"messages": chat}], tokenizer=tok, model=ScriptedModel(script, tok.vocab_size), eval_step=None, place_batch=None,
      seq_len=64, batch_size=2, num_generations=1, max_new_tokens=24, normalization=normalization,
      out_sharding=NamedSharding(mesh, PartitionSpec()),
  )  # fmt: skip
  metrics, samples = evaluator.generation_metrics({})
  assert [s.prediction for s in samples] == ["Serialize THE obj"]  # stopped at <|im_end|>
  assert metrics["eval/exact_match"] == expected
  assert metrics["eval/token_f1"] == pytest.approx(1.0 if expected else 0.4)  # whitespace: only "Serialize" is common


def test_an_unknown_normalization_fails_with_the_config_check():
  from sft.config import base_config
  from sft.config_check import check_config

  config = base_config()
  config.eval.answer_normalization = "lowercase"
  with pytest.raises(ConfigError, match="eval.answer_normalization: must be one of 'squad', 'whitespace'"):
    check_config(config)


# --- replicated output for multi-process evaluation ----------------------------------------------------


def _tiny_generate(**kwargs):
  """A cheap model to compile: what is placed, not what is computed, matters here."""
  model = ScriptedModel(np.arange(64) % 29 + 3, vocab_size=32)
  return {}, make_generate(model, max_new_tokens=6, stop_ids=(2,), pad_id=0, **kwargs)


def test_out_sharding_places_the_generated_ids():
  params, plain = _tiny_generate()
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  _, placed = _tiny_generate(out_sharding=NamedSharding(mesh, PartitionSpec()))
  tokens, lengths = pad_prompts([[1, 2, 3], [4]], pad_id=0)
  result = placed(params, tokens, lengths, jax.random.key(0))
  assert result.sharding == NamedSharding(mesh, PartitionSpec()) and result.sharding.is_fully_replicated
  np.testing.assert_array_equal(result, plain(params, tokens, lengths, jax.random.key(0)))


# Run with 8 fake CPU devices, a batch sharded over them as the trainer places it.
EIGHT_DEVICES = """
import json, os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from test_sampling import _tiny_generate

mesh = Mesh(np.asarray(jax.devices()), ("data",))
tokens = jax.device_put(np.arange(1, 33, dtype=np.int32).reshape(8, 4) % 32, NamedSharding(mesh, P("data")))
lengths = jax.device_put(np.full(8, 4, np.int32), NamedSharding(mesh, P("data")))
params, plain = _tiny_generate()
_, placed = _tiny_generate(out_sharding=NamedSharding(mesh, P()))
a, b = plain(params, tokens, lengths, jax.random.key(0)), placed(params, tokens, lengths, jax.random.key(0))
print(json.dumps({
    "devices": jax.device_count(),
    "plain_replicated": a.sharding.is_fully_replicated,
    "placed_replicated": b.sharding.is_fully_replicated,
    "placed_shard_shapes": sorted({tuple(s.data.shape) for s in b.addressable_shards}),
    "equal": bool(np.array_equal(np.asarray(a), np.asarray(b))),
}))
"""


def test_out_sharding_replicates_a_batch_sharded_over_eight_devices():
  result, _ = run_json(["-c", EIGHT_DEVICES], env=fresh_env(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])))
  assert result["devices"] == 8
  assert not result["plain_replicated"]  # left alone, the ids follow the batch: one process could not read them all
  assert result["placed_replicated"] and result["placed_shard_shapes"] == [[8, 6]] and result["equal"]


def test_an_unknown_normalization_fails_when_the_evaluator_is_built(tmp_path):
  tok = HFTokenizer(make_folder(tmp_path, CHATML, eos_token="<|im_end|>"))
  with pytest.raises(ConfigError, match="eval.answer_normalization: must be one of 'squad', 'whitespace'"):
    Evaluator(
        [{"messages": CHAT}], tokenizer=tok, model=None, eval_step=None, place_batch=None, seq_len=64,
        batch_size=2, num_generations=1, max_new_tokens=8, normalization="lowercase",
    )  # fmt: skip
  with pytest.raises(ConfigError, match="eval.prompt_overflow: must be one of 'truncate', 'refuse'"):
    Evaluator(
        [{"messages": CHAT}], tokenizer=tok, model=None, eval_step=None, place_batch=None, seq_len=64,
        batch_size=2, num_generations=1, max_new_tokens=8, prompt_overflow="refused",
    )  # fmt: skip
