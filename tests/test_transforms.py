"""Every data transform on the literal worked example of its docstring."""

import numpy as np
import pytest

from sft.pipeline import shift_and_truncate
from sft.pipeline.transforms import unpack_features
from sft.tokenizer import Tokenizer, render_prompt, tokenize_chat, tokenize_text, validate_messages
from sft.tokenizer.sentencepiece_tokenizer import BOS_ID, CONTROL_TOKENS, EOS_ID, PAD_ID


class LetterTokenizer:
  """Stands in for SentencePiece in worked examples: one id per letter (a=10, b=11, ...)."""

  role_ids = {"system": 4, "user": 5, "assistant": 6}
  end_id = 7

  def encode(self, text):
    return [10 + ord(ch) - ord("a") for ch in text if ch.isalpha()]


H, I, Y, O = 10 + 7, 10 + 8, 10 + 24, 10 + 14
USER, ASSISTANT, END = 5, 6, 7


def test_tokenize_chat_worked_example():
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  tokens, loss_mask = tokenize_chat(messages, LetterTokenizer())
  np.testing.assert_array_equal(tokens, [BOS_ID, USER, H, I, END, ASSISTANT, Y, O, END])
  np.testing.assert_array_equal(loss_mask, [0, 0, 0, 0, 0, 0, 1, 1, 1])


def test_tokenize_chat_multi_turn_learns_every_assistant_turn():
  messages = [
      {"role": "system", "content": "a"},
      {"role": "user", "content": "b"},
      {"role": "assistant", "content": "c"},
      {"role": "user", "content": "d"},
      {"role": "assistant", "content": "e"},
  ]
  tokens, loss_mask = tokenize_chat(messages, LetterTokenizer())
  np.testing.assert_array_equal(tokens, [BOS_ID, 4, 10, END, USER, 11, END, ASSISTANT, 12, END, USER, 13, END, ASSISTANT, 14, END])
  np.testing.assert_array_equal(loss_mask, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1])


def test_tokenize_text_worked_example():
  tokens, loss_mask = tokenize_text("ab", LetterTokenizer())
  np.testing.assert_array_equal(tokens, [BOS_ID, 10, 11, EOS_ID])
  np.testing.assert_array_equal(loss_mask, [1, 1, 1, 1])


def test_shift_and_truncate_worked_example():
  out = shift_and_truncate(np.array([2, 5, 6, 7, 8]), np.array([0, 0, 1, 1, 1]), max_len=3)
  np.testing.assert_array_equal(out["inputs"], [2, 5, 6])
  np.testing.assert_array_equal(out["targets"], [5, 6, 7])
  np.testing.assert_array_equal(out["loss_mask"], [0, 1, 1])
  assert all(v.dtype == np.int32 for v in out.values())


def test_shift_without_truncation_keeps_every_pair():
  out = shift_and_truncate(np.array([2, 5, 6]), np.array([0, 1, 1]), max_len=8)
  np.testing.assert_array_equal(out["inputs"], [2, 5])
  np.testing.assert_array_equal(out["targets"], [5, 6])
  np.testing.assert_array_equal(out["loss_mask"], [1, 1])


def test_render_prompt_worked_example():
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  prompt, reference = render_prompt(messages, LetterTokenizer())
  assert prompt == [BOS_ID, USER, H, I, END, ASSISTANT]
  assert reference == "yo"
  # The prompt is exactly the training tokens before the first learned token.
  tokens, loss_mask = tokenize_chat(messages, LetterTokenizer())
  assert prompt == list(tokens[: int(np.argmax(loss_mask))])


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "bot", "content": "hi"}], "role 'bot'"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "empty or non-string"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "empty or non-string"),
        (["hi"], "not an object"),
    ],
)
def test_invalid_chats_are_explained(messages, reason):
  assert reason in validate_messages(messages)
  with pytest.raises(ValueError, match="invalid chat record"):
    tokenize_chat(messages, LetterTokenizer())


def test_unpack_features_renames_packing_outputs():
  packed = {
      "inputs": np.array([[1, 2, 3]]),
      "targets": np.array([[2, 3, 4]]),
      "loss_mask": np.array([[0, 1, 1]]),
      "inputs_segment_ids": np.array([[1, 1, 0]]),
      "inputs_positions": np.array([[0, 1, 0]]),
      "targets_segment_ids": np.array([[1, 1, 0]]),
      "targets_positions": np.array([[0, 1, 0]]),
  }
  out = unpack_features(packed)
  assert sorted(out) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 0]])


def test_real_tokenizer_has_fixed_ids_and_single_token_controls(tokenizer):
  assert (tokenizer._sp.pad_id(), tokenizer._sp.bos_id(), tokenizer._sp.eos_id()) == (PAD_ID, BOS_ID, EOS_ID)
  for control in CONTROL_TOKENS:
    assert len(tokenizer._sp.encode(control)) in (1, 2)  # possibly preceded by the word-boundary piece
    assert tokenizer._sp.piece_to_id(control) != tokenizer._sp.unk_id()
  text = "Serialize obj to a JSON formatted str. ünïcödé ✓"
  assert tokenizer.decode(tokenizer.encode(text)) == text  # byte fallback: nothing is lost
  restored = Tokenizer(tokenizer.model_proto)
  assert restored.encode(text) == tokenizer.encode(text)


def test_tokenizer_rejects_a_model_without_control_tokens(tmp_path):
  import io

  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["plain words only"] * 50), model_writer=model, vocab_size=30, minloglevel=2,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
  )
  with pytest.raises(ValueError, match="control tokens"):
    Tokenizer(model.getvalue())


def test_a_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
  path = tmp_path / "tokenizer.model"
  path.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    Tokenizer.load(path)



def test_load_tokenizer_opens_a_sentencepiece_file_and_refuses_what_is_none(tmp_path, tokenizer):
  from sft.errors import ConfigError
  from sft.tokenizer import ChatTokenizer, load_tokenizer

  path = tmp_path / "tokenizer.model"
  path.write_bytes(tokenizer.model_proto)
  loaded = load_tokenizer(path)
  assert isinstance(loaded, Tokenizer) and isinstance(loaded, ChatTokenizer)
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  np.testing.assert_array_equal(loaded.tokenize_chat(chat), tokenizer.tokenize_chat(chat))
  with pytest.raises(ConfigError, match="no tokenizer at"):
    load_tokenizer(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    load_tokenizer(tmp_path / "empty")
