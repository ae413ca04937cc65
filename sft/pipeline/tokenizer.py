"""SentencePiece tokenizer with the chat format's control tokens.

Ids 0-3 are fixed (pad, unk, bos, eos); the role markers and the end-of-turn marker are user-defined
symbols, so they are single tokens that ordinary text never produces by accident.
"""

from __future__ import annotations

import io
import pathlib
from typing import Iterable, Iterator

import sentencepiece as spm

from sft.config import ConfigError

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
        raise ValueError(f"tokenizer has {name}_id={got}, expected {want}; retrain it with sft.pipeline.train_tokenizer")
    missing = [t for t in CONTROL_TOKENS if self._sp.piece_to_id(t) == self._sp.unk_id()]
    if missing:
      raise ValueError(f"tokenizer lacks the chat control tokens {missing}; retrain it with sft.pipeline.train_tokenizer")
    self.role_ids = {role: self._sp.piece_to_id(tok) for role, tok in ROLE_TOKENS.items()}
    self.end_id = self._sp.piece_to_id(END_OF_TURN)

  def __reduce__(self):
    return (Tokenizer, (self.model_proto,))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  # The chat protocol the pipeline and evaluator use (HFTokenizer has the same methods).
  pad_id = PAD_ID

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.end_id,)

  def tokenize_chat(self, messages):
    from sft.pipeline import transforms  # transforms imports this module

    return transforms.tokenize_chat(messages, self)

  def tokenize_text(self, text):
    from sft.pipeline import transforms

    return transforms.tokenize_text(text, self)

  def render_prompt(self, messages):
    from sft.pipeline import transforms

    return transforms.render_prompt(messages, self)

  @classmethod
  def load(cls, path: str | pathlib.Path) -> "Tokenizer":
    try:
      return cls(pathlib.Path(path).read_bytes())
    except RuntimeError as err:  # SentencePiece's parse error
      raise ValueError(f"{path} is not a SentencePiece model ({err}); delete it to train a new one") from None


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
