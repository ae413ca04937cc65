"""On 8 fake CPU devices (data 2 x fsdp 2 x tensor 2) the sharded step equals the 1-device step."""

import json
import os
import subprocess
import sys

import numpy as np


def test_sharded_step_matches_single_device():
  script = os.path.join(os.path.dirname(__file__), "multidevice_check.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(result["multi_losses"], result["single_losses"], rtol=1e-5)
  assert result["max_param_diff"] < 1e-5
  # The parameters really are split: q (layers, embed, heads, head_dim) over fsdp and tensor.
  assert result["q_spec"] == "P(None, 'fsdp', 'tensor', None)"
  assert result["q_shard_shape"] == [2, 16, 2, 8]
  assert result["q_moment_specs"] == [result["q_spec"]] * 2  # Adam's mu and nu are split like q
