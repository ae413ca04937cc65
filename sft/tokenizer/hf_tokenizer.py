"""A Hugging Face model folder's tokenizer and chat template, with the loss mask taken from the template.

`tokenizer.json` is read with the `tokenizers` library (or `tokenizer.model` with SentencePiece);
the chat template (`tokenizer_config.json` or `chat_template.jinja`) is rendered with a sandboxed
jinja2 environment. Which tokens are the assistant's is found from the rendered template itself:
the assistant turn i spans the characters that `render(messages[:i + 1])` adds to
`render(messages[:i], add_generation_prompt=True)`, and a token is learned when it starts inside a
span. No string matching on role names. Those prefixes are not rendered one by one (that is
quadratic in turns): one watched rendering of the chat notes where the template's loop reaches each
message, which is where a shorter chat's rendering would end (see `Watched`); templates it cannot
vouch for are rendered prefix by prefix as before.

Message content is plain text: a special or added token written inside a message (`<|im_start|>` in
a user turn, or a look-alike that the tokenizer's normalizer turns into one) is spelled out with
ordinary tokens, and only the tokens the template itself writes are special. The template renders
in jinja's sandbox, bounded in time and in the size of what it builds (`render_timeout_s`,
`max_render_chars`). A failure of the tokenizer library on a text (a Rust panic included) is a
`TokenizerFailure`; a folder that cannot be used is a `ConfigError` naming the file.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jinja2
import jinja2.sandbox
import jinja2.utils
import numpy as np

from sft.errors import ConfigError
from sft.tokenizer.chat import TokenizerFailure, validate_messages
from sft.tokenizer.hf_template import (
  MAX_RENDER_CHARS,
  RENDER_LIMITS,
  RENDER_TIMEOUT_S,
  WATCHING,
  BoundedNamespace,
  BoundedSandbox,
  TickingRange,
  Watch,
  Watched,
  check_time,
  raise_exception,
)
from sft.tokenizer.sentencepiece_proto import USER_DEFINED, piece_types, plain_text_model

# A one-turn chat whose rendering shows what the template writes after an answer (see `end_of_turn_ids`).
_PROBE_ANSWER = "Paris is the capital of France."
_PROBE_CHAT = ({"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": _PROBE_ANSWER})
_SPACE = re.compile(r"\s*")
# Unicode's default-ignorable code points: invisible, and dropped by some normalizers (BERT's clean_text),
# so `<|im_<U+200B>start|>` can turn into `<|im_start|>` inside the tokenizer.
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
_PASSING = (KeyboardInterrupt, SystemExit, GeneratorExit)  # never turned into a record's failure


def _library(fn, *args, **kwargs):
  """Calls the tokenizer library; its failures, pyo3's PanicException (a BaseException) included, are
  a `TokenizerFailure` the caller can pin on one record."""
  try:
    return fn(*args, **kwargs)
  except _PASSING:
    raise
  except BaseException as err:  # noqa: BLE001 (a Rust panic derives from BaseException)
    raise TokenizerFailure(f"the tokenizer failed on this text: {type(err).__name__}: {str(err)[:200]}") from None


def _token_text(value: Any) -> str | None:
  """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


class _NoTokenizer(ConfigError, FileNotFoundError):
  """A folder without tokenizer files: a ConfigError for the launcher, a FileNotFoundError as it always was."""


def _json_object(path: pathlib.Path) -> dict:
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
    raise ConfigError(f"{path} is not valid JSON: {err}") from None
  if not isinstance(value, dict):
    raise ConfigError(f"{path} must hold a JSON object, got {type(value).__name__}")
  return value


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


