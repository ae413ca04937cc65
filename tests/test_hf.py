"""Hugging Face parity: tiny random models made with `transformers` load into sft with the same logits,
decode the same greedy tokens, and export back to identical tensors."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import safetensors.torch  # noqa: E402

from sft.databuilder import build_config, build_dataset  # noqa: E402
from sft.errors import ConfigError  # noqa: E402
from sft.evaluator.generate import make_greedy_generate, pad_prompts  # noqa: E402
from sft.hf import export_model, from_hf_config, load_model, safetensors_io, to_hf_config  # noqa: E402
from sft.model import ModelConfig, Transformer  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_VALID = {**COMMON, "model_type": "llama", "hidden_act": "silu", "rope_theta": 1e4}  # a config.json sft reads
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10_000.0)),
    "llama3.1": (
        transformers.LlamaConfig,
        dict(
            rope_theta=500_000.0,
            # A short original context so that the scaling changes the frequencies the test uses.
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ),
    "mistral": (transformers.MistralConfig, dict(head_dim=16, sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=True)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    "gemma2": (
        transformers.Gemma2Config,
        # Small caps and window so that soft-capping and the alternating sliding window all act.
        dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    ),
    # GPT-2 names its fields apart (so COMMON is not used); n_inner None: 4 * n_embd.
    "gpt2": (transformers.GPT2Config, dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=None)),
}
LENGTHS = (5, 9, 13)


def _hf_model(name, folder):
  config_cls, extra = FAMILIES[name]
  common = {} if name == "gpt2" else COMMON
  config = config_cls(**common, **extra, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # every weight random, norms and biases included, so every mapping matters
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.eval()
  model.save_pretrained(folder)
  return model


def _tensors(folder):
  """Every tensor of a checkpoint folder, read by the safetensors package itself rather than sft's glue."""
  tensors = {}
  for path in sorted(folder.glob("*.safetensors")):
    tensors.update(safetensors.numpy.load_file(path))
  return tensors


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor([tokens])).logits[0].numpy()


# Llama in the fast tier, the other families in the slow one.
TIERED = [name if name == "llama" else pytest.param(name, marks=pytest.mark.slow) for name in sorted(FAMILIES)]


@pytest.fixture(scope="module", params=TIERED)
def family(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  hf = _hf_model(request.param, folder)
  cfg, params = load_model(folder)
  return request.param, folder, hf, cfg, params


def test_logits_match_for_sequences_of_different_lengths(family):
  name, _, hf, cfg, params = family
  model = Transformer(cfg)
  rng = np.random.default_rng(1)
  for length in LENGTHS:
    tokens = rng.integers(0, 128, length).tolist()
    x = jnp.asarray([tokens])
    ours = model.apply({"params": params}, x, jnp.arange(length)[None], jnp.ones_like(x))[0]
    np.testing.assert_allclose(ours, _hf_logits(hf, tokens), atol=1e-4, rtol=1e-4, err_msg=f"{name}, length {length}")


def test_logits_match_per_segment_in_a_packed_row(family):
  name, _, hf, cfg, params = family
  rng = np.random.default_rng(2)
  sequences = [rng.integers(0, 128, n).tolist() for n in LENGTHS]
  tokens = sum(sequences, [])
  segment_ids = sum(([i + 1] * len(s) for i, s in enumerate(sequences)), [])
  positions = sum((list(range(len(s))) for s in sequences), [])
  logits = Transformer(cfg).apply(
      {"params": params}, jnp.asarray([tokens]), jnp.asarray([positions]), jnp.asarray([segment_ids])
  )[0]
  start = 0
  for seq in sequences:
    np.testing.assert_allclose(logits[start : start + len(seq)], _hf_logits(hf, seq), atol=1e-4, rtol=1e-4, err_msg=name)
    start += len(seq)


def test_greedy_generation_matches_transformers(family):
  name, _, hf, cfg, params = family
  prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13, 14]]
  tokens, lengths = pad_prompts(prompts, pad_id=0)
  ours = np.asarray(make_greedy_generate(Transformer(cfg), max_new_tokens=8, stop_id=-1, pad_id=0)(params, tokens, lengths))
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert row.tolist() == out[0, len(prompt) :].tolist(), name


def test_export_round_trip_is_exact_and_loads_in_transformers(family, tmp_path):
  name, folder, hf, cfg, params = family
  family_name = json.loads((folder / "config.json").read_text())["model_type"]
  exported = export_model(params, cfg, tmp_path / "out", family_name, max_shard_bytes=40_000)
  assert (exported / "model.safetensors.index.json").exists()  # small shards force the sharded layout
  original, again = _tensors(folder), _tensors(exported)
  expected = set(original) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
  assert set(again) == expected
  for tensor in expected:
    np.testing.assert_array_equal(again[tensor], original[tensor], err_msg=tensor)

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  tokens = list(range(3, 3 + LENGTHS[-1]))
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)
  cfg_again, _ = load_model(exported)
  assert cfg_again == cfg


