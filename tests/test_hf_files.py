"""Hostile Hugging Face folders: damaged safetensors files and headers, index entries outside the
folder, any config.json or index content: each is an error naming the file (and key), never a crash."""

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hf import _VALID, _hf_model, _tensors

from sft.errors import ConfigError
from sft.hf import config as hf_config
from sft.hf import export_model, from_hf_config, load_model, safetensors_io
from sft.model import ModelConfig


def test_truncated_safetensors_files_are_value_errors_naming_the_file(tmp_path):
  _hf_model("llama", tmp_path)
  path = tmp_path / "model.safetensors"
  raw = path.read_bytes()
  for data in (raw[:-100], raw[:4], b"not a safetensors file at all"):
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
      load_model(tmp_path)


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute", "missing.safetensors"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, where):
  folder = tmp_path / "model"
  _hf_model("llama", folder)
  names = list(_tensors(folder))
  outside = shutil.move(folder / "model.safetensors", tmp_path / "outside.safetensors")  # a valid file, so only the path is wrong
  target = str(outside) if where == "absolute" else where
  index = {"metadata": {}, "weight_map": {name: target for name in names}}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  if where == "missing.safetensors":
    with pytest.raises(FileNotFoundError, match="names missing.safetensors"):
      load_model(folder)
    return
  with pytest.raises(ValueError, match="not a file inside"):
    load_model(folder)


