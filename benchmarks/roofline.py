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