def _mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """1 on the tokens that start inside a span (spans in order, not overlapping), in O(tokens log spans)."""
  begins = np.asarray([b for b, _ in offsets], np.int64)
  if not spans:
    return np.zeros(len(begins), np.int32)
  starts, ends = np.asarray(spans, np.int64).T
  at = np.searchsorted(starts, begins, side="right") - 1  # the last span starting at or before each token
  return ((at >= 0) & (begins < ends[np.maximum(at, 0)])).astype(np.int32)


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


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFTokenizer:
  """Encodes text and renders chats the way the checkpoint's own template does."""

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder)
    config_path = self.folder / "tokenizer_config.json"
    self.config = _json_object(config_path) if config_path.exists() else {}
    named_in = dict.fromkeys(SPECIAL_KEYS, config_path)  # the file each special token is read from
    special_map = self.folder / "special_tokens_map.json"
    if special_map.exists():  # older folders name their special tokens there only (transformers reads both)
      for key, value in _json_object(special_map).items():
        if key in SPECIAL_KEYS and self.config.get(key) is None:
          self.config[key], named_in[key] = value, special_map
    self._normalizer = None
    if (self.folder / "tokenizer.json").exists():
      self._tok, self._plain_tok = self._load_tokenizer_json(self.folder / "tokenizer.json")
      self._normalizer = self._tok.normalizer
      self._sp = None
    elif (self.folder / "tokenizer.model").exists():
      import sentencepiece as spm

      model_proto = (self.folder / "tokenizer.model").read_bytes()
      try:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._plain_first, self._plain_rest = plain_text_model(model_proto), plain_text_model(model_proto, False)
        self._piece_types = piece_types(model_proto)
      except Exception as err:  # noqa: BLE001 (SentencePiece and protobuf raise several kinds)
        raise ConfigError(f"{self.folder / 'tokenizer.model'} is not a SentencePiece model: {str(err)[:200]}") from None
      self._tok = None
    else:
      raise _NoTokenizer(f"{self.folder} has neither tokenizer.json nor tokenizer.model: not a Hugging Face folder")
    for key in SPECIAL_KEYS:
      if not isinstance(_token_text(self.config.get(key)), (str, type(None))):
        raise ConfigError(f"{named_in[key]}: {key} must be a string or {{\"content\": ...}}, not {self.config[key]!r:.80}")
    self.chat_template = self._find_template()
    self.bos_token = _token_text(self.config.get("bos_token"))
    self.eos_token = _token_text(self.config.get("eos_token"))
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, range=TickingRange, namespace=BoundedNamespace)
    try:
      self._template = env.from_string(self.chat_template)
    except jinja2.exceptions.TemplateError as err:
      raise ConfigError(f"the chat template of {self.template_file} is not a valid jinja template: {err}") from None
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
    self._control_ids = frozenset(special.token_id for special in self._specials.values())
    # Content holding these (or a look-alike the normalizer makes one of) is encoded around them.
    normalized = {_library(self._normalizer.normalize_str, t) for t in strings} if self._normalizer else set()
    controls = sorted({*strings, *normalized} - {""}, key=len, reverse=True)
    self._any_control = re.compile("|".join(map(re.escape, controls)) if controls else r"(?!x)x")
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
    self._generation_eos = self._read_generation_eos()

  @staticmethod
  def _load_tokenizer_json(path: pathlib.Path):
    """(the tokenizer, a copy for plain text): in the copy every added token is special and special
    tokens are spelled out, so text never becomes an added token (special or not)."""
    import tokenizers

    try:
      tok, plain = tokenizers.Tokenizer.from_file(str(path)), tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 (tokenizers reports every parse error as Exception)
      raise ConfigError(f"{path} cannot be read by the tokenizers library: {str(err)[:200]}") from None
    vocabulary = [t for t in plain.get_added_tokens_decoder().values() if not t.special]
    plain.add_special_tokens([tokenizers.AddedToken(t.content, special=True, normalized=False) for t in vocabulary])
    plain.encode_special_tokens = True
    return tok, plain

  def _read_generation_eos(self) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list of ids), checked against the vocabulary."""
    path = self.folder / "generation_config.json"
    if not path.exists():
      return ()
    eos = _json_object(path).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    for token_id in ids:
      if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < self.vocab_size:
        raise ConfigError(
            f"{path}: eos_token_id must be a token id in [0, {self.vocab_size}) or a list of them, got {eos!r:.80}"
        )
    return tuple(ids)

  def _find_specials(self, config_specials: Sequence[str]) -> dict[str, _Special]:
    """The strings that are special tokens: what the template writes of them is one token each."""
    specials = {}
    if self._tok:
      for token_id, added in self._tok.get_added_tokens_decoder().items():
        # Non-special added tokens too: tokenizers matches them in any text, content included.
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
    """The special and added tokens' strings (longest first): only the chat template writes them as tokens."""
    return tuple(self._special_strings)

  def _find_template(self) -> str:
    template, self.template_file = self.config.get("chat_template"), self.folder / "tokenizer_config.json"
    if isinstance(template, list):  # named templates: the "default" one is for chats
      named = (t for t in template if isinstance(t, Mapping) and t.get("name") == "default")
      template = next((t.get("template") for t in named), None)
    if template is None and (self.folder / "chat_template.jinja").exists():
      self.template_file = self.folder / "chat_template.jinja"
      template = self.template_file.read_text()
    if not template:
      raise ConfigError(f"{self.folder} has no chat template (tokenizer_config.json chat_template, chat_template.jinja)")
    if not isinstance(template, str):
      raise ConfigError(f"{self.template_file}: chat_template must be a string or a list of named templates")
    return template

  # --- text ---------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size() if self._tok else self._sp.get_piece_size()

  def token_id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token) if self._tok else self._sp.piece_to_id(token)
    if token_id is None or (self._sp is not None and token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id)):
      raise ConfigError(f"token {token!r} from {self.folder / 'tokenizer_config.json'} is not in the vocabulary")
    return int(token_id)

  def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Template text, where every special string is a special token."""
    if self._tok:
      encoding = _library(self._tok.encode, text, add_special_tokens=False)
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
    for piece in _library(processor.encode, chunk, out_type="proto").pieces:
      ids.append(piece.id)
      offsets.append((begin + char[piece.begin], begin + char[piece.end]))

  def _encode_around(self, text: str, specials: Sequence[tuple[int, int, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """`text` with `specials` (begin, end, string) as special tokens and everything else as plain text."""
    ids, offsets, at, fresh = [], [], 0, True
    for begin, end, string in [*specials, (len(text), len(text), None)]:
      if begin > at:
        if self._tok:
          self._plain_encode(text, at, begin, ids, offsets)
        else:  # one SentencePiece sentence runs up to a restarting special: no dummy prefix inside it
          self._sp_encode(self._plain_first if fresh else self._plain_rest, text, at, begin, ids, offsets)
          fresh = False
      if string is not None:
        ids.append(self._specials[string].token_id)
        offsets.append((begin, end))
        fresh = self._specials[string].restart
      at = end
    return ids, offsets

  def _plain_encode(self, text: str, begin: int, end: int, ids: list, offsets: list) -> None:
    """Appends the tokens of text[begin:end] as plain text. Should the model itself still make an added
    token of it (a vocabulary that holds `<|im_start|>` as a word), the text is cut inside that token
    and encoded in two pieces; only a one-character token cannot be cut."""
    encoding = _library(self._plain_tok.encode, text[begin:end], add_special_tokens=False)
    for token_id, (b, e) in zip(encoding.ids, encoding.offsets):
      if token_id in self._control_ids and e - b > 1:
        cut = begin + b + (e - b) // 2
        self._plain_encode(text, begin, cut, ids, offsets)
        self._plain_encode(text, cut, end, ids, offsets)
        return
    ids += encoding.ids
    offsets += [(begin + b, begin + e) for b, e in encoding.offsets]

  def encode(self, text: str) -> list[int]:
    """Plain text: special strings in `text` are spelled out, never special tokens."""
    ids: list[int] = []
    if self._tok:
      self._plain_encode(text, 0, len(text), ids, [])
      return ids
    return _library(self._plain_first.encode, text)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    return self._tok.decode(ids, skip_special_tokens=True) if self._tok else self._sp.decode(ids)

  # --- chats --------------------------------------------------------------------------------------

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; ValueError past `max_render_chars` or `render_timeout_s`, or
    when the template refuses the chat; ConfigError when the sandbox blocks the template."""
    return self._render(list(messages), add_generation_prompt)

  def _render(self, messages: Any, add_generation_prompt: bool, watch: Watch | None = None) -> str:
    limits = RENDER_LIMITS.set((time.monotonic() + self.render_timeout_s, self.max_render_chars, self.render_timeout_s))
    watching = WATCHING.set(watch)
    chunks, size = [], watch.size if watch else [0]
    try:
      for chunk in self._template.generate(
          messages=messages,
          add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token or "",
          eos_token=self.eos_token or "",
      ):
        size[0] += len(chunk)
        if size[0] > self.max_render_chars:
          raise ValueError(f"chat template output is over max_render_chars={self.max_render_chars}")
        check_time()
        chunks.append(chunk)
    except (OverflowError, RecursionError) as err:  # the sandbox's range bound, runaway macros
      raise ValueError(f"chat template cannot be rendered: {err}") from None
    except jinja2.sandbox.SecurityError as err:
      raise ConfigError(f"the chat template of {self.template_file} is blocked by the sandbox: {err}") from None
    except (jinja2.exceptions.TemplateError, TypeError) as err:  # raise_exception('roles must alternate'), 'a' + 1
      raise ValueError(f"the chat template of {self.template_file} refuses this chat: {err}") from None
    finally:
      WATCHING.reset(watching)
      RENDER_LIMITS.reset(limits)
    return "".join(chunks)

  def _render_watched(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> tuple[str, Any]:
    """The rendering with what the template did with `messages` (None if it fails watched: it is then
    rendered unwatched, which raises its own error if it fails too)."""
    watch = Watch()
    try:
      return self._render(Watched(list(messages), watch), add_generation_prompt, watch), watch
    except (ValueError, jinja2.exceptions.TemplateError):
      return self._render(list(messages), add_generation_prompt), None

  def _turn_span(self, messages: Sequence[Mapping[str, str]], i: int, full: str) -> tuple[int, int]:
    """Assistant turn i's span, from the renderings of the chat before it and through it."""
    before = self.render(messages[:i], add_generation_prompt=True)
    through = self.render(messages[: i + 1])
    if not (through.startswith(before) and full.startswith(through)):
      raise ValueError(
          "the chat template does not render a chat as a growing prefix, so the assistant tokens "
          "cannot be located from it"
      )
    return len(before), len(through)

  def _spans(self, messages: Sequence[Mapping[str, str]], full: str, watch: Watch | None) -> list[tuple[int, int]]:
    """Every assistant turn's span: from one more (watched) rendering when `Watch` can vouch for the
    template, and checked against the prefix renderings of the first and last turn; else turn by turn."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = self._spans_from_watch(messages, full, watch, turns) if watch and turns else None
    exact = {i: self._turn_span(messages, i, full) for i in {turns[0], turns[-1]}} if spans else {}
    if spans is None or any(spans[turns.index(i)] != span for i, span in exact.items()):
      return [self._turn_span(messages, i, full) for i in turns]
    return spans

  def _spans_from_watch(self, messages, full: str, watch: Watch, turns: list[int]) -> list[tuple[int, int]] | None:
    n = len(messages)
    ends = watch.ends([*turns, *(i + 1 for i in turns)], n)
    prompted, watch_prompted = self._render_watched(messages, True)
    prompted_ends = watch_prompted.ends([*turns, n], n) if watch_prompted else None
    if ends is None or prompted_ends is None:
      return None
    through_ends, after, prompt = ends[len(turns) :], full[watch.passes[0][1][-1][1] :], prompted[prompted_ends[-1] :]
    # render(messages[:k]) == full[:end of k] + after; with the generation prompt, prompted[:..] + prompt.
    same = len(os.path.commonprefix([full, prompted]))
    spans = []
    for before_end, through_end in zip(prompted_ends, through_ends):
      begin, end = before_end + len(prompt), through_end + len(after)
      # The old checks, in O(len(after) + len(prompt)): through grows from before, full from through.
      if not (full.startswith(after, through_end) and before_end <= min(same, through_end) and begin <= end):
        return None
      if not full.startswith(prompt, before_end):
        return None
      spans.append((begin, end))
    return spans

  def _chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, spans: bool = False) -> _Chat:
    """Renders and encodes a chat, with special strings inside message content as plain text.

    Content that holds a control string (after the tokenizer's normalizer, and with invisible code
    points taken out) is rendered with a sentinel character inside every literal control string it
    holds, so the specials found in the rendered text are the template's own; the sentinels are then
    removed and the text is encoded around those specials, the rest as plain text.
    """
    if not any(self._holds_control(m["content"]) for m in messages if isinstance(m.get("content"), str)):
      # The common case, encoded in one piece as apply_chat_template does; unless the encoding holds more
      # control tokens than the template wrote (a look-alike the checks above missed).
      text, watch = self._rendering(messages, add_generation_prompt, spans)
      ids, offsets = self._encode_with_offsets(text)
      if sum(i in self._control_ids for i in ids) == sum(1 for _ in self._template_specials.finditer(text)):
        return _Chat(text, ids, offsets, self._spans(messages, text, watch) if spans else [])
    taken = "".join(m["content"] for m in messages) + self.chat_template + (self.bos_token or "") + (self.eos_token or "")
    sentinel = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in taken)
    marked_messages = [{**m, "content": self._mark(m["content"], sentinel)} for m in messages]
    marked, watch = self._rendering(marked_messages, add_generation_prompt, spans)
    text = marked.replace(sentinel, "")
    if text != self.render(messages, add_generation_prompt):
      raise ValueError("the chat template reacts to special tokens inside message content; the chat cannot be rendered safely")
    removed = np.concatenate([[0], np.cumsum([ch == sentinel for ch in marked])])  # sentinels before each position
    specials = []
    for match in self._template_specials.finditer(marked):
      specials.append((int(match.start() - removed[match.start()]), int(match.end() - removed[match.end()]), self._special_strings[match.lastindex - 1]))
    ids, offsets = self._encode_around(text, specials)
    found = [(int(b - removed[b]), int(e - removed[e])) for b, e in self._spans(marked_messages, marked, watch)] if spans else []
    return _Chat(text, ids, offsets, found)

  def _rendering(self, messages, add_generation_prompt: bool, watched: bool) -> tuple[str, Watch | None]:
    if watched:  # the spans will be wanted
      return self._render_watched(messages, add_generation_prompt)
    return self.render(messages, add_generation_prompt), None

  def _holds_control(self, content: str) -> bool:
    """Whether `content` holds a control string as written, after the tokenizer's normalizer, or with
    default-ignorable code points removed (which some normalizers drop)."""
    variants = {content, _IGNORABLE.sub("", content)}
    if self._normalizer is not None:
      variants |= {_library(self._normalizer.normalize_str, v) for v in variants}
      variants |= {_IGNORABLE.sub("", v) for v in variants}
    return any(self._any_control.search(v) for v in variants)

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
    return np.asarray(chat.ids, np.int32), _mask(chat.offsets, chat.spans)

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
    return tuple(sorted({self.eos_id, *self.end_of_turn_ids, *self._generation_eos} - {None}))
