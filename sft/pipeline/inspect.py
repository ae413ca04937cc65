"""What training sees: rows of token ids rendered token by token, the tokens the loss trains on marked.

A row of a packed batch (see sft/pipeline/dataset.py) holds several examples, its segments. Each one
is shown as the token sequence it came from: its first input token, then its targets; a target whose
loss_mask is 1 is a trained token. Per example: how many of its predicted tokens (its columns) are
trained, in how many spans, and a warning when a chat trains on none of them or on all of them (a
template that masks every turn or none, a prompt that fills the row) or on fewer spans than it has
assistant turns (a mask that keeps only the last turn).

    loss_mask   = [0, 0, 1, 1 | 0, 1]      segment_ids = [1, 1, 1, 1 | 2, 2]
    examples    = segment 1: columns 0-3, 2 of 4 trained in 1 span;  segment 2: columns 4-5, 1 of 2

Two renderings: ANSI text for a terminal (trained tokens on green, a line per example) and an HTML page,
in which every token's text goes through html.escape (message content is data, never markup). A
diagnostic over a few rows: plain loops, no grain, no JAX.
"""

from __future__ import annotations

import dataclasses
import html
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np

from sft.tokenizer.chat import ChatTokenizer

_CONTEXT = 8  # tokens decoded before each one, so a token's text keeps its leading space
_ANSI = {"trained": ("\x1b[30;42m", "\x1b[30;102m"), "prompt": ("\x1b[2m", "\x1b[2;4m"), "lead": ("\x1b[2;3m",) * 2}
_RESET = "\x1b[0m"
_BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")  # as sft/pipeline/dataset.py makes them
_EMPTY = "∅"  # shown for a token that adds no text of its own
_LEAVE = "\n\t"  # control characters shown as they are; every other one is spelled out


@dataclasses.dataclass(frozen=True)
class Example:
  """One packed example: columns [start, stop) of a row, `trained` of them with loss_mask 1."""

  row: int
  segment: int
  start: int
  stop: int
  trained: int
  spans: int  # runs of trained columns
  positions: tuple[int, int]  # the model's positions of its first and last column (they restart at 0)
  assistant_turns: int | None = None  # when the chat is known (one chat per row)

  @property
  def tokens(self) -> int:
    return self.stop - self.start

  @property
  def warning(self) -> str | None:
    return mask_warning(self.trained, self.tokens, self.spans, self.assistant_turns)

  def describe(self) -> str:
    spans = f" in {self.spans} span{'s' * (self.spans != 1)}" if self.trained else ""
    turns = self.assistant_turns
    turns = f"; {turns} assistant turn{'s' * (turns != 1)}" if turns is not None else ""
    return (
        f"row {self.row} example {self.segment} (columns {self.start}-{self.stop - 1}, "
        f"positions {self.positions[0]}-{self.positions[1]}): "
        f"{self.trained} of {self.tokens} tokens trained{spans}{turns}"
    )


