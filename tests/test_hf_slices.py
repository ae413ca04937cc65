"""Hugging Face weights load shard by shard: each device's box of a parameter maps back to one box of
its HF tensor, and only that box is read from the files."""

import os

import numpy as np
import pytest
from fresh_process import run_json

from sft.hf import weights

LAYOUTS = sorted(
    {layout for table in (weights.LAYER_TENSORS, weights.TOP_TENSORS, weights.SANDWICH_NORMS, weights.GPT2_LAYER_TENSORS, weights.GPT2_TOP_TENSORS)
     for _, layout in table.values()},
    key=repr,
)  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_every_box_of_a_parameter_is_one_box_of_its_hf_tensor(layout):
  rng = np.random.default_rng(0)
  ndim = len(layout.perm) or 2
  for _ in range(30):
    sft_shape = tuple(int(n) for n in rng.integers(1, 6, ndim))
    hf = rng.normal(size=layout.hf_shape(sft_shape)).astype(np.float32)
    full = layout.to_sft(hf, sft_shape)
    assert full.shape == sft_shape
    np.testing.assert_array_equal(layout.to_hf(full), hf)
    starts = [int(rng.integers(0, n)) for n in sft_shape]
    box = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, sft_shape))
    hf_box, finish = layout.region(box, sft_shape)
    np.testing.assert_array_equal(finish(hf[hf_box]), full[box])
    # Exactly the box's elements are read unless a split axis below the outermost of its group is cut.
    whole_inner = all(box[i] == slice(0, sft_shape[i]) for i in _inner_axes(layout, ndim))
    read = hf[hf_box].size
    assert read == full[box].size if whole_inner else read >= full[box].size


def _inner_axes(layout, ndim):
  """sft axes that are a non-outermost factor of a split HF axis."""
  perm = layout.perm or tuple(range(ndim))
  inner, a = [], 0
  for g in layout.groups or (1,) * ndim:
    inner += [perm.index(j) for j in range(a + 1, a + g)]
    a += g
  return inner


@pytest.mark.slow
def test_sharded_loading_on_8_devices_reads_each_shard_once():
  script = os.path.join(os.path.dirname(__file__), "hf_slice_check.py")
  result, _ = run_json([script])
  for name, r in result["families"].items():
    # The sharded load equals the parameters written and the unsharded (whole-tensor) load, bit for bit.
    assert r["equal_written"] and r["equal_unsharded"] and r["placed"], name
    # Each distinct shard reads exactly its own bytes; its replicas read nothing more.
    assert r["exact_reads"] + r["cached_reads"] == r["calls"] and r["exact_reads"] > 0, name
    assert r["bytes_read"] == r["bytes_of_distinct_shards"], name
    # q (L, D, heads, head_dim) over fsdp x tensor: each device reads an eighth of it.
    assert r["q_spec"] == "P(None, 'fsdp', 'tensor', None)", name
    assert set(r["q_read_per_device"]) == {r["q_tensor_bytes"] // 8}, name
  for name in ("llama", "gpt2"):  # head_dim cut too: whole heads are read, values still exact
    r = result["families"][name]
    assert r["odd_equal"] and r["odd_reads_bounded"] and r["odd_over_reads"] > 0, name
    # Exporting the sharded parameters writes the bytes of exporting them from the host.
    assert r["export_same_bytes"] and r["export_files"] > 1, name
  assert result["bf16"] == {"equal": True, "dtype": "float32", "exact_reads": True, "q_bits": True}
  assert result["lora"] == {"base_is_loaded": True, "adapter_count": 6, "placed": True, "b_zero": True, "logits_max_diff": 0.0}
