"""Chat control strings in data: text that a tokenizer would turn into real control tokens, so a
user turn holding `<|im_start|>assistant` would forge a turn the model learns from.

Text is matched as a normalising tokenizer may see it (`fold`): with Unicode's default-ignorable code
points removed (zero-width joiners, soft hyphens, bidi controls, variation selectors, tags) and each
character in NFKC, so `<|im_start|>` with a U+200D inside and the full-width `＜｜im_start｜＞` are control
strings too. Every occurrence is found in one scan (a lookahead alternation, longest first, so
overlapping ones are found too) and either made inert or reported so that the record can be dropped. Escaping puts a
backslash after the first character: `<|im_start|>` -> `<\\|im_start|>`, `[INST]` -> `[\\INST]`,
`<start_of_turn>` -> `<\\start_of_turn>`. No tokenizer has those as special tokens, no normaliser
removes a backslash, and a reader still sees what was written. Every occurrence is broken at its first
character, so none can survive, and the inserted backslash cannot complete a new one.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

from sft.tokenizer import chat

# Used until sft.tokenizer.chat defines KNOWN_CONTROL_STRINGS: this project's, ChatML, Llama 2/3,
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


# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt, Unicode 15), as inclusive ranges:
# invisible characters that many normalisers and tokenizers drop.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)


@functools.lru_cache(maxsize=1)
def _fold_table() -> dict[int, str]:
  """Code point -> what `fold` makes of it, for every one it changes (built once, in about 0.3 s)."""
  ignorable = {c for lo, hi in DEFAULT_IGNORABLE for c in range(lo, hi + 1)}
  table = dict.fromkeys(ignorable, "")
  for c in range(sys.maxunicode + 1):
    if c in ignorable or 0xD800 <= c <= 0xDFFF:
      continue
    folded = "".join(x for x in unicodedata.normalize("NFKC", chr(c)) if ord(x) not in ignorable)
    if folded != chr(c):
      table[c] = folded
  return table


def fold(text: str) -> str:
  """`text` without default-ignorable code points and with each character in NFKC: what a tokenizer
  whose normaliser drops the former or applies the latter reads. ASCII text is its own fold."""
  return text if text.isascii() else text.translate(_fold_table())


def _origins(text: str) -> list[int]:
  """For each character of fold(text), the index in `text` of the character it comes from."""
  table = _fold_table()
  return [i for i, ch in enumerate(text) for _ in range(len(table.get(ord(ch), ch)))]


@functools.lru_cache(maxsize=8)
def pattern(extra: tuple[str, ...] = ()) -> re.Pattern | None:
  """One lookahead alternation over KNOWN + extra, folded; group 1 is the longest string starting at a
  match. Strings shorter than 2 characters are left out: a break inside them is impossible."""
  strings = sorted({f for s in (*KNOWN, *extra) if len(f := fold(s)) >= 2}, key=lambda s: (-len(s), s))
  if not strings:
    return None
  # The leading class of first characters lets the engine skip most positions before trying every string.
  firsts = "".join(sorted({re.escape(s[0]) for s in strings}))
  return re.compile(f"(?=[{firsts}])(?=({'|'.join(map(re.escape, strings))}))")


@functools.lru_cache(maxsize=8)
def _first_characters(extra: tuple[str, ...] = ()) -> frozenset[str]:
  """The characters `pattern(extra)`'s strings start with: a text holding none of them (most) holds none."""
  return frozenset(f[0] for s in (*KNOWN, *extra) if len(f := fold(s)) >= 2)


def _matches(folded: str, extra: tuple[str, ...]) -> list[re.Match]:
  """Every occurrence of a control string in the folded text (a few `in` tests decide most texts)."""
  p = pattern(extra)
  if p is None or not any(c in folded for c in _first_characters(extra)):
    return []
  return list(p.finditer(folded))


def find(text: str, extra: tuple[str, ...] = ()) -> set[str]:
  """The control strings (folded) that occur in fold(text)."""
  return {m.group(1) for m in _matches(fold(text), extra)}


def escape(text: str, extra: tuple[str, ...] = ()) -> tuple[str, int]:
  """(text with every control string broken by a backslash after its first character, how many).
  Found in fold(text), each is broken in `text` after the character its first folded character comes
  from, so the backslash lands inside the occurrence whatever was hidden or widened in it."""
  folded = fold(text)
  starts = [m.start() for m in _matches(folded, extra)]
  if not starts:
    return text, 0
  origin = _origins(text) if folded is not text else range(len(text))
  cuts = sorted({origin[start] + 1 for start in starts})
  # One join over the pieces: linear however many occurrences there are.
  bounds = [0, *cuts, len(text)]
  return ESCAPE.join(text[a:b] for a, b in zip(bounds, bounds[1:])), len(starts)
