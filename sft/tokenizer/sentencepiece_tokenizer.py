"""The built-in SentencePiece tokenizer and its chat format; `load_tokenizer` for any tokenizer.

Ids 0-3 are fixed (pad, unk, bos, eos); the role markers and the end-of-turn marker are user-defined
symbols, so they are single tokens. SentencePiece matches user-defined symbols anywhere in its input,
so `encode` uses a copy of the model in which they are unused pieces: text, message content included,
never becomes a control token, and only `tokenize_chat` writes them. A chat renders as
`BOS <|role|> content <|end|> ...` (see `tokenize_chat`).
"""

from __future__ import annotations

import io
import pathlib
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import sentencepiece as spm

from sft.errors import ConfigError
from sft.tokenizer.chat import ChatTokenizer, validate_messages
from sft.tokenizer.sentencepiece_proto import plain_text_model

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CONTROL_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)

class Tokenizer:
  """A picklable wrapper (grain may copy transforms into workers) around a SentencePiece model."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    fixed = {"pad": (PAD_ID, self._sp.pad_id()), "bos": (BOS_ID, self._sp.bos_id()), "eos": (EOS_ID, self._sp.eos_id())}
    for name, (want, got) in fixed.items():
      if want != got:
        raise ValueError(f"tokenizer has {name}_id={got}, expected {want}; retrain it with sft.tokenizer.train_tokenizer")
    missing = [t for t in CONTROL_TOKENS if self._sp.piece_to_id(t) == self._sp.unk_id()]
    if missing:
      raise ValueError(f"tokenizer lacks the chat control tokens {missing}; retrain it with sft.tokenizer.train_tokenizer")
    self.role_ids = {role: self._sp.piece_to_id(tok) for role, tok in ROLE_TOKENS.items()}
    self.end_id = self._sp.piece_to_id(END_OF_TURN)
    self._plain = plain_text_model(model_proto)

  def __reduce__(self):
    return (Tokenizer, (self.model_proto,))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def control_strings(self) -> tuple[str, ...]:
    """The strings only the chat format writes as tokens; in text they are spelled out."""
    return CONTROL_TOKENS

  def token_id(self, token: str) -> int:
    """The id of one piece (a control string included), as HFTokenizer.token_id."""
    token_id = self._sp.piece_to_id(token)
    if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
      raise ValueError(f"token {token!r} is not in the vocabulary")
    return int(token_id)

  def encode(self, text: str) -> list[int]:
    """Plain text: `<|end|>` in `text` is spelled out, never the end-of-turn token."""
    return self._plain.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  # The chat protocol the pipeline and evaluator use (HFTokenizer has the same methods).
  pad_id = PAD_ID

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """`<|end|>`, which `tokenize_chat` writes after every answer, and EOS, which ends pretraining text."""
    return (EOS_ID, self.end_id)

  def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    return tokenize_chat(messages, self)

  def tokenize_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    return tokenize_text(text, self)

  def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], str]:
    return render_prompt(messages, self)

  @classmethod
  def load(cls, path: str | pathlib.Path) -> "Tokenizer":
    try:
      return cls(pathlib.Path(path).read_bytes())
    except RuntimeError as err:  # SentencePiece's parse error
      raise ValueError(f"{path} is not a SentencePiece model ({err}); delete it to train a new one") from None


# The chat format. These take any object with `encode`, `role_ids` and `end_id` (tests use a letter
# tokenizer), so the worked examples below hold literally.


def tokenize_chat(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Renders a chat as tokens and marks the tokens the model is trained to produce.

  Every turn is `<|role|> content <|end|>`; the assistant's content and its closing `<|end|>` (the
  stop token at generation time) are in the loss, everything else is prompt.

      messages  = [user: "hi", assistant: "yo"]        ("hi" -> [h, i], "yo" -> [y, o])
      tokens    = [BOS, <|user|>, h, i, <|end|>, <|assistant|>, y, o, <|end|>]
      loss_mask = [ 0,     0,     0, 0,    0,         0,        1, 1,    1   ]
  """
  reason = validate_messages(messages)
  if reason:
    raise ValueError(f"invalid chat record: {reason}")
  tokens, mask = [BOS_ID], [0]
  for message in messages:
    turn = _render_turn(message, tokenizer)
    learn = int(message["role"] == "assistant")
    tokens += turn
    mask += [0] + [learn] * (len(turn) - 1)  # the role marker is prompt; content and <|end|> are learned
  return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)