def _safetensors_bytes(header, data=b"", length=None):
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_F32 = lambda begin, end, shape=(1,): {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}  # noqa: E731
HEADER_DEFECTS = {
    "header not a dict": (_safetensors_bytes([1, 2]), "invalid JSON"),
    "header length beyond the file": (_safetensors_bytes({"a": _F32(0, 4)}, b"\0" * 4, length=10_000), "invalid header length"),
    "header length absurd": (_safetensors_bytes({}, length=2**63), "header too large"),
    "negative offset": (_safetensors_bytes({"a": _F32(-4, 0)}, b"\0" * 8), "expected usize"),
    "offsets past the end": (_safetensors_bytes({"a": _F32(0, 16, (4,))}, b"\0" * 8), "not fully covered"),
    "reversed offsets": (_safetensors_bytes({"a": _F32(8, 4, (0,))}, b"\0" * 8), "invalid offset for tensor `a`"),
    "overlapping tensors": (_safetensors_bytes({"a": _F32(0, 8, (2,)), "b": _F32(4, 12, (2,))}, b"\0" * 12), "invalid offset for tensor `b`"),
    "two tensors, one range": (_safetensors_bytes({"a": _F32(0, 8, (2,)), "b": _F32(0, 8, (2,))}, b"\0" * 8), "invalid offset for tensor"),
    "unknown dtype": (_safetensors_bytes({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown variant `F33`"),
    "shape x itemsize != bytes": (_safetensors_bytes({"a": _F32(0, 8, (3,))}, b"\0" * 8), "invalid shape, data type, or offset"),
    "shape overflows": (_safetensors_bytes({"a": _F32(0, 4, (2**62, 4))}, b"\0" * 4), "overflow"),
    "bytes left over": (_safetensors_bytes({"a": _F32(0, 4)}, b"\0" * 8), "not fully covered"),
    # Accepted by the package (the last entry wins), refused by safetensors_io:
    "a tensor listed twice": (_safetensors_bytes(b'{"a": ' + json.dumps(_F32(0, 4)).encode() + b', "a": ' + json.dumps(_F32(0, 8, (2,))).encode() + b"}", b"\0" * 8), "tensor 'a' is listed twice"),
}


@pytest.mark.parametrize("defect", HEADER_DEFECTS)
def test_malformed_safetensors_headers_are_value_errors_naming_the_file(tmp_path, defect):
  data, reason = HEADER_DEFECTS[defect]
  path = tmp_path / "model.safetensors"
  path.write_bytes(data)
  with pytest.raises(ValueError, match=re.escape(str(path))) as err:
    safetensors_io.open_checkpoint(tmp_path)
  assert reason in str(err.value)


def test_a_well_formed_hand_crafted_file_reads():
  # The control for the defects above: the same builder with valid offsets reads back.
  import tempfile

  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as f:
      f.write(_safetensors_bytes({"__metadata__": {"format": "pt"}, "a": _F32(0, 4), "b": _F32(4, 12, (2,))}, np.arange(3, dtype=np.float32).tobytes()))
    files = safetensors_io.open_checkpoint(folder)
    np.testing.assert_array_equal(files["b"].get("b"), [1.0, 2.0])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_KEYS = sorted(hf_config._READ | hf_config._GPT2_READ | {"model_type", "torch_dtype", "layer_types"})


@settings(max_examples=300, deadline=None)
@given(
    family=st.sampled_from(hf_config.FAMILIES),
    changes=st.dictionaries(st.sampled_from(_KEYS), _JSON | st.sampled_from([0, 1, 2, 16, 64, "llama", "silu", "llama3", False, True]), max_size=4),
    dropped=st.sets(st.sampled_from(sorted(_VALID)), max_size=2),
)
def test_any_config_json_gives_a_model_config_or_a_config_error(family, changes, dropped):
  hf = {k: v for k, v in {**_VALID, "model_type": family, **changes}.items() if k not in dropped}
  try:
    cfg = from_hf_config(json.loads(json.dumps(hf)), source="/m/config.json")  # as read from a file: NaN survives
  except ConfigError as err:
    assert "/m/config.json" in str(err)
    return
  assert isinstance(cfg, ModelConfig)


@settings(max_examples=100, deadline=None)
@given(hf=st.dictionaries(st.text(max_size=12), _JSON, max_size=6) | _JSON)
def test_a_random_json_value_as_config_json_is_a_config_error(hf):
  with pytest.raises(ConfigError):
    from_hf_config(hf)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (json.dumps({**_VALID, "hidden_size": "big"}), "hidden_size='big': expected an integer"),
        (json.dumps({**_VALID, "hidden_size": True}), "hidden_size=True: expected an integer"),
        (json.dumps({k: v for k, v in _VALID.items() if k != "num_attention_heads"}), "has no num_attention_heads"),
        (json.dumps({**_VALID, "model_type": "bert"}), "model_type 'bert'"),
        (json.dumps({**_VALID, "model_type": ["llama"]}), r"model_type \['llama'\]"),
        (json.dumps({**_VALID, "rope_scaling": "linear"}), "rope_scaling='linear': expected an object"),
        (json.dumps({**_VALID, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope_scaling has no low_freq_factor"),
        (json.dumps({**_VALID, "tie_word_embeddings": "false"}), "tie_word_embeddings='false': expected true or false"),
        (json.dumps({**_VALID, "rms_norm_eps": 10**400}), "rms_norm_eps=.*expected a finite number"),
        (json.dumps({**_VALID, "layer_types": 3}), "layer_types=3: expected a list of strings"),
        (json.dumps({**_VALID, "num_key_value_heads": 3}), "must be a multiple of model.num_kv_heads"),
        (json.dumps({**_VALID, "num_hidden_layers": 2**70, "layer_types": ["full_attention"]}), "layer_types"),  # no list of 2**70 built
    ],
)
def test_malformed_config_json_is_a_config_error_naming_file_and_key(tmp_path, content, match):
  import ml_collections

  from sft.trainer.setup import model_config

  path = tmp_path / "config.json"
  path.write_text(content)
  with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + match):
    load_model(tmp_path)
  run = ml_collections.ConfigDict({"model": {"checkpoint": str(tmp_path), "dtype": "float32", "param_dtype": "float32"}})
  with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + match):
    model_config(run)


@pytest.mark.parametrize(
    "index, match",
    [
        ("{not json", "is not valid JSON"),
        ("[]", "has no weight_map"),
        (json.dumps({"metadata": {}}), "has no weight_map"),
        (json.dumps({"weight_map": ["model.safetensors"]}), "weight_map is a list"),
        (json.dumps({"weight_map": {"model.norm.weight": 3}}), r"weight_map\['model.norm.weight'\] is 3"),
        (json.dumps({"weight_map": {"model.norm.weight": ""}}), r"weight_map\['model.norm.weight'\] is ''"),
        (json.dumps({"weight_map": {"model.norm.weight": "..\\outside.safetensors"}}), "not a file inside"),
    ],
)
def test_malformed_index_is_a_config_error_naming_it(tmp_path, index, match):
  (tmp_path / "config.json").write_text(json.dumps(_VALID))
  path = tmp_path / "model.safetensors.index.json"
  path.write_text(index)
  with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + match):
    load_model(tmp_path)


def test_index_names_inside_the_folder_load(tmp_path):
  # "./x" and "sub/x" stay inside the folder, written lexically or resolved: both load.
  folder = tmp_path / "model"
  _hf_model("llama", folder)
  tensors = _tensors(folder)
  (folder / "sub").mkdir()
  shutil.move(folder / "model.safetensors", folder / "sub" / "model.safetensors")
  weight_map = {name: "./sub/model.safetensors" if i % 2 else "sub/model.safetensors" for i, name in enumerate(tensors)}
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, params = load_model(folder)
  np.testing.assert_array_equal(params["embedding"], tensors["model.embed_tokens.weight"])


def _with_ids(name, folder, **ids):
  """A tiny checkpoint whose config.json carries token ids and a context length, as real ones do."""
  import torch
  import transformers
  from test_hf import COMMON, FAMILIES

  config_cls, extra = FAMILIES[name]
  config = config_cls(**({} if name == "gpt2" else {**COMMON, "max_position_embeddings": 256}), **extra, **ids)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  model.save_pretrained(folder)
  return model


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_export_keeps_every_field_of_the_source_config(tmp_path, name):
  import torch
  import transformers

  hf = _with_ids(name, tmp_path / "source", bos_token_id=1, eos_token_id=2, pad_token_id=0)
  source = json.loads((tmp_path / "source" / "config.json").read_text())
  cfg, params = load_model(tmp_path / "source")
  out = export_model(params, cfg, tmp_path / "out", name, base_config=hf_config.read_hf_config(tmp_path / "source" / "config.json"))
  exported = json.loads((out / "config.json").read_text())
  # Every source field is kept, except what the model defines (GPT-2's dropout is 0: sft trains without it).
  defined = hf_config._model_fields(cfg, name, "float32")
  rewritten = () if name == "gpt2" else ("rope_theta", "rope_scaling")  # as rope_parameters
  assert exported == {**{k: v for k, v in source.items() if k not in rewritten}, **defined}
  assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (1, 2, 0)
  if name != "gpt2":
    assert exported["max_position_embeddings"] == 256
  again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert (again.config.eos_token_id, again.config.pad_token_id) == (2, 0)
  tokens = torch.tensor([[3, 4, 5, 6]])
  with torch.no_grad():
    np.testing.assert_allclose(again(tokens).logits.numpy(), hf(tokens).logits.numpy(), atol=1e-5, rtol=1e-5)
  with pytest.raises(ConfigError, match="model_type 'gpt2'"):
    hf_config.to_hf_config(cfg, "llama" if name == "gpt2" else name, base={**source, "model_type": "gpt2"})


def test_export_from_scratch_writes_token_ids_and_context(tmp_path):
  import jax
  import transformers

  from sft.hf.weights import abstract_params

  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_positions=512)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(cfg))
  out = export_model(params, cfg, tmp_path / "out", "llama", token_ids={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
  exported = json.loads((out / "config.json").read_text())
  assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"], exported["max_position_embeddings"]) == (1, 2, 0, 512)
  assert transformers.AutoConfig.from_pretrained(out).eos_token_id == 2
  with pytest.raises(ConfigError, match="token_ids: unknown keys"):
    hf_config.to_hf_config(cfg, "llama", token_ids={"eos_id": 2})


def test_weights_that_do_not_match_config_json_are_one_line_config_errors(tmp_path):
  _hf_model("llama", tmp_path)
  tensors = _tensors(tmp_path)
  path = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({**tensors, "model.norm.weight": np.zeros(65, np.float32)}, path)
  with pytest.raises(ConfigError) as err:
    load_model(tmp_path)
  message = str(err.value)
  assert "\n" not in message and str(path) in message and str(tmp_path / "config.json") in message
  assert "tensor model.norm.weight has shape (65,), the config needs (64,)" in message
  del tensors["model.norm.weight"]
  safetensors.numpy.save_file(tensors, path)
  with pytest.raises(ConfigError, match=r"missing: \['model.norm.weight'\].*do not match config.json"):
    load_model(tmp_path)
