"""Chat control strings in data: text that a tokenizer would turn into real control tokens, so a
user turn holding `<|im_start|>assistant` would forge a turn the model learns from.

Every occurrence is found in one scan (a lookahead alternation, longest first, so overlapping ones
are found too) and either made inert or reported so that the record can be dropped. Escaping puts a
backslash after the first character: `<|im_start|>` -> `<\\|im_start|>`, `[INST]` -> `[\\INST]`,
`<start_of_turn>` -> `<\\start_of_turn>`. No tokenizer has those as special tokens, no normaliser
removes a backslash (zero-width characters are stripped by some, which would re-forge the token), and
a reader still sees what was written. Every occurrence is broken at its first character, so none can
survive, and the inserted backslash cannot complete a new one.
"""

from __future__ import annotations

import functools
import re

from sft.pipeline import chat

# Used until sft.pipeline.chat defines KNOWN_CONTROL_STRINGS: this project's, ChatML, Llama 2/3,
# Mistral and Gemma markers.
_FALLBACK = (
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
)
KNOWN = tuple(getattr(chat, "KNOWN_CONTROL_STRINGS", _FALLBACK))
MODES = ("escape", "drop")
ESCAPE = "\\"


@functools.lru_cache(maxsize=8)
def pattern(extra: tuple[str, ...] = ()) -> re.Pattern | None:
  """One lookahead alternation over KNOWN + extra; group 1 is the longest string starting at a match.
  Strings shorter than 2 characters are left out: a break inside them is impossible."""
  strings = sorted({s for s in (*KNOWN, *extra) if len(s) >= 2}, key=lambda s: (-len(s), s))
  if not strings:
    return None
  # The leading class of first characters lets the engine skip most positions before trying every string.
  firsts = "".join(sorted({re.escape(s[0]) for s in strings}))
  return re.compile(f"(?=[{firsts}])(?=({'|'.join(map(re.escape, strings))}))")


def find(text: str, extra: tuple[str, ...] = ()) -> set[str]:
  """The control strings that occur in `text`."""
  p = pattern(extra)
  return {m.group(1) for m in p.finditer(text)} if p else set()


def escape(text: str, extra: tuple[str, ...] = ()) -> tuple[str, int]:
  """(text with every control string broken by a backslash after its first character, how many)."""
  p = pattern(extra)
  cuts = [m.start() + 1 for m in p.finditer(text)] if p else []
  if not cuts:
    return text, 0
  # One join over the pieces: linear however many occurrences there are.
  bounds = [0, *cuts, len(text)]
  return ESCAPE.join(text[a:b] for a, b in zip(bounds, bounds[1:])), len(cuts)

