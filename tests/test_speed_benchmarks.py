"""benchmarks/train_speed.py and benchmarks/generate_speed.py run end to end in --tiny mode, in this
process: both sides timed, the ratio printed, and both sides really computing the same thing (the same
first loss from the same weights; the same greedy tokens)."""

import importlib.util
import os
import re
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_train_speed_runs_both_sides_on_the_same_weights(capsys, tmp_path):
  layer_product = re.compile(r"(forward|backward): layers/mlp/dot_general")  # the scanned layer's
  # Some traces lacked the scanned layers' operations altogether (about one full-suite run in three): on a
  # busy machine XLA:CPU runs some operations on the client's own thread, which the breakdown now counts too.
  # Up to three traces still, one must show them.
  for attempt in range(3):
    result = load("train_speed").main(["--tiny", "--profile", str(tmp_path / str(attempt))])
    if any(layer_product.fullmatch(s) for _, _, s in result["profile"]):
      break
  out = capsys.readouterr().out
  assert result["ours_tokens_per_s"] > 0 and result["theirs_tokens_per_s"] > 0
  assert result["ratio"] == pytest.approx(result["ours_tokens_per_s"] / result["theirs_tokens_per_s"])
  ours_loss, their_loss = result["first_loss"]
  assert ours_loss == pytest.approx(their_loss, rel=1e-4)  # same weights, same batch, same loss
  assert re.search(r"ratio \(sft / transformers\): [\d.]+x", out) and "threads: " in out
  # Model FLOPs per token by hand for the tiny model at T=32: per layer q and o 64*64 each, k and v 64*32 each,
  # gate, up and down 64*128 each -> 36864; two layers plus the untied unembedding 64*256 -> N = 90112.
  assert result["flops_per_token"] == 6 * 90_112 + 12 * 2 * 32 * 4 * 16

  # --profile: one traced step's operation time by source, the layers' products among them.
  rows = result["profile"]
  assert rows and all(ms >= 0 and 0 <= share <= 1 for ms, share, _ in rows) and sum(s for _, s, _ in rows) <= 1 + 1e-9
  sources = [source for _, _, source in rows]
  assert any(layer_product.fullmatch(s) for s in sources), sources
  assert any(s.startswith("backward, recomputed: layers/") for s in sources), sources  # remat (save_dots) recomputes norms
  assert "where the step's time goes" in out

  # In micro-batches, both sides still report the whole batch's mean loss at the same weights.
  micro = load("train_speed").main(["--tiny", "--micro_batches", "2"])
  assert micro["micro_batches"] == 2 and "2 micro-batches per step on both sides" in capsys.readouterr().out
  assert micro["first_loss"][0] == pytest.approx(ours_loss, rel=1e-5)
  assert micro["first_loss"][1] == pytest.approx(their_loss, rel=1e-5)
  with pytest.raises(SystemExit):  # 3 micro-batches of a 2-row batch: an argparse error, not a traceback
    load("train_speed").main(["--tiny", "--micro_batches", "3"])
  assert "must be >= 1 and divide the batch" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_speed_prints_both_sides_and_the_ratio(capsys):
  results = load("generate_speed").main(["--tiny", "--batch", "1", "3"])
  out = capsys.readouterr().out
  assert "torch.set_num_threads(" in out
  for batch, result in zip((1, 3), results):
    assert result["batch"] == batch and result["ours"] > 0 and result["hf"] > 0
    assert result["ratio"] == pytest.approx(result["ours"] / result["hf"])
    assert result["tokens_equal"] == 1.0  # 8 tokens of a toy model: the two sides agree exactly
    assert re.search(rf"batch {batch}: ours +[\d.]+ tokens/s, HF generate +[\d.]+ tokens/s, ratio [\d.]+x", out), out
    for side in ("ours", "hf"):  # each side's share of the bound its own library's read and matmul speeds set
      assert re.search(rf"batch {batch}: +{side} roofline +[\d.]+ tokens/s \(bound by (reading the weights|the matmuls)\)", out), out
      assert 0 < result["roofline_share"][side]
    floor = re.search(rf"batch {batch}: floor \(the weight products alone, .*\) ours ([\d.]+) s, HF ([\d.]+) s; .*: ([\d.]+)x HF$", out, re.M)
    assert floor and 0 < float(floor[1]) and 0 < float(floor[2]), out
    assert float(floor[3]) == pytest.approx(result["best_possible_ratio"], abs=0.01)
  assert re.search(r"this machine: reading memory JAX [\d.]+ GB/s, PyTorch [\d.]+ GB/s; matmul 256\^3", out), out


def test_profile_labels_fold_layers_and_name_the_pass():
  profile_ops = load("profile_ops")
  hlo = "\n".join([
      '  %ynn_fusion.12 = f32[8,512]{1,0} fusion(%p), kind=kCustom, metadata={op_name="jit(step)/transpose(jvp(Transformer))/Transformer._layers_one_by_one/Block_3/mlp/dot_general" stack_frame_id=1}',
      '  ROOT %add.7 = f32[8]{0} add(%a, %b), metadata={op_name="jit(step)/jvp(Transformer)/Transformer._layers_one_by_one/Block_11/attn/add"}',
      '  %copy.2 = f32[8]{0} copy(%a), metadata={op_name="jit(step)/add;jit(step)/mul"}',
      '  %mul.3 = f32[8]{0} multiply(%a, %a), metadata={op_name="jit(step)/transpose(jvp(Transformer))/while/body/closed_call/checkpoint/rematted_computation/layers/mlp_norm/mul"}',
      '  %param.1 = f32[8]{0} parameter(0)',
  ])
  assert profile_ops.source_ops(hlo) == {
      "ynn_fusion.12": "backward: Block_*/mlp/dot_general",
      "add.7": "forward: Block_*/attn/add",
      "copy.2": "update: add",
      "mul.3": "backward, recomputed: layers/mlp_norm/mul",
  }
  with pytest.raises(FileNotFoundError):
    profile_ops.operation_times_ns("/nonexistent-trace-dir")


def test_a_profile_without_cpu_operations_is_a_clear_error(tmp_path):
  import jax

  with jax.profiler.trace(str(tmp_path)):
    pass
  with pytest.raises(ValueError, match="no XLA:CPU operation"):
    load("profile_ops").operation_times_ns(str(tmp_path))


def test_train_speed_rejects_an_unknown_remat_policy(capsys):
  with pytest.raises(SystemExit):  # argparse's message, not a ConfigError traceback
    load("train_speed").main(["--tiny", "--remat_policy", "none"])
  assert "invalid choice" in capsys.readouterr().err
