"""A Hugging Face model folder's tokenizer and chat template, with the loss mask taken from the template.

`tokenizer.json` is read with the `tokenizers` library (or `tokenizer.model` with SentencePiece);
the chat template (`tokenizer_config.json` or `chat_template.jinja`) is rendered with a sandboxed
jinja2 environment. Which tokens are the assistant's is found from the rendered template itself:
the assistant turn i spans the characters that `render(messages[:i + 1])` adds to
`render(messages[:i], add_generation_prompt=True)`, and a token is learned when it starts inside a
span. No string matching on role names.

Message content is plain text: a special token written inside a message (`<|im_start|>` in a user
turn) is spelled out with ordinary tokens, and only the special tokens the template itself writes
are special. The template renders in jinja's sandbox, bounded in time and in the size of what it
builds (`render_timeout_s`, `max_render_chars`).
"""

from __future__ import annotations

import contextvars
import json
import pathlib
import re
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jinja2
import jinja2.sandbox
import jinja2.utils
import numpy as np

from sft.pipeline.chat import validate_messages
from sft.pipeline.sentencepiece_proto import USER_DEFINED, piece_types, plain_text_model

MAX_RENDER_CHARS = 4_000_000  # a chat of ~1M tokens; also bounds any string or list the template builds
RENDER_TIMEOUT_S = 5.0
_limits: contextvars.ContextVar[tuple[float, int, float]] = contextvars.ContextVar("render_limits")
# A one-turn chat whose rendering shows what the template writes after an answer (see `end_of_turn_ids`).
_PROBE_ANSWER = "Paris is the capital of France."
_PROBE_CHAT = ({"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": _PROBE_ANSWER})
_SPACE = re.compile(r"\s*")