def _render_turn(message: Mapping[str, str], tokenizer: Tokenizer) -> list[int]:
  return [tokenizer.role_ids[message["role"]], *tokenizer.encode(message["content"]), tokenizer.end_id]


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> tuple[list[int], str]:
  """(prompt tokens, reference answer) for a chat whose last turn is the assistant's.

  The prompt is every turn before the last, rendered as in training, then `<|assistant|>`, so the
  model's next tokens are its answer:

      messages = [user: "hi", assistant: "yo"]
      prompt   = [BOS, <|user|>, h, i, <|end|>, <|assistant|>]     reference = "yo"
  """
  reason = validate_messages(messages)
  if reason or messages[-1]["role"] != "assistant":
    raise ValueError(f"cannot make a prompt from this chat: {reason or 'the last turn is not the assistant'}")
  tokens = [BOS_ID]
  for message in messages[:-1]:
    tokens += _render_turn(message, tokenizer)
  return [*tokens, tokenizer.role_ids["assistant"]], messages[-1]["content"]


def tokenize_text(text: str, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Plain text for pretraining: every token after BOS is learned.

      text      = "ab"                 ("ab" -> [a, b])
      tokens    = [BOS, a, b, EOS]
      loss_mask = [ 1,  1, 1,  1 ]     (position 0 is dropped by the shift)
  """
  if not isinstance(text, str) or not text.strip():
    raise ValueError("invalid text record: empty or non-string text")
  tokens = [BOS_ID, *tokenizer.encode(text), EOS_ID]
  return np.asarray(tokens, np.int32), np.ones(len(tokens), np.int32)


def load_tokenizer(path: str | pathlib.Path) -> ChatTokenizer:
  """The one way to open a tokenizer: a SentencePiece `.model` file trained here, or a Hugging Face
  model folder (tokenizer.json or tokenizer.model, with its chat template)."""
  path = pathlib.Path(path)
  if path.is_file():
    return Tokenizer.load(path)
  if path.is_dir():
    from sft.tokenizer.hf_tokenizer import HFTokenizer  # noqa: PLC0415 (jinja2 and tokenizers only when used)

    return HFTokenizer(path)
  raise ConfigError(f"no tokenizer at {str(path)!r}: expected a SentencePiece .model file or a Hugging Face folder")


def _lines(texts: Iterable[str]) -> Iterator[str]:
  # SentencePiece trains on lines; newlines inside a text are left to byte fallback.
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_lines: int = 300_000, num_threads: int = 2) -> Tokenizer:
  """Trains a unigram SentencePiece model on `texts` (an iterable of documents)."""
  model = io.BytesIO()
  try:
    _train(texts, model, vocab_size, max_lines, num_threads)
  except RuntimeError as err:  # SentencePiece reports bad sizes as RuntimeError with its own text
    raise ConfigError(f"cannot train a tokenizer with vocab_size={vocab_size}: {err}") from None
  return Tokenizer(model.getvalue())


def _train(texts, model, vocab_size, max_lines, num_threads) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=_lines(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="unigram",
      character_coverage=1.0,
      byte_fallback=True,  # no unknown characters: rare ones become byte tokens
      split_digits=True,
      normalization_rule_name="identity",  # keep code and whitespace exactly as written
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      user_defined_symbols=list(CONTROL_TOKENS),
      input_sentence_size=max_lines,
      shuffle_input_sentence=True,
      num_threads=num_threads,
      minloglevel=2,
  )


def get_or_train_tokenizer(path: pathlib.Path, texts: Iterable[str], vocab_size: int) -> tuple[Tokenizer, bool]:
  """Loads the tokenizer at `path`, or trains one and saves it there. Returns (tokenizer, trained)."""
  if path.exists():
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != vocab_size:
      raise ConfigError(
          f"{path} has a vocabulary of {tokenizer.vocab_size} but the config asks for {vocab_size}; "
          "use a new workdir or delete the tokenizer file"
      )
    return tokenizer, False
  tokenizer = train_tokenizer(texts, vocab_size)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(tokenizer.model_proto)
  tmp.replace(path)
  return tokenizer, True
