"""A Hugging Face model folder's tokenizer and chat template, with the loss mask taken from the template.

`tokenizer.json` is read with the `tokenizers` library (or `tokenizer.model` with SentencePiece);
the chat template (`tokenizer_config.json` or `chat_template.jinja`) is rendered with a sandboxed
jinja2 environment. Which tokens are the assistant's is found from the rendered template itself:
the assistant turn i spans the characters that `render(messages[:i + 1])` adds to
`render(messages[:i], add_generation_prompt=True)`, and a token is learned when it starts inside a
span. No string matching on role names.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.sandbox
import numpy as np

from sft.pipeline.chat import validate_messages


def _token_text(value: Any) -> str | None:
  """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


class HFTokenizer:
  """Encodes text and renders chats the way the checkpoint's own template does."""

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder)
    config_path = self.folder / "tokenizer_config.json"
    self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if (self.folder / "tokenizer.json").exists():
      import tokenizers

      self._tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
      self._sp = None
    elif (self.folder / "tokenizer.model").exists():
      import sentencepiece as spm

      self._sp = spm.SentencePieceProcessor(model_file=str(self.folder / "tokenizer.model"))
      self._tok = None
    else:
      raise FileNotFoundError(f"{self.folder} has neither tokenizer.json nor tokenizer.model")
    self.chat_template = self._find_template()
    self.bos_token = _token_text(self.config.get("bos_token"))
    self.eos_token = _token_text(self.config.get("eos_token"))
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    self._template = env.from_string(self.chat_template)
    specials = {self.bos_token, self.eos_token, _token_text(self.config.get("unk_token"))}
    specials |= {_token_text(t) for t in (self.config.get("added_tokens_decoder") or {}).values()}
    specials = sorted((t for t in specials if t), key=len, reverse=True)
    self._special_pattern = re.compile("|".join(map(re.escape, specials)) if specials else r"(?!x)x")
    self.bos_id = self.token_id(self.bos_token) if self.bos_token else None
    self.eos_id = self.token_id(self.eos_token) if self.eos_token else None
    pad = _token_text(self.config.get("pad_token"))
    self.pad_id = self.token_id(pad) if pad else (self.eos_id if self.eos_id is not None else 0)

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
    if self._tok:
      encoding = self._tok.encode(text, add_special_tokens=False)
      return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    # SentencePiece would spell out "</s>" written by a template: special tokens are cut out first.
    ids, offsets, at = [], [], 0
    for match in [*self._special_pattern.finditer(text), None]:
      end = match.start() if match else len(text)
      if end > at:
        proto = self._sp.encode(text[at:end], out_type="proto")
        ids += [p.id for p in proto.pieces]
        offsets += [(at + p.begin, at + p.end) for p in proto.pieces]
      if match:
        ids.append(self._sp.piece_to_id(match.group()))
        offsets.append(match.span())
        at = match.end()
    return ids, offsets

  def encode(self, text: str) -> list[int]:
    return self._encode_with_offsets(text)[0]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    return self._tok.decode(ids, skip_special_tokens=True) if self._tok else self._sp.decode(ids)

  # --- chats --------------------------------------------------------------------------------------

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    return self._template.render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "",
        eos_token=self.eos_token or "",
    )

  def assistant_spans(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered chat, character spans of each assistant turn as the template writes it)."""
    full = self.render(messages)
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
    return full, spans

  def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the rendered chat, and a mask that is 1 on tokens inside assistant spans."""
    reason = validate_messages(messages)
    if reason:
      raise ValueError(f"invalid chat record: {reason}")
    text, spans = self.assistant_spans(messages)
    ids, offsets = self._encode_with_offsets(text)
    # As apply_chat_template does: the template writes any BOS itself, nothing is added.
    mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def tokenize_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(text)
    ids = ([self.bos_id] if self.bos_id is not None else []) + ids + ([self.eos_id] if self.eos_id is not None else [])
    return np.asarray(ids, np.int32), np.ones(len(ids), np.int32)

  def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], str]:
    """(prompt tokens up to where the assistant's answer starts, reference answer)."""
    if not messages or messages[-1]["role"] != "assistant":
      raise ValueError("cannot make a prompt from this chat: the last turn is not the assistant's")
    return self.encode(self.render(messages[:-1], add_generation_prompt=True)), messages[-1]["content"]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's eos and those of generation_config.json."""
    ids = {self.eos_id} if self.eos_id is not None else set()
    generation = self.folder / "generation_config.json"
    if generation.exists():
      eos = json.loads(generation.read_text()).get("eos_token_id")
      ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))