def _token_text(value: Any) -> str | None:
  """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


# --- bounded rendering: the sandbox stops unsafe attribute access; these stop runaway loops and sizes.


def _check_time() -> None:
  deadline, _, timeout = _limits.get((float("inf"), MAX_RENDER_CHARS, 0.0))
  if time.monotonic() > deadline:
    raise ValueError(f"chat template rendering took longer than render_timeout_s={timeout}")


def _check_size(value: Any) -> Any:
  limit = _limits.get((0.0, MAX_RENDER_CHARS, 0.0))[1]
  if isinstance(value, (str, list, tuple, dict)) and len(value) > limit:
    raise ValueError(f"chat template built a value of {len(value)} items, over max_render_chars={limit}")
  return value


class _TickingRange:
  """`range` whose iteration checks the deadline, so empty nested loops cannot run for hours."""

  def __init__(self, *args: int):
    self._range = jinja2.sandbox.safe_range(*args)  # at most MAX_RANGE items

  def __iter__(self):
    for i, value in enumerate(self._range):
      if i % 1024 == 0:
        _check_time()
      yield value

  def __len__(self) -> int:
    return len(self._range)

  def __getitem__(self, index):
    return self._range[index]


class _BoundedNamespace(jinja2.utils.Namespace):
  """`namespace()` whose attributes are size-checked: `{% set ns.s = ns.s ~ ns.s %}` cannot double forever."""

  def __setitem__(self, name: str, value: Any) -> None:
    _check_time()
    super().__setitem__(name, _check_size(value))


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  intercepted_binops = frozenset({"+", "*", "**"})

  def call_binop(self, context, operator, left, right):
    _check_time()
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
      if right * abs(left).bit_length() > 4096:
        raise ValueError(f"chat template computes {left} ** {right}, over max_render_chars")
    if operator == "*":
      seq, times = (left, right) if isinstance(right, int) else (right, left)
      limit = _limits.get((0.0, MAX_RENDER_CHARS, 0.0))[1]
      if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > limit:
        raise ValueError(f"chat template repeats a value {times} times, over max_render_chars={limit}")
    return _check_size(super().call_binop(context, operator, left, right))

  def call(self, context, obj, /, *args, **kwargs):  # functions, methods and macros (not filters)
    _check_time()
    return _check_size(super().call(context, obj, *args, **kwargs))


# --- special tokens --------------------------------------------------------------------------------


class _Special(NamedTuple):
  token_id: int
  lstrip: bool  # absorbs whitespace before it (tokenizers' AddedToken option)
  rstrip: bool
  restart: bool  # SentencePiece: text after it is a new sentence (dummy prefix), as it always was here


class _Chat(NamedTuple):
  text: str
  ids: list[int]
  offsets: list[tuple[int, int]]  # character offsets into text
  spans: list[tuple[int, int]]  # assistant turns in text


def _char_index(text: str) -> list[int]:
  """Maps a UTF-8 byte offset of `text` (SentencePiece's offsets) to a character offset."""
  index = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
  return [*index, len(text)]


def _breaks(text: str, strings: Sequence[str]) -> list[int]:
  """Positions just inside every occurrence of `strings` (overlapping ones too): cutting `text`
  there leaves no piece that holds a whole occurrence."""
  cuts = set()
  for string in strings:
    at = text.find(string)
    while at >= 0:
      cuts.add(at + 1)
      at = text.find(string, at + 1)
  return sorted(cuts)


class HFTokenizer:
  """Encodes text and renders chats the way the checkpoint's own template does."""

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder)
    config_path = self.folder / "tokenizer_config.json"
    self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if (self.folder / "tokenizer.json").exists():
      import tokenizers

      self._tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
      self._plain_tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
      self._plain_tok.encode_special_tokens = True  # special tokens in the text are spelled out
      self._sp = None
    elif (self.folder / "tokenizer.model").exists():
      import sentencepiece as spm

      model_proto = (self.folder / "tokenizer.model").read_bytes()
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
      self._plain_first, self._plain_rest = plain_text_model(model_proto), plain_text_model(model_proto, False)
      self._piece_types = piece_types(model_proto)
      self._tok = None
    else:
      raise FileNotFoundError(f"{self.folder} has neither tokenizer.json nor tokenizer.model")
    self.chat_template = self._find_template()
    self.bos_token = _token_text(self.config.get("bos_token"))
    self.eos_token = _token_text(self.config.get("eos_token"))
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise, range=_TickingRange, namespace=_BoundedNamespace)
    self._template = env.from_string(self.chat_template)
    self.max_render_chars, self.render_timeout_s = MAX_RENDER_CHARS, RENDER_TIMEOUT_S
    config_specials = {self.bos_token, self.eos_token, _token_text(self.config.get("unk_token"))}
    config_specials |= {_token_text(t) for t in (self.config.get("added_tokens_decoder") or {}).values()}
    config_specials = sorted((t for t in config_specials if t), key=len, reverse=True)
    # Splits the whole rendered text of a chat whose content holds no special string (the old way).
    self._special_pattern = re.compile("|".join(map(re.escape, config_specials)) if config_specials else r"(?!x)x")
    self._specials = self._find_specials(config_specials)
    strings = sorted(self._specials, key=len, reverse=True)
    self._any_special = re.compile("|".join(map(re.escape, strings)) if strings else r"(?!x)x")
    # Template-written specials, with tokenizers' whitespace stripping; group i + 1 is strings[i].
    self._special_strings = strings
    self._template_specials = re.compile(
        "|".join(
            (r"\s*" if self._specials[t].lstrip else "") + f"({re.escape(t)})" + (r"\s*" if self._specials[t].rstrip else "")
            for t in strings
        )
        or r"(?!x)x"
    )
    self.bos_id = self.token_id(self.bos_token) if self.bos_token else None
    self.eos_id = self.token_id(self.eos_token) if self.eos_token else None
    pad = _token_text(self.config.get("pad_token"))
    self.pad_id = self.token_id(pad) if pad else (self.eos_id if self.eos_id is not None else 0)
    self._end_of_turn: tuple[int, ...] | None = None  # found on first use: rendering may be slow or fail

  def _find_specials(self, config_specials: Sequence[str]) -> dict[str, _Special]:
    """The strings that are special tokens: what the template writes of them is one token each."""
    specials = {}
    if self._tok:
      for token_id, added in self._tok.get_added_tokens_decoder().items():
        if added.special:  # non-special added tokens are vocabulary, matched in any text
          specials[added.content] = _Special(token_id, added.lstrip, added.rstrip, False)
      for text in config_specials:
        if text not in specials and self._tok.token_to_id(text) is not None:
          specials[text] = _Special(self._tok.token_to_id(text), False, False, False)
      return specials
    for token_id, (piece, kind) in enumerate(self._piece_types):
      if kind == USER_DEFINED:  # SentencePiece matches these anywhere; its control pieces only by id
        specials[piece] = _Special(token_id, False, False, False)
    for text in config_specials:  # cut out before SentencePiece sees the text, which restarts after them
      if self._sp.piece_to_id(text) != self._sp.unk_id() or text == self._sp.id_to_piece(self._sp.unk_id()):
        specials[text] = _Special(self._sp.piece_to_id(text), False, False, True)
    return specials

  @property
  def control_strings(self) -> tuple[str, ...]:
    """The special tokens' strings (longest first): only the chat template writes them as tokens."""
    return tuple(self._special_strings)

  def _find_template(self) -> str:
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is for chats
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (self.folder / "chat_template.jinja").exists():
      template = (self.folder / "chat_template.jinja").read_text()
    if not template:
      raise ValueError(f"{self.folder} has no chat template (tokenizer_config.json chat_template or chat_template.jinja)")
    return template

  # --- text ---------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size() if self._tok else self._sp.get_piece_size()

  def token_id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token) if self._tok else self._sp.piece_to_id(token)
    if token_id is None or (self._sp is not None and token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id)):
      raise ValueError(f"token {token!r} from tokenizer_config.json is not in the vocabulary")
    return int(token_id)

  def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Template text, where every special string is a special token."""
    if self._tok:
      encoding = self._tok.encode(text, add_special_tokens=False)
      return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    # SentencePiece would spell out "</s>" written by a template: special tokens are cut out first.
    ids, offsets, at = [], [], 0
    for match in [*self._special_pattern.finditer(text), None]:
      end = match.start() if match else len(text)
      if end > at:
        self._sp_encode(self._sp, text, at, end, ids, offsets)
      if match:
        ids.append(self._sp.piece_to_id(match.group()))
        offsets.append(match.span())
        at = match.end()
    return ids, offsets

  @staticmethod
  def _sp_encode(processor, text: str, begin: int, end: int, ids: list, offsets: list) -> None:
    """Appends the pieces of text[begin:end], with SentencePiece's byte offsets made character offsets."""
    chunk = text[begin:end]
    char = _char_index(chunk)
    for piece in processor.encode(chunk, out_type="proto").pieces:
      ids.append(piece.id)
      offsets.append((begin + char[piece.begin], begin + char[piece.end]))

  def _encode_around(self, text: str, specials: Sequence[tuple[int, int, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """`text` with `specials` (begin, end, string) as special tokens and everything else as plain text."""
    ids, offsets, at, fresh = [], [], 0, True
    for begin, end, string in [*specials, (len(text), len(text), None)]:
      if begin > at:
        if self._tok:
          encoding = self._plain_tok.encode(text[at:begin], add_special_tokens=False)
          ids += encoding.ids
          offsets += [(at + b, at + e) for b, e in encoding.offsets]
        else:  # one SentencePiece sentence runs up to a restarting special: no dummy prefix inside it
          self._sp_encode(self._plain_first if fresh else self._plain_rest, text, at, begin, ids, offsets)
          fresh = False
      if string is not None:
        ids.append(self._specials[string].token_id)
        offsets.append((begin, end))
        fresh = self._specials[string].restart
      at = end
    return ids, offsets

  def encode(self, text: str) -> list[int]:
    """Plain text: special strings in `text` are spelled out, never special tokens."""
    if self._tok:
      return list(self._plain_tok.encode(text, add_special_tokens=False).ids)
    return self._plain_first.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    return self._tok.decode(ids, skip_special_tokens=True) if self._tok else self._sp.decode(ids)

  # --- chats --------------------------------------------------------------------------------------

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; ValueError past `max_render_chars` or `render_timeout_s`."""
    limits = _limits.set((time.monotonic() + self.render_timeout_s, self.max_render_chars, self.render_timeout_s))
    chunks, size = [], 0
    try:
      for chunk in self._template.generate(
          messages=list(messages),
          add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token or "",
          eos_token=self.eos_token or "",
      ):
        size += len(chunk)
        if size > self.max_render_chars:
          raise ValueError(f"chat template output is over max_render_chars={self.max_render_chars}")
        _check_time()
        chunks.append(chunk)
    except (OverflowError, RecursionError) as err:  # the sandbox's range bound, runaway macros
      raise ValueError(f"chat template cannot be rendered: {err}") from None
    finally:
      _limits.reset(limits)
    return "".join(chunks)

  def _spans(self, messages: Sequence[Mapping[str, str]], full: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      through = self.render(messages[: i + 1])
      if not (through.startswith(before) and full.startswith(through)):
        raise ValueError(
            "the chat template does not render a chat as a growing prefix, so the assistant tokens "
            "cannot be located from it"
        )
      spans.append((len(before), len(through)))
    return spans

  def _chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, spans: bool = False) -> _Chat:
    """Renders and encodes a chat, with special strings inside message content as plain text.

    Such content is rendered with a sentinel character inside every special string it holds, so
    the specials found in the rendered text are the template's own; the sentinels are then removed
    and the text is encoded around those specials.
    """
    forged = any(self._any_special.search(m["content"]) for m in messages if isinstance(m.get("content"), str))
    if not forged:  # the common case, encoded in one piece as before
      text = self.render(messages, add_generation_prompt)
      ids, offsets = self._encode_with_offsets(text)
      return _Chat(text, ids, offsets, self._spans(messages, text) if spans else [])
    taken = "".join(m["content"] for m in messages) + self.chat_template + (self.bos_token or "") + (self.eos_token or "")
    sentinel = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in taken)
    marked_messages = [{**m, "content": self._mark(m["content"], sentinel)} for m in messages]
    marked = self.render(marked_messages, add_generation_prompt)
    text = marked.replace(sentinel, "")
    if text != self.render(messages, add_generation_prompt):
      raise ValueError("the chat template reacts to special tokens inside message content; the chat cannot be rendered safely")
    removed = np.concatenate([[0], np.cumsum([ch == sentinel for ch in marked])])  # sentinels before each position
    specials = []
    for match in self._template_specials.finditer(marked):
      specials.append((int(match.start() - removed[match.start()]), int(match.end() - removed[match.end()]), self._special_strings[match.lastindex - 1]))
    ids, offsets = self._encode_around(text, specials)
    found = [(int(b - removed[b]), int(e - removed[e])) for b, e in self._spans(marked_messages, marked)] if spans else []
    return _Chat(text, ids, offsets, found)

  def _mark(self, content: str, sentinel: str) -> str:
    cuts = _breaks(content, [s for s in self._special_strings if len(s) > 1])
    return "".join(content[a:b] + (sentinel if b < len(content) else "") for a, b in zip([0, *cuts], [*cuts, len(content)]))

  def assistant_spans(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered chat, character spans of each assistant turn as the template writes it)."""
    chat = self._chat(messages, spans=True)
    return chat.text, chat.spans

  def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the rendered chat, and a mask that is 1 on tokens inside assistant spans."""
    reason = validate_messages(messages)
    if reason:
      raise ValueError(f"invalid chat record: {reason}")
    chat = self._chat(messages, spans=True)
    # As apply_chat_template does: the template writes any BOS itself, nothing is added.
    mask = [int(any(start <= begin < end for start, end in chat.spans)) for begin, _ in chat.offsets]
    return np.asarray(chat.ids, np.int32), np.asarray(mask, np.int32)

  def tokenize_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(text)
    ids = ([self.bos_id] if self.bos_id is not None else []) + ids + ([self.eos_id] if self.eos_id is not None else [])
    return np.asarray(ids, np.int32), np.ones(len(ids), np.int32)

  def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], str]:
    """(prompt tokens up to where the assistant's answer starts, reference answer)."""
    if not messages or messages[-1]["role"] != "assistant":
      raise ValueError("cannot make a prompt from this chat: the last turn is not the assistant's")
    return self._chat(messages[:-1], add_generation_prompt=True).ids, messages[-1]["content"]

  @property
  def end_of_turn_ids(self) -> tuple[int, ...]:
    """The special tokens the template writes right after an assistant message, up to the first text
    (whitespace aside): `<|im_end|>` (ChatML), `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma), `</s>` (Llama 2).

    Found by rendering a one-turn chat with a known answer. Empty when the template writes no special
    token there, or cannot render such a chat (it fails on every chat then, so nothing is lost)."""
    if self._end_of_turn is None:
      self._end_of_turn = self._find_end_of_turn()
    return self._end_of_turn

  def _find_end_of_turn(self) -> tuple[int, ...]:
    try:
      text = self.render(_PROBE_CHAT)
    except (jinja2.exceptions.TemplateError, ValueError, TypeError):
      return ()
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:  # the template rewrites answers: nothing to anchor on
      return ()
    ids, at = [], at + len(_PROBE_ANSWER)
    # Llama 2 writes " </s>", Phi-3 "<|end|>\n<|endoftext|>": whitespace between specials is skipped.
    while match := self._any_special.match(text, _SPACE.match(text, at).end()):
      ids.append(self._specials[match.group()].token_id)
      at = match.end()
    return tuple(ids)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end an answer: the tokenizer's eos, generation_config.json's, and the end of turn the
    chat template writes, which is often another token (Qwen's eos is `<|endoftext|>`, its turns end
    with `<|im_end|>`); without it answers run on and invent the next turn."""
    ids = {self.eos_id, *self.end_of_turn_ids} - {None}
    generation = self.folder / "generation_config.json"
    if generation.exists():
      eos = json.loads(generation.read_text()).get("eos_token_id")
      ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))
