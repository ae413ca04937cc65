"""Where a jitted function's time goes on CPU, by the model code that produced each operation.

`breakdown(hlo_text, trace_dir)` reads a `jax.profiler.trace` of one call: every operation XLA:CPU ran
(a fusion, a library matmul, a copy) is a timed event on one of its worker threads, named as the
instruction in the compiled HLO (`hlo_text`), whose metadata names the jax operation and the module
path that produced it (`.../Block_3/mlp/dot_general`). Times are summed per source, labelled forward,
backward or update (outside the gradient) and with layer numbers folded together (`Block_*`), so "the
MLP's products in the backward pass" is one line whatever the depth. Times are thread time: an
operation that runs while another runs on the second core counts in full, so the lines can add up to
more than the wall time. CPU runs only: GPUs and TPUs record their kernels on device planes.
"""

from __future__ import annotations

import collections
import glob
import os
import re

from jax.profiler import ProfileData

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")
_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_WORKER_THREAD = "tf_XLAEigen"  # XLA:CPU's intra-op pool: the threads that run the compiled operations
_NOT_AN_OPERATION = ("ThunkExecutor", "SlinkyThreadPool", "end: ")  # the executor's own spans


def source_label(op_name: str) -> str:
  """`jit(step)/transpose(jvp(Transformer))/Transformer._layers_one_by_one/Block_3/mlp/dot_general` ->
  `backward: Block_*/mlp/dot_general`; an operation a rematerialised layer recomputes for the backward
  pass is `backward, recomputed: ...`; the scanned layer's loop plumbing is left out of the path."""
  op = re.sub(r"^jit\([^)]*\)/", "", op_name.split(";")[0])
  phase, grad = "update", re.match(r"(transpose\()?jvp\([^)]*\)\)?/", op)
  if grad:
    phase, op = ("backward" if grad.group(1) else "forward"), op[grad.end() :]
  if "rematted_computation/" in op:
    phase += ", recomputed"
  op = re.sub(r"(while/body|closed_call|checkpoint|rematted_computation)/", "", op)
  op = re.sub(r"^Transformer(\._layers_one_by_one)?/", "", op)
  return f"{phase}: " + re.sub(r"(Block|layers)_\d+", r"\1_*", op)


def source_ops(hlo_text: str) -> dict[str, str]:
  """Instruction name -> `source_label` of the jax operation that produced it."""
  return {m.group(1): source_label(m.group(2)) for m in map(_INSTRUCTION.match, hlo_text.splitlines()) if m}


def operation_times_ns(trace_dir: str, instructions: set[str] | frozenset = frozenset()) -> collections.Counter:
  """Instruction name -> nanoseconds summed over every run of it. With `instructions` (the compiled
  program's names), every thread's events of those names count: XLA:CPU runs an operation on its worker
  pool, but some on the client's own thread (a loop body among them, seen on a busy machine); without, the
  worker threads' events alone."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no profile (*.xplane.pb) under {trace_dir}")
  times = collections.Counter()
  for plane in ProfileData.from_file(max(paths, key=os.path.getmtime)).planes:
    for line in plane.lines:
      if not instructions and not line.name.startswith(_WORKER_THREAD):
        continue
      for event in line.events:
        if (event.name in instructions) if instructions else not event.name.startswith(_NOT_AN_OPERATION):
          times[event.name] += event.duration_ns
  if not times:
    raise ValueError(f"no XLA:CPU operation in the profile under {trace_dir}: it reads traces of CPU runs only")
  return times


def breakdown(hlo_text: str, trace_dir: str, top: int | None = None) -> list[tuple[float, float, str]]:
  """(thread-ms, share of all operation time, source), most expensive first: the `top` ones, or all."""
  sources = source_ops(hlo_text)
  by_source = collections.Counter()
  names = frozenset(m.group(1) for m in map(_NAME.match, hlo_text.splitlines()) if m)
  for name, ns in operation_times_ns(trace_dir, names).items():
    by_source[sources.get(name) or "(no source) " + re.sub(r"[.]\d+$", "", name)] += ns
  total = sum(by_source.values()) or 1
  return [(ns / 1e6, ns / total, source) for source, ns in by_source.most_common(top)]


def print_breakdown(rows: list[tuple[float, float, str]], wall_s: float, top: int = 25) -> None:
  print(f"where the step's time goes (thread-ms over XLA's worker threads; one step took {wall_s:.3f} s wall):")
  for ms, share, source in rows[:top]:
    print(f"{ms:9.1f} ms {share:6.1%}  {source}")
