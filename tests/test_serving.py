"""Serving and the eval job use the model that was trained: built from the workdir's config.json, a given
key that would change it refused; prompts cut to the context (or refused), never a cache past it; the
eval job holds its own workdir, never a training run's."""

import importlib
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft import jobs
from sft.config import base_config
from sft.errors import ConfigError
from sft.model import Transformer
from sft.serve import answers as serve
from sft.trainer import lock, rundir, setup
from sft.trainer.checkpoint import Checkpointer

generate_lib = importlib.import_module("sft.evaluator.generate")  # the package's `generate` is the function

TINY = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
# What the workdir's model was trained with: other depth, activation, rotary base and norm epsilon.
TRAINED = dict(TINY, num_layers=3, mlp_activation="gelu_tanh", rope_theta=500.0, norm_eps=1e-5)
SEQ_LEN = 64


def _config(**model):
  config = base_config()
  config.tokenizer.vocab_size = 512
  config.model.update(model or TINY)
  config.train.seq_len = SEQ_LEN
  config.sample.max_new_tokens = 8
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
  """(workdir, params): a workdir as a training run leaves it (tokenizer, config.json, a checkpoint of
  random parameters), without the training."""
  workdir = tmp_path_factory.mktemp("run")
  (workdir / setup.TOKENIZER_FILE).write_bytes(tokenizer.model_proto)
  config = _config(**TRAINED)
  rundir.write_run_config(workdir, config, 0)
  run = setup.setup_run(config)
  params = nn.unbox(run.model.init(jax.random.key(3), *run.dummy_inputs)["params"])
  checkpointer = Checkpointer(workdir / setup.CHECKPOINTS, max_to_keep=1, save_interval_steps=1)
  checkpointer.save(5, {"params": params}, {}, force=True)
  checkpointer.close()
  return workdir, jax.device_get(params)


def _logits(model, params, tokens):
  ids = jnp.asarray(tokens, jnp.int32)[None]
  return np.asarray(model.apply({"params": params}, ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids)))


def test_a_given_model_key_that_differs_from_the_trained_one_is_refused_with_each_difference(trained):
  workdir, _ = trained
  with pytest.raises(ConfigError, match=r"model\.num_layers: trained with 3, given 2\)") as err:
    serve.respond(_config(), workdir, ["Hi"], given_keys={"model.num_layers", "sample.max_new_tokens"})
  assert "leave these keys out" in str(err.value) and "\n" not in str(err.value)
  with pytest.raises(ConfigError) as err:  # no given_keys: every model-building key of the config is compared
    jobs.respond(_config(), workdir, ["Hi"])
  for line in ('model.mlp_activation: trained with "gelu_tanh", given "silu"', "model.rope_theta: trained with 500.0",
               "model.norm_eps: trained with 1e-05, given 1e-06"):
    assert line in str(err.value)


