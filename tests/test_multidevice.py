"""On 8 fake CPU devices (data 2 x fsdp 2 x tensor 2) the sharded step equals the 1-device step."""

import os

import numpy as np
import pytest
from fresh_process import run_json

pytestmark = pytest.mark.slow  # a fresh process on 8 fake devices


def test_sharded_step_matches_single_device():
  script = os.path.join(os.path.dirname(__file__), "multidevice_check.py")
  result, _ = run_json([script])
  np.testing.assert_allclose(result["multi_losses"], result["single_losses"], rtol=1e-5)
  assert result["max_param_diff"] < 1e-5
  # The parameters really are split: q (layers, embed, heads, head_dim) over fsdp and tensor.
  assert result["q_spec"] == "P(None, 'fsdp', 'tensor', None)"
  assert result["q_shard_shape"] == [2, 16, 2, 8]
  assert result["q_moment_specs"] == [result["q_spec"]] * 2  # Adam's mu and nu are split like q