def test_bfloat16_checkpoints_load_and_export_bit_for_bit(tmp_path):
  hf = _hf_model("qwen2", tmp_path / "f32")
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  cfg, params = load_model(tmp_path / "bf16", param_dtype="bfloat16")
  assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
  reference = hf.state_dict()["model.layers.0.self_attn.q_proj.bias"].float().numpy()
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q_bias"][0], np.float32).reshape(-1), reference)

  exported = export_model(params, cfg, tmp_path / "out", "qwen2")
  original, again = _tensors(tmp_path / "bf16"), _tensors(exported)
  assert set(again) == set(original)
  for name, tensor in original.items():  # compared as bits: a trip through float32 or a scrambled layout would show
    assert again[name].dtype == tensor.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(again[name].view(np.uint16), tensor.view(np.uint16), err_msg=name)
  _, reloaded = load_model(exported, param_dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def test_safetensors_writes_are_contiguous_and_atomic(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = tmp_path / "t.safetensors"
  safetensors_io.save_file({"t": x.T, "s": x[:, ::2]}, path)  # the package alone writes strided views scrambled
  back = safetensors.numpy.load_file(path)
  np.testing.assert_array_equal(back["t"], x.T)
  np.testing.assert_array_equal(back["s"], x[:, ::2])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temporary left beside it


def test_bad_checkpoints_are_clear_errors(tmp_path):
  _hf_model("llama", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(ConfigError, match="hidden_act"):
    from_hf_config({**config, "hidden_act": "gelu"})
  with pytest.raises(ConfigError, match="fields sft does not know"):
    from_hf_config({**config, "new_magic": 1})
  with pytest.raises(ConfigError, match="rope type 'yarn'"):
    from_hf_config({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
  with pytest.raises(ConfigError, match="model_type"):
    from_hf_config({**config, "model_type": "bert"})
  qwen3 = from_hf_config({**config, "model_type": "qwen3"})
  with pytest.raises(ConfigError, match="cannot express"):
    to_hf_config(qwen3, "llama")  # its q/k norms have no place in a Llama checkpoint

  tensors = _tensors(tmp_path)
  broken = dict(tensors)
  del broken["model.layers.1.mlp.up_proj.weight"]
  broken["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(broken, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"missing: \['model.layers.1.mlp.up_proj.weight'\].*unexpected: \['model.layers.0.extra.weight'\]"):
    load_model(tmp_path)
  safetensors.numpy.save_file({**tensors, "model.norm.weight": np.zeros(65, np.float32)}, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"model.norm.weight has shape \(65,\), the config needs \(64,\)"):
    load_model(tmp_path)
  # float8 is a dtype the package knows but its numpy backend cannot return (an AttributeError if asked).
  torch_tensors = {n: torch.from_numpy(t) for n, t in tensors.items()}
  torch_tensors["model.norm.weight"] = torch_tensors["model.norm.weight"].to(torch.float8_e4m3fn)
  safetensors.torch.save_file(torch_tensors, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"'model.norm.weight' has dtype F8_E4M3, which sft does not read"):
    load_model(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(FileNotFoundError, match="never pickles"):
    load_model(tmp_path)


def test_gpt2_checkpoints_without_the_prefix_or_with_mask_buffers_load(tmp_path):
  _hf_model("gpt2", tmp_path / "lm")
  _, params = load_model(tmp_path / "lm")
  tensors = _tensors(tmp_path / "lm")
  bare = tmp_path / "bare"  # as GPT2Model (no LM head) saves: no `transformer.` prefix, and old mask buffers
  bare.mkdir()
  shutil.copy(tmp_path / "lm" / "config.json", bare)
  stripped = {name.removeprefix("transformer."): t for name, t in tensors.items()}
  buffers = {f"h.{i}.attn.{b}": np.ones((1, 1, 4, 4), np.float32) for i in range(2) for b in ("bias", "masked_bias")}
  safetensors.numpy.save_file({**stripped, **buffers}, bare / "model.safetensors")
  _, again = load_model(bare)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  c_attn = tensors["transformer.h.1.attn.c_attn.weight"]  # (D, 3D): q, k, v side by side, Conv1D (in, out)
  np.testing.assert_array_equal(params["layers"]["attn"]["v"][1].reshape(32, 32), c_attn[:, 64:])


def test_gpt2_configs_outside_what_sft_implements_are_config_errors(tmp_path):
  _hf_model("gpt2", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert from_hf_config({**config, "activation_function": "gelu_pytorch_tanh"}) == from_hf_config(config)
  for key, value, match in [
      ("activation_function", "relu", "activation_function='relu'"),
      ("scale_attn_by_inverse_layer_idx", True, "per-layer attention scaling"),
      ("n_head", 5, "does not divide"),
      ("hidden_size", 32, "fields sft does not know"),  # a Llama-style name means nothing to GPT-2
  ]:
    with pytest.raises(ConfigError, match=match):
      from_hf_config({**config, key: value})
  with pytest.raises(ConfigError, match="fields sft does not know"):
    from_hf_config({**_VALID, "n_embd": 32})  # nor a GPT-2 name to Llama
  with pytest.raises(ConfigError, match="cannot express"):
    to_hf_config(ModelConfig(), "gpt2")  # RMSNorm, rotary embeddings and a gated MLP
  with pytest.raises(ConfigError, match="cannot express"):
    to_hf_config(from_hf_config(config), "llama")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_tune_a_local_checkpoint_through_the_launcher(tmp_path, mode):
  """launch.py with --config.model.checkpoint: HF weights + tokenizer + template in, fine-tuned HF folder out."""
  import subprocess
  import sys

  from test_hf_tokenizer import CHATML, make_folder

  model_dir = make_folder(tmp_path / "qwen", CHATML, eos_token="<|im_end|>")
  config = transformers.Qwen2Config(**{**COMMON, "vocab_size": 400}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  original = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  original.save_pretrained(model_dir)
  raw_dir, data_dir = tmp_path / "raw", tmp_path / "data"
  raw_dir.mkdir()
  rows = [{"instruction": f"What is {a} plus {b}?", "output": f"It is {a + b}."} for a in range(9) for b in range(9)]
  (raw_dir / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  build = build_config()
  build.input_dir = str(raw_dir)
  build.output.validation_fraction = 0.1
  build_dataset(build, data_dir, progress=False)  # the data builder's output is what fine-tuning reads

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  cmd = [
      sys.executable, "launch.py", f"--config=configs/finetune.py:{mode}", f"--workdir={workdir}",
      "--config.model.dtype=float32", "--config.eval.every_steps=12",
      f"--config.model.checkpoint={model_dir}", "--config.data.source=dir", f"--config.data.dir={data_dir}",
      "--config.train.pretrain_steps=0", "--config.train.sft_steps=12", "--config.train.seq_len=64",
      "--config.train.batch_size=4", "--config.train.lr=1e-3", "--config.train.log_every=4",
      "--config.eval.batch_size=4", "--config.eval.num_generations=4",
      "--config.eval.max_new_tokens=6", "--config.checkpoint.every_steps=12",
  ]
  if mode == "lora":
    cmd += ["--config.model.lora_rank=4", "--config.train.lr=1e-2", "--config.model.lora_targets=('q','v','gate')"]
  result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "weights: loaded from" in result.stdout and "with its chat template" in result.stdout
  assert ("LoRA:" in result.stdout) == (mode == "lora")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]

  exported = workdir / "hf_export"
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    assert (exported / name).exists(), name
  assert json.loads((exported / "tokenizer_config.json").read_text())["chat_template"] == CHATML
  tuned = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  tokens = list(range(3, 15))
  assert not np.allclose(_hf_logits(tuned, tokens), _hf_logits(original, tokens), atol=1e-3)
  if mode == "lora":  # untargeted weights are exactly the originals; targeted ones carry the merged adapters
    tuned_state, original_state = tuned.state_dict(), original.state_dict()
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
      assert torch.equal(tuned_state[name], original_state[name]), name
    assert not torch.equal(tuned_state["model.layers.0.self_attn.q_proj.weight"], original_state["model.layers.0.self_attn.q_proj.weight"])
  _, params = load_model(exported)
  ours = Transformer(from_hf_config(json.loads((exported / "config.json").read_text()))).apply(
      {"params": params}, jnp.asarray([tokens]), jnp.arange(len(tokens))[None], jnp.ones((1, len(tokens)), jnp.int32)
  )[0]
  np.testing.assert_allclose(ours, _hf_logits(tuned, tokens), atol=1e-4, rtol=1e-4)
  if mode == "full":  # the eval job on the exported Hugging Face folder, without training
    evaluated = subprocess.run(
        [sys.executable, "launch.py", "--config=configs/eval.py", f"--workdir={tmp_path / 'ev'}", f"--config.model.checkpoint={exported}",
         f"--config.data.dir={data_dir}", "--config.model.dtype=float32", "--config.train.seq_len=64", "--config.eval.batch_size=4",
         "--config.eval.max_new_tokens=6"],
        cwd=root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
    assert results["about"]["model"] == str(exported) and results["tasks"]["chat"]["generated"] == results["tasks"]["chat"]["records"] > 0
    assert results["metrics"]["eval/loss"] == pytest.approx(rows[-1]["eval/loss"], rel=1e-4)  # the same model, the same split


# Hand-crafted safetensors headers: what the package (0.8.0) refuses by itself, and the one defect
# safetensors_io adds a check for. Each must be a ValueError naming the file.