@pytest.mark.slow
def test_keys_not_given_serve_the_model_as_trained_with_its_own_logits(trained, tokenizer, monkeypatch):
  """The config file says 2 layers, silu, another rotary base and epsilon; none of it was given, so the
  3-layer model of config.json answers, from the very logits of the saved parameters."""
  workdir, saved = trained
  built = []
  make_generate = serve.make_generate
  monkeypatch.setattr(serve, "make_generate", lambda model, **kw: built.append(model) or make_generate(model, **kw))
  config = _config()
  config.model.dtype = "bfloat16"  # a runtime key of the file, not given: served as trained (float32)
  answers = jobs.respond(config, workdir, ["What does json.dumps do?"], given_keys={"sample.max_new_tokens"})
  (model,) = built
  assert model.cfg.num_layers == 3 and model.cfg.mlp_activation == "gelu_tanh" and model.cfg.dtype == "float32"
  prompt = tokenizer.render_prompt([{"role": "user", "content": "What does json.dumps do?"}, {"role": "assistant", "content": "-"}])[0]
  trained_model = Transformer(setup.model_config(_config(**TRAINED)))
  np.testing.assert_array_equal(_logits(model, saved, prompt), _logits(trained_model, saved, prompt))
  # And the answer is the trained model's greedy answer.
  want = generate_lib.make_generate(trained_model, max_new_tokens=8, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  tokens_bp, lengths_b = generate_lib.pad_prompts([prompt], tokenizer.pad_id)
  row = np.asarray(want(saved, tokens_bp, lengths_b, jax.random.key(0)))[0]
  assert answers == [tokenizer.decode(generate_lib.strip_generation(row, tokenizer.stop_ids))]


def test_a_given_runtime_key_is_used_and_an_empty_workdir_is_a_clear_error(trained, tmp_path):
  workdir, _ = trained
  config = _config(**TRAINED)
  config.model.remat = True
  served = serve.serving_config(config, workdir, given_keys={"model.remat"})
  assert served.model.remat and served.model.num_layers == 3 and served.train.seq_len == SEQ_LEN
  assert not serve.serving_config(config, workdir, given_keys=set()).model.remat
  with pytest.raises(ConfigError, match="has no config.json and no tokenizer.model and no checkpoints"):
    serve.respond(_config(), tmp_path, ["Hi"])


@pytest.mark.slow
def test_a_prompt_of_50000_tokens_is_cut_to_the_context_and_the_cache_never_passes_it(trained, tokenizer, monkeypatch, caplog):
  workdir, _ = trained
  lengths = []
  init_cache = generate_lib.init_cache
  monkeypatch.setattr(generate_lib, "init_cache", lambda cfg, batch, n: lengths.append(n) or init_cache(cfg, batch, n))
  long = "json dumps loads " * 3_600
  assert 50_000 <= len(tokenizer.encode(long)) < 100_000
  config = _config(**TRAINED)
  with caplog.at_level(logging.WARNING, logger="sft"):
    answers = serve.respond(config, workdir, [long, "Hi"])
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  assert lengths == [SEQ_LEN]  # the cut prompt (64 - 8 tokens) plus 8 new ones, not 50,000
  assert "1 of 2 prompts are longer than the 56 tokens" in caplog.text
  config.sample.prompt_overflow = "refuse"
  with pytest.raises(ConfigError, match=r"prompt 1 \('json dumps.*is \d{5} tokens, more than the 56 that fit"):
    serve.respond(config, workdir, ["Hi", long][::-1])
  config.sample.max_new_tokens, config.sample.prompt_overflow = SEQ_LEN, "truncate"  # answers as long as the context
  lengths.clear()
  with caplog.at_level(logging.WARNING, logger="sft"):
    assert len(serve.respond(config, workdir, [long])) == 1
  assert lengths == [SEQ_LEN // 2 + SEQ_LEN]  # half the context for the prompt: still bounded by the config
  assert "sample.max_new_tokens=64 is more than half of train.seq_len=64: prompts keep their last 32" in caplog.text


@settings(max_examples=100, deadline=None)
@given(seq_len=st.integers(2, 48), new=st.integers(1, 8), offsets=st.lists(st.integers(-2, 2), min_size=1, max_size=5))
def test_prompts_around_the_boundary_keep_their_last_tokens_and_fit(seq_len, new, offsets):
  """prompt + max_new_tokens == seq_len +- 1 and around: what fits is untouched, the rest keeps its end;
  an answer of more than half the context leaves the prompt that half."""
  room = generate_lib.prompt_room(seq_len, new, "k")
  assert room == (seq_len - new if 2 * new <= seq_len else seq_len - seq_len // 2)
  prompts = [list(range(100, 100 + max(room + d, 1))) for d in offsets]
  fitted, cut = generate_lib.fit_prompts(prompts, room)
  assert cut == [i for i, p in enumerate(prompts) if len(p) > room]
  for prompt, fit in zip(prompts, fitted):
    assert fit == prompt[-len(fit):] and len(fit) == min(len(prompt), room)
  tokens_bp, _ = generate_lib.pad_prompts(fitted, 0)
  assert tokens_bp.shape[1] <= room and (2 * new > seq_len or tokens_bp.shape[1] + new <= seq_len)


# --- the eval job ---------------------------------------------------------------------------------------


def _eval_config(model_workdir, files, **eval_keys):
  from configs import eval as eval_configs

  config = eval_configs.get_config()
  config.eval.model_workdir, config.eval.files = str(model_workdir), (str(files),)
  config.eval.update(dict(batch_size=2, max_new_tokens=4, **eval_keys))
  return config


@pytest.fixture
def eval_file(tmp_path):
  path = tmp_path / "evalset.jsonl"
  long = "Explain this text: " + "shlex split quote " * 400
  path.write_text(json.dumps({"prompt": long, "completion": "It splits."}) + "\n"
                  + json.dumps({"prompt": "Hi?", "completion": "Hello."}) + "\n")
  return path


def test_the_eval_job_refuses_a_training_workdir_and_one_another_job_holds(trained, eval_file, tmp_path, monkeypatch):
  from sft import eval_job

  workdir, _ = trained
  config = _eval_config(workdir, eval_file)
  before = {p.name for p in workdir.iterdir()}
  with pytest.raises(ConfigError, match="is the model's own training workdir.*a workdir of its own"):
    eval_job.evaluate_model(config, workdir)
  other_run = tmp_path / "other"
  other_run.mkdir()
  rundir.write_run_config(other_run, {"seed": 0}, 0)
  with pytest.raises(ConfigError, match="holds a training run .config.json.*a workdir of its own"):
    eval_job.evaluate_model(config, other_run)
  assert {p.name for p in workdir.iterdir()} == before  # nothing written, no eval/ replaced

  mine = tmp_path / "ev"
  with lock.workdir_lock(mine):  # a training run (or another eval job) holds it
    with pytest.raises(ConfigError, match="is in use by pid"):
      eval_job.evaluate_model(config, mine)
  seen = []

  def evaluate(config, workdir, *args):  # while the job runs, a training run there is refused
    seen.append((workdir / lock.LOCK_FILE).exists())
    with pytest.raises(ConfigError, match="is in use by pid"), lock.workdir_lock(workdir):
      pass
    return {}

  monkeypatch.setattr(eval_job, "_evaluate", evaluate)
  assert eval_job.evaluate_model(config, mine) == {} and seen == [True]
  assert not (mine / lock.LOCK_FILE).exists()


def test_the_eval_job_cuts_long_prompts_and_reports_it_or_refuses_them(trained, eval_file, tmp_path):
  from sft import eval_job

  workdir, _ = trained
  metrics = eval_job.evaluate_model(_eval_config(workdir, eval_file), tmp_path / "ev")
  assert metrics["eval/loss_tokens"] > 0
  results = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
  assert results["prompts_truncated"] == 1
  assert "generation prompts cut to the context: 1 of 2" in (tmp_path / "ev" / "eval" / "report.md").read_text()
  with pytest.raises(ConfigError, match=r"record 'evalset.jsonl:1' has a generation prompt of \d+ tokens, more than the 60"):
    eval_job.evaluate_model(_eval_config(workdir, eval_file, prompt_overflow="refuse"), tmp_path / "ev2")
