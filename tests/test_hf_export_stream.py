"""Hugging Face export streams tensor by tensor: each tensor in its parameter's dtype (bfloat16 stays
bfloat16), gathered alone, written and dropped; the files are byte for byte what the `safetensors`
package writes for the same tensors; only process 0 writes."""

import dataclasses
import json
import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from sft.hf import export as hf_export
from sft.hf import export_model, load_params, safetensors_io, to_hf_tensors, weights
from sft.model import ModelConfig

LLAMA = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, tie_embeddings=False)
GPT2 = dataclasses.replace(
    LLAMA, num_kv_heads=4, norm_type="layer", position_embedding="learned", max_positions=16,
    mlp_activation="gelu_tanh", mlp_gated=False, linear_bias=True,
)  # fmt: skip


def random_params(cfg, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), dtype), weights.abstract_params(cfg))


def old_export(params, cfg, folder, family, max_shard_bytes):
  """What the export must equal, written without the exporter's sharding or writer: every tensor on the
  host at once, shards filled in name order up to `max_shard_bytes` (a bigger tensor alone), each file
  written by the `safetensors` package itself."""
  folder.mkdir(parents=True)
  tensors = {name: np.ascontiguousarray(t) for name, t in to_hf_tensors(params, cfg).items()}
  shards = [[]]
  for name in sorted(tensors):
    if shards[-1] and sum(tensors[n].nbytes for n in shards[-1]) + tensors[name].nbytes > max_shard_bytes:
      shards.append([])
    shards[-1].append(name)
  n = len(shards)
  names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
  weight_map = {}
  for file_name, shard in zip(names, shards):
    safetensors.numpy.save_file({t: tensors[t] for t in shard}, folder / file_name, metadata={"format": "pt"})
    weight_map.update({t: file_name for t in shard})
  if n > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return tensors


@pytest.mark.parametrize("cfg, family", [(LLAMA, "llama"), (GPT2, "gpt2")], ids=["llama", "gpt2"])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 12_000])
def test_float32_export_is_byte_for_byte_the_old_exporters(tmp_path, cfg, family, max_shard_bytes):
  params = random_params(cfg)
  old_export(params, cfg, tmp_path / "old", family, max_shard_bytes)
  export_model(params, cfg, tmp_path / "new", family, max_shard_bytes=max_shard_bytes)
  old = sorted(p.name for p in (tmp_path / "old").iterdir())
  new = sorted(p.name for p in (tmp_path / "new").iterdir() if p.name != "config.json")
  assert old == new and (len(old) > 1) == (max_shard_bytes < 10**9)
  for name in old:
    assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes(), name
  again = load_params(tmp_path / "new", cfg)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_parameters_export_as_bf16_bit_for_bit(tmp_path):
  params = random_params(LLAMA, jnp.bfloat16)
  cfg = dataclasses.replace(LLAMA, param_dtype="bfloat16")
  export_model(params, cfg, tmp_path / "out", "llama")
  tensors = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
  assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  bits = lambda x: np.asarray(x).view(np.uint16)  # noqa: E731
  layers = params["layers"]
  expected = {  # the HF layouts, written out by hand
      "model.embed_tokens.weight": params["embedding"],
      "lm_head.weight": params["unembed"].T,
      "model.layers.1.self_attn.q_proj.weight": layers["attn"]["q"][1].reshape(32, 32).T,
      "model.layers.0.self_attn.k_proj.weight": layers["attn"]["k"][0].reshape(32, 16).T,
      "model.layers.1.self_attn.o_proj.weight": layers["attn"]["o"][1].reshape(32, 32).T,
      "model.layers.0.mlp.gate_proj.weight": layers["mlp"]["gate"][0].T,
      "model.layers.1.mlp.down_proj.weight": layers["mlp"]["down"][1].T,
      "model.layers.1.input_layernorm.weight": layers["attn_norm"]["scale"][1],
  }
  for name, value in expected.items():
    np.testing.assert_array_equal(bits(tensors[name]), bits(value), err_msg=name)
  again = load_params(tmp_path / "out", cfg)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bits(a), bits(b))


