"""What a CPU allows a benchmark's two sides: matmul speed (the bound of a compute-bound step) and the
speed of reading memory (the bound of a decoding step, which reads every weight once per new token),
each measured for JAX and for PyTorch in the calling process."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def _best_seconds(run_jax, run_torch, repeats: int) -> tuple[float, float]:
  """The fastest of `repeats` interleaved runs of each side (each run once first: compile, warm up)."""
  run_jax(), run_torch()
  best_jax = best_torch = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    run_jax()
    best_jax = min(best_jax, time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_torch()
    best_torch = min(best_torch, time.perf_counter() - t0)
  return best_jax, best_torch


def matmul_gflops(n: int, repeats: int = 3) -> tuple[float, float]:
  """(JAX, PyTorch) GFLOP/s of one n x n x n float32 matmul, best of `repeats`."""
  import torch

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  ta = torch.ones((n, n))
  best_jax, best_torch = _best_seconds(lambda: f(a).block_until_ready(), lambda: torch.mm(ta, ta), repeats)
  return 2 * n**3 / best_jax / 1e9, 2 * n**3 / best_torch / 1e9


def read_gbps(n_bytes: int = 512 * 2**20, repeats: int = 5) -> tuple[float, float]:
  """(JAX, PyTorch) GB/s of reading one float32 array of `n_bytes` (its sum), best of `repeats`: more
  than the last-level cache, so each read comes from memory, as a decoding step's weights do."""
  import torch

  a = jnp.ones((n_bytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  ta = torch.ones(n_bytes // 4)
  best_jax, best_torch = _best_seconds(lambda: f(a).block_until_ready(), lambda: torch.sum(ta), repeats)
  return n_bytes / best_jax / 1e9, n_bytes / best_torch / 1e9


def projection_shapes(fields: dict) -> list[tuple[int, int]]:
  """(in, out) of every weight a Llama layer multiplies a token by (transformers' config field names)."""
  d, f, hd = fields["hidden_size"], fields["intermediate_size"], fields["head_dim"]
  q, kv = fields["num_attention_heads"] * hd, fields["num_key_value_heads"] * hd
  return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def matmul_seconds(fields: dict, rows: int, unembed: bool, repeats: int = 5) -> tuple[float, float]:
  """(JAX, PyTorch) seconds of the weight products alone of one forward pass over `rows` token rows: every
  layer's projections (2-D products) and, with `unembed`, the vocabulary projection of every row; no
  attention, norms or activations. Each library gets the faster of the two weight layouts, (in, out) and
  (out, in) (sft's decoding multiplies by (out, in) copies on CPU; torch's Linear stores that layout): a
  floor under any implementation's pass that multiplies with that library's kernels. Best of `repeats`,
  interleaved."""
  import numpy as np
  import torch

  shapes = projection_shapes(fields) * fields["num_hidden_layers"]
  if unembed:
    shapes.append((fields["hidden_size"], fields["vocab_size"]))
  rng = np.random.default_rng(0)
  weights = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
  inputs = {k: rng.standard_normal((rows, k), dtype=np.float32) for k in {s[0] for s in shapes}}
  # Each product's input is a fixed array of its width: the products cannot be skipped (their sums are
  # returned) and none waits on another's result, which only favours the floor.
  jax_x = {k: jnp.asarray(v) for k, v in inputs.items()}
  torch_x = {k: torch.from_numpy(v) for k, v in inputs.items()}
  best = []
  for out_in in (False, True):
    if out_in:
      jax_w, torch_w = [jnp.asarray(w.T.copy()) for w in weights], [torch.from_numpy(w.T.copy()) for w in weights]
      f = jax.jit(lambda xs, ws: sum(jnp.sum(xs[w.shape[1]] @ w.T) for w in ws))
      product = torch.nn.functional.linear
    else:
      jax_w, torch_w = [jnp.asarray(w) for w in weights], [torch.from_numpy(w) for w in weights]
      f = jax.jit(lambda xs, ws: sum(jnp.sum(xs[w.shape[0]] @ w) for w in ws))
      product = torch.matmul

    def run_torch(torch_w=torch_w, product=product, out_in=out_in):
      with torch.inference_mode():
        return sum(float(product(torch_x[w.shape[1] if out_in else w.shape[0]], w).sum()) for w in torch_w)

    best.append(_best_seconds(lambda f=f, jax_w=jax_w: f(jax_x, jax_w).block_until_ready(), run_torch, repeats))
  return min(b[0] for b in best), min(b[1] for b in best)
