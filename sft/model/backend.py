"""Whether the model traces its CPU-tuned code: the one switch between what XLA:CPU runs fast and what
GPUs and TPUs run.

Three places multiply differently on CPU, each saying why beside its code: the projections
(`sft.model.layers._contract`), the unembedding's backward pass (`sft.model.transformer.unembed_logits`)
and decoding's (out, in) weight copies (`sft.evaluator.generate.generate`). By default they follow
`jax.default_backend()`; `cpu_kernels(False)` makes a CPU trace the accelerators' code (how the tests
run that code at all, CI having no accelerator), `cpu_kernels(True)` the reverse. `SFT_CPU_KERNELS=0`
or `=1` sets the default for a whole process (a test file or a benchmark run the other way, unedited).

The choice is made when a function is traced, and it is part of the key of JAX's caches of traces and
compilations (a `jax.make_user_context`): a jitted function called under the other setting is traced
again, never served the code traced for the first (as it would be with a plain global: `.lower` and
`jax.make_jaxpr` read that trace cache too).
"""

from __future__ import annotations

import functools
import os

import jax

from sft.errors import ConfigError

ENV = "SFT_CPU_KERNELS"

# None: the process default (ENV, else the backend). Made at import, as make_user_context asks: not
# concurrently with other JAX calls.
_SETTING = jax.make_user_context(default_value=None)


def cpu_kernels(enabled: bool | None):
  """A context manager: inside it, in this thread, code traced takes the CPU-tuned paths when
  `enabled`, the accelerators' when not, the process default when None.

      with cpu_kernels(False):  # the GPU/TPU code, on CPU
        logits_btv = jax.jit(model.apply)(variables, tokens_bt, positions_bt, segment_ids_bt)
  """
  if enabled is not None and not isinstance(enabled, bool):
    raise TypeError(f"cpu_kernels takes True, False or None, got {enabled!r}")
  return _SETTING(enabled)


def use_cpu_kernels() -> bool:
  """What code being traced now should take: the innermost `cpu_kernels` setting, else the default."""
  enabled = _SETTING.value
  return _default() if enabled is None else enabled


@functools.cache
def _default() -> bool:
  """SFT_CPU_KERNELS when set (read once), else whether JAX's default backend is the CPU."""
  value = os.environ.get(ENV, "")
  if value not in ("", "0", "1"):
    raise ConfigError(f"{ENV}={value!r}: set it to 1 (CPU-tuned code), 0 (the GPU/TPU code) or unset it")
  return jax.default_backend() == "cpu" if value == "" else value == "1"