def mask_warning(trained: int, tokens: int, spans: int, assistant_turns: int | None = None) -> str | None:
  """Why an example's loss mask looks wrong for a chat, or None.

  >>> mask_warning(0, 40, 0)
  'trains on no token (a template that masks every turn, or a prompt that fills the row)'
  >>> mask_warning(12, 40, 1, assistant_turns=2)
  'trains on 1 span but has 2 assistant turns: a mask that keeps only some turns (the last one?)'
  >>> mask_warning(12, 40, 2) is None
  True
  """
  if trained == 0:
    return "trains on no token (a template that masks every turn, or a prompt that fills the row)"
  if trained == tokens:
    return "trains on every token, its prompt too (a template that masks nothing, or a text record)"
  if assistant_turns and spans < assistant_turns:
    return (
        f"trains on {spans} span{'s' * (spans != 1)} but has {assistant_turns} assistant turns: "
        "a mask that keeps only some turns (the last one?)"
    )
  return None


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
  """(value, start, stop) of each run of equal values."""
  edges = [0, *(np.flatnonzero(np.diff(values)) + 1).tolist(), len(values)]
  return [(int(values[a]), a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def examples_of(batch: Mapping[str, np.ndarray], assistant_turns: Sequence[int] | None = None) -> list[Example]:
  """The examples of every row, in order (segment 0 is padding); `assistant_turns`: one per example."""
  found = []
  for row in range(batch["segment_ids"].shape[0]):
    mask, positions = np.asarray(batch["loss_mask"][row]), batch["positions"][row]
    for segment, start, stop in _runs(np.asarray(batch["segment_ids"][row])):
      if segment:
        part = mask[start:stop]
        spans = sum(1 for value, _, _ in _runs(part) if value)
        first_last = (int(positions[start]), int(positions[stop - 1]))
        found.append(Example(row, segment, start, stop, int(part.sum()), spans, first_last))
  if assistant_turns is not None:
    found = [dataclasses.replace(e, assistant_turns=n) for e, n in zip(found, assistant_turns, strict=True)]
  return found


def chat_batch(
    records: Sequence[Mapping[str, Any]], tokenizer: ChatTokenizer
) -> tuple[dict[str, np.ndarray], list[int]]:
  """One chat per row, whole (no packing, no seq_len), as the train pipeline shifts it; returns the batch
  and each chat's number of assistant turns. A chat the tokenizer refuses raises its ValueError."""
  rows, turns = [], []
  for record in records:
    tokens, mask = tokenizer.tokenize_chat(record["messages"])
    rows.append((tokens, mask))
    turns.append(sum(m.get("role") == "assistant" for m in record["messages"]))
  width = max((len(tokens) - 1 for tokens, _ in rows), default=0)
  batch = {k: np.zeros((len(rows), width), np.int32) for k in _BATCH_KEYS}
  for i, (tokens, mask) in enumerate(rows):
    n = len(tokens) - 1  # next-token pairs, as transforms.shift_and_truncate makes them
    batch["inputs"][i, :n], batch["targets"][i, :n], batch["loss_mask"][i, :n] = tokens[:-1], tokens[1:], mask[1:]
    batch["segment_ids"][i, :n], batch["positions"][i, :n] = 1, np.arange(n)
  return batch, turns


def _named_ids(tokenizer: ChatTokenizer) -> dict[int, str]:
  """Ids whose decoded text is empty (special tokens are skipped by decode), by name."""
  from sft.tokenizer import sentencepiece_tokenizer as sp  # noqa: PLC0415

  if isinstance(tokenizer, sp.Tokenizer):
    return {sp.PAD_ID: "<pad>", sp.UNK_ID: "<unk>", sp.BOS_ID: "<s>", sp.EOS_ID: "</s>"}
  names = {}
  token_id = getattr(tokenizer, "token_id", None)  # a Hugging Face folder's special tokens
  if token_id is not None:
    specials = (getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))
    for text in (*tokenizer.control_strings, *specials):
      try:
        names[token_id(text)] = text
      except (ValueError, TypeError):
        pass
  return names


def token_texts(tokenizer: ChatTokenizer, ids: Sequence[int]) -> list[str]:
  """The text each token adds to the decoded sequence: leading spaces kept, a character of several byte
  tokens on its last one (the others ""), a special token (which decode skips) by name.

  Joined, the texts of plain text's tokens are its decoded text."""
  ids = [int(i) for i in ids]
  names, texts, start = _named_ids(tokenizer), [], 0
  for i, token in enumerate(ids):
    if token in names:
      texts.append(names[token])
      start = i + 1
      continue
    low = max(0, start - _CONTEXT)
    before, text = tokenizer.decode(ids[low:start]), tokenizer.decode(ids[low : i + 1])
    if text.endswith("\ufffd") and i + 1 < len(ids) and i - start < 3:  # a character not yet complete
      texts.append("")
      continue
    new = text[len(before) :] if text.startswith(before) else tokenizer.decode([token])
    texts.append(new)
    start = i + 1
  return texts


def visible(text: str) -> str:
  """`text` safe to print: control and format characters (a terminal's escape sequences, bidi
  overrides) spelled out as `\\x1b`, newlines shown as ↵ before the break."""
  out = []
  for ch in text:
    if ch in _LEAVE:
      out.append("↵\n" if ch == "\n" else ch)
    elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
      code = ord(ch)
      out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    else:
      out.append(ch)
  return "".join(out)


def _example_tokens(
    batch: Mapping[str, np.ndarray], tokenizer: ChatTokenizer, example: Example
) -> list[tuple[str, str, int, int, int]]:
  """(kind, text, column or -1, id, position in the example) of its tokens: its first input ("lead"), then
  each target (the token that the input at that column, at the model's position p, predicts: p + 1)."""
  row, cols = example.row, range(example.start, example.stop)
  ids = [int(batch["inputs"][row, example.start]), *(int(batch["targets"][row, c]) for c in cols)]
  texts = [text or _EMPTY for text in token_texts(tokenizer, ids)]  # every token visible, a trained one above all
  tokens = [("lead", texts[0], -1, ids[0], int(batch["positions"][row, example.start]))]
  for c, text, token in zip(cols, texts[1:], ids[1:]):
    kind = "trained" if batch["loss_mask"][row, c] else "prompt"
    tokens.append((kind, text, c, token, int(batch["positions"][row, c]) + 1))
  return tokens


def _padding(batch: Mapping[str, np.ndarray], row: int) -> int:
  return int(np.sum(np.asarray(batch["segment_ids"][row]) == 0))


def summary(examples: Sequence[Example]) -> str:
  trained, tokens = sum(e.trained for e in examples), sum(e.tokens for e in examples)
  warned = sum(e.warning is not None for e in examples)
  head = f"{len(examples)} example{'s' * (len(examples) != 1)}, {trained} of {tokens} tokens trained"
  return head + (f"; {warned} with a warning" if warned else "")


def render_text(
    batch: Mapping[str, np.ndarray], tokenizer: ChatTokenizer, examples: Sequence[Example], *, color: bool
) -> str:
  """Every example of every row, a header line each; with `color` the tokens too, trained ones on green
  (alternating shades show where tokens end), prompt ones dim; without, the counts and warnings only."""
  lines = []
  for row in range(batch["segment_ids"].shape[0]):
    lines.append(f"── row {row} ({_padding(batch, row)} padding tokens)")
    for example in (e for e in examples if e.row == row):
      lines.append(f"  {example.describe()}")
      if example.warning:
        lines.append(f"  WARNING row {row} example {example.segment} {example.warning}")
      if color:
        tokens = _example_tokens(batch, tokenizer, example)
        parts = [_ANSI[kind][i % 2] + visible(text) + _RESET for i, (kind, text, *_) in enumerate(tokens)]
        lines.append("    " + "".join(parts).replace("\n", "\n    "))
  lines.append(summary(examples))
  return "\n".join(lines)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
pre { white-space: pre-wrap; word-break: break-all; background: #fafafa; border-left: 4px solid #888; padding: .5em; }
.example { margin: .8em 0 1.2em; }
.trained { background: #b7e4b7; }
.trained:nth-child(odd) { background: #8fd18f; }
.prompt { color: #666; }
.prompt:nth-child(odd) { color: #999; }
.lead { color: #999; font-style: italic; }
.warning { color: #b00; font-weight: bold; }
.count, .padding { margin: .2em 0; }
"""


def _html_token(kind: str, text: str, col: int, token: int, position: int) -> str:
  column = f' data-col="{col}"' if col >= 0 else ""
  return (
      f'<span class="{kind}"{column} data-id="{token}" title="position {position}, id {token}">'
      f"{html.escape(visible(text))}</span>"
  )


def render_html(
    batch: Mapping[str, np.ndarray], tokenizer: ChatTokenizer, examples: Sequence[Example], *, title: str,
    notes: Sequence[str] = (), row_names: Sequence[str] | None = None,
) -> str:
  """A self-contained page: per row its examples, each a <pre> of token <span>s (class trained, prompt or
  lead; data-col: the row's column, data-id: the token id), its count and warning. Every text it holds,
  `title`, `notes` and `row_names` (a name per row) included, is escaped."""
  esc = html.escape
  parts = [
      f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>',
      f"<style>{_STYLE}</style></head><body>",
      f"<h1>{esc(title)}</h1>",
      *(f'<p class="note">{esc(note)}</p>' for note in notes),
      f'<p class="summary">{esc(summary(examples))}. Trained tokens are green; a grey italic token starts each '
      "example (it is input only).</p>",
  ]
  for row in range(batch["segment_ids"].shape[0]):
    name = f": {html.escape(row_names[row])}" if row_names is not None else ""
    parts.append(f'<section class="row" data-row="{row}"><h2>row {row}{name}</h2>')
    for example in (e for e in examples if e.row == row):
      parts.append(
          f'<div class="example" data-row="{row}" data-segment="{example.segment}" data-start="{example.start}" '
          f'data-stop="{example.stop}" data-trained="{example.trained}">'
          f'<p class="count">{esc(example.describe())}</p>'
      )
      if example.warning:
        parts.append(f'<p class="warning">WARNING {esc(example.warning)}</p>')
      spans = [_html_token(*token) for token in _example_tokens(batch, tokenizer, example)]
      parts.append("<pre>" + "".join(spans) + "</pre></div>")
    parts.append(f'<p class="padding">{_padding(batch, row)} padding tokens</p></section>')
  parts.append("</body></html>\n")
  return "\n".join(parts)
