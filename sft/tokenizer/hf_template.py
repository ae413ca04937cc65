"""The chat template's jinja environment: sandboxed, bounded in time and in the size of what it builds
(`render_timeout_s`, `max_render_chars`, set per rendering through `limits`), and watched: `Watched` wraps
a chat's messages so that one rendering records where the template's loop reaches each message, which
is where a shorter chat's rendering would end (see `Watch`). sft.tokenizer.hf_tokenizer renders with it.
"""

from __future__ import annotations

import bisect
import contextvars
import sys
import time
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import jinja2.utils

MAX_RENDER_CHARS = 4_000_000  # a chat of ~1M tokens; also bounds any string or list the template builds
RENDER_TIMEOUT_S = 5.0
RENDER_LIMITS: contextvars.ContextVar[tuple[float, int, float]] = contextvars.ContextVar("render_limits")
WATCHING: contextvars.ContextVar["Watch"] = contextvars.ContextVar("render_watch")


def raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


# --- bounded rendering: the sandbox stops unsafe attribute access; these stop runaway loops and sizes.


def check_time() -> None:
  deadline, _, timeout = RENDER_LIMITS.get((float("inf"), MAX_RENDER_CHARS, 0.0))
  if time.monotonic() > deadline:
    raise ValueError(f"chat template rendering took longer than render_timeout_s={timeout}")


def check_size(value: Any) -> Any:
  limit = RENDER_LIMITS.get((0.0, MAX_RENDER_CHARS, 0.0))[1]
  if isinstance(value, (str, list, tuple, dict)) and len(value) > limit:
    raise ValueError(f"chat template built a value of {len(value)} items, over max_render_chars={limit}")
  return value


class TickingRange:
  """`range` whose iteration checks the deadline, so empty nested loops cannot run for hours."""

  def __init__(self, *args: int):
    self._range = jinja2.sandbox.safe_range(*args)  # at most MAX_RANGE items

  def __iter__(self):
    for i, value in enumerate(self._range):
      if i % 1024 == 0:
        check_time()
      yield value

  def __len__(self) -> int:
    return len(self._range)

  def __getitem__(self, index):
    return self._range[index]


class BoundedNamespace(jinja2.utils.Namespace):
  """`namespace()` whose attributes are size-checked: `{% set ns.s = ns.s ~ ns.s %}` cannot double forever."""

  def __setitem__(self, name: str, value: Any) -> None:
    check_time()
    watch = WATCHING.get(None)
    if watch is not None:
      watch.namespace_writes.append(watch.step())
    super().__setitem__(name, check_size(value))


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  intercepted_binops = frozenset({"+", "*", "**"})

  def call_binop(self, context, operator, left, right):
    check_time()
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
      if right * abs(left).bit_length() > 4096:
        raise ValueError(f"chat template computes {left} ** {right}, over max_render_chars")
    if operator == "*":
      seq, times = (left, right) if isinstance(right, int) else (right, left)
      limit = RENDER_LIMITS.get((0.0, MAX_RENDER_CHARS, 0.0))[1]
      if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > limit:
        raise ValueError(f"chat template repeats a value {times} times, over max_render_chars={limit}")
    return check_size(super().call_binop(context, operator, left, right))

  def call(self, context, obj, /, *args, **kwargs):  # functions, methods and macros (not filters)
    check_time()
    return check_size(super().call(context, obj, *args, **kwargs))


# --- one rendering in place of one per prefix --------------------------------------------------------


class Watch:
  """What a template did with `messages` during one rendering, in order, with the output length at each step.

  Rendering `messages[:k]` runs exactly as rendering the whole chat until the template first sees a
  difference: its loop asking for message k (a shorter chat ends there), or a look at message k or
  later, at the length, or from the end. When the only difference is the loop's end, the shorter
  rendering is the whole one's text up to that point followed by what the template writes after its
  loop, which is the same for every k when nothing carries state out of the loop (a `namespace`) and
  nothing looks at `messages` after it."""

  def __init__(self):
    self.size = [0]  # the output so far, kept up to date by `render`
    self.steps = 0  # orders the events below
    self.passes: list[tuple[int, list[tuple[int, int]]]] = []  # per loop: (first index, [(step, size)] per fetch)
    self.lookups: list[tuple[int, int]] = []  # (step, index) of messages[index]
    self.namespace_writes: list[int] = []  # steps
    self.other = False  # anything else: len, negative indices, reversed, printing, a peeking loop

  def step(self) -> int:
    self.steps += 1
    return self.steps

  def ends(self, needed: Sequence[int], n: int) -> list[int] | None:
    """The output length where the rendering of `messages[:k]` leaves this one, for each k in
    `needed` (all in 1..n); None when that is not simply where the loop asks for message k."""
    if self.other or len(self.passes) != 1:
      return None
    start, fetched = self.passes[0]
    if len(fetched) != n + 1 - start or min(needed) <= start:  # cut short, or a shorter chat's loop never runs
      return None
    steps, sizes = [0] * start + [f[0] for f in fetched], [0] * start + [f[1] for f in fetched]
    if any(sizes[k - 1] >= sizes[k] for k in needed):  # nothing written for a turn: buffered (a macro), or skipped
      return None
    if any(t > steps[start] for t in self.namespace_writes) or any(t > steps[n] for t, _ in self.lookups):
      return None
    ks = sorted(needed)
    for t, index in self.lookups:  # messages[index] read before the loop reached k <= index: k diverges there
      if index < n:
        first_later = bisect.bisect_right(steps, t)  # the first k whose fetch comes after this lookup
        at = bisect.bisect_left(ks, first_later)
        if at < len(ks) and ks[at] <= index:
          return None
    return [sizes[k] for k in needed]


class Watched:
  """`messages` for the template, noting every observation in a `Watch` (see there)."""

  def __init__(self, items: Sequence[Any], watch: Watch, start: int = 0):
    self._items, self._watch, self._start = items, watch, start

  def __iter__(self):
    watch, fetched = self._watch, []
    watch.passes.append((self._start, fetched))  # a slice's loop (messages[1:]) fetches from `start` on
    for index in range(self._start, len(self._items) + 1):
      if sys._getframe(1).f_code.co_name == "_peek_next":  # loop.last / loop.nextitem look one ahead
        watch.other = True
      fetched.append((watch.step(), watch.size[0]))
      if index == len(self._items):
        return
      yield self._items[index]

  def __getitem__(self, key):
    if isinstance(key, slice) and key.step in (None, 1) and key.stop is None and (key.start or 0) >= 0:
      return Watched(self._items, self._watch, min(self._start + (key.start or 0), len(self._items)))
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
      self._watch.lookups.append((self._watch.step(), self._start + key))
      return self._items[self._start + key]
    self._watch.other = True
    return list(self._items[self._start :])[key]

  def __bool__(self) -> bool:
    self._watch.lookups.append((self._watch.step(), self._start))
    return self._start < len(self._items)

  def _seen_whole(self) -> list:
    self._watch.other = True
    return list(self._items[self._start :])

  def __len__(self) -> int:
    return len(self._seen_whole())

  def __reversed__(self):
    return reversed(self._seen_whole())

  def __contains__(self, item) -> bool:
    return item in self._seen_whole()

  def __eq__(self, other) -> bool:
    return self._seen_whole() == other

  __hash__ = None

  def __str__(self) -> str:
    return str(self._seen_whole())

  __repr__ = __str__

  def __getattr__(self, name: str):  # list methods (count, index, ...)
    return getattr(self._seen_whole(), name)