def test_export_holds_about_one_tensor_on_the_host(tmp_path, monkeypatch):
  # Every matrix the same size (512 x 512 float32 = 1 MiB), 4 layers: 30 of them, 30 MiB in all.
  cfg = ModelConfig(vocab_size=512, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=512, tie_embeddings=False)
  params = random_params(cfg)
  largest = max(source.nbytes for source in hf_export._export_plan(params, cfg).values())
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  live, peak = [0], [0]
  gather = hf_export._gather

  def counted(leaf, layer):  # a host copy numpy allocates (so tracemalloc sees it), counted while alive
    value = np.array(gather(leaf, layer))
    live[0] += value.nbytes
    peak[0] = max(peak[0], live[0])
    weakref.finalize(value, lambda n=value.nbytes: live.__setitem__(0, live[0] - n))
    return value

  monkeypatch.setattr(hf_export, "_gather", counted)
  monkeypatch.setattr(safetensors_io, "_CHUNK_BYTES", largest // 8)  # transposes are copied out in eighths
  export_model(params, cfg, tmp_path / "warm", "llama", max_shard_bytes=3 * largest)  # compile the per-layer slicing first
  tracemalloc.start()
  try:
    export_model(params, cfg, tmp_path / "out", "llama", max_shard_bytes=3 * largest)
    _, traced_peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak[0] == largest  # never two gathered tensors alive at once
  assert traced_peak < 1.5 * largest < total / 10, (traced_peak, largest, total)
  print(f"export peak: {traced_peak} B traced, {peak[0]} B gathered at once; largest tensor {largest} B; model {total} B")
  written = {}
  for path in (tmp_path / "out").glob("*.safetensors"):
    written.update(safetensors.numpy.load_file(path))
  reference = to_hf_tensors(params, cfg)
  assert written.keys() == reference.keys() and len(list((tmp_path / "out").glob("*.safetensors"))) > 1
  for name, value in reference.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)


def test_only_process_0_writes_but_every_process_gathers(tmp_path, monkeypatch):
  params = random_params(LLAMA)
  gathered = []
  gather = hf_export._gather
  monkeypatch.setattr(hf_export, "_gather", lambda leaf, layer: gathered.append(layer) or gather(leaf, layer))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  export_model(params, LLAMA, tmp_path / "out", "llama", max_shard_bytes=12_000)
  assert not (tmp_path / "out").exists()
  assert len(gathered) == len(hf_export._export_plan(params, LLAMA))  # one gather per tensor, as on process 0


def test_stream_writer_matches_the_package_for_every_dtype(tmp_path):
  rng = np.random.default_rng(0)
  dtypes = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
  tensors = {f"t{i}.{np.dtype(d).name}": (rng.normal(size=(3, 5)) * 50).astype(d) for i, d in enumerate(reversed(dtypes))}
  tensors["z.transposed"] = rng.normal(size=(7, 4)).astype(np.float32).T  # strided: written in chunks
  tensors["m.empty"] = np.zeros((0, 3), np.float32)
  specs = {name: (t.dtype, t.shape) for name, t in tensors.items()}
  for metadata in (None, {"format": "pt"}):
    contiguous = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    safetensors.numpy.save_file(contiguous, tmp_path / "package.safetensors", metadata=metadata)
    with safetensors_io.StreamWriter(tmp_path / "stream.safetensors", specs, metadata) as writer:
      for name in safetensors_io.write_order(specs):
        writer.write(name, tensors[name])
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "package.safetensors").read_bytes()
  with pytest.raises(ValueError, match="out of order"):
    with safetensors_io.StreamWriter(tmp_path / "bad.safetensors", specs) as writer:
      writer.write("z.transposed", tensors["z.transposed"])
  with pytest.raises(ValueError, match="unwritten"):
    with safetensors_io.StreamWriter(tmp_path / "bad.safetensors", specs) as writer:
      pass
  assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.tmp").exists()
