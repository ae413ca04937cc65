"""A tokenizer that fails on one text fails that record only; a tokenizer folder that cannot be used is one
line naming the file (and key)."""

import json

import pytest
import tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_hf_tokenizer import CHAT, CHATML, make_folder
from tokenizers import models, pre_tokenizers

from sft.databuilder import build_config, decontaminate, records, stages
from sft.databuilder.build import params_of
from sft.errors import ConfigError
from sft.pipeline import tokenize_record
from sft.tokenizer.hf_tokenizer import HFTokenizer

BACKTRACKING = "a" * 72 + "b"  # 73 characters on which the pre-tokenizer's regex gives up with a Rust panic


@pytest.fixture(scope="module")
def panicking(tmp_path_factory):
  """A tokenizer.json whose pre-tokenizer regex backtracks: oniguruma's retry limit panics in Rust."""
  path = tmp_path_factory.mktemp("panicking")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("(a|aa)+$"), "isolated")
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
  return path


def test_a_tokenizer_panic_is_one_counted_rejection_in_the_build(panicking):
  config = build_config()
  config.stdlib = True
  config.filter.length.min_words = config.filter.length.min_characters = 0
  config.filter.language.enabled = False
  config.filter.length.tokenizer = str(panicking)
  params = params_of(config)
  index, _ = decontaminate.index_from_files([], 13, 8, 8)
  record = records.chat("x:1", "x", [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "Sure: " + BACKTRACKING}])
  (out,) = stages.process_record(record, params, index)
  assert out["dropped"]["stage"] == "filter" and out["dropped"]["reason"] == "tokenizer failed"
  assert "PanicException" in out["dropped"]["detail"]
  other = records.chat("x:2", "x", [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "Sure: b c"}])
  (kept,) = stages.process_record(other, params, index)
  assert not records.is_dropped(kept)


def test_a_tokenizer_panic_in_training_names_the_record(panicking):
  tok = HFTokenizer(panicking)
  record = {"id": "train.jsonl:7", "messages": [{"role": "user", "content": BACKTRACKING}, {"role": "assistant", "content": "b"}]}
  with pytest.raises(ConfigError, match=r"record 'train.jsonl:7': .*PanicException"):
    tokenize_record(record, tok)
  with pytest.raises(ConfigError, match=r"record 'pre:1': .*PanicException"):
    tokenize_record({"id": "pre:1", "text": BACKTRACKING}, tok)


def test_interrupts_are_never_taken_for_a_tokenizer_failure(panicking, monkeypatch):
  tok = HFTokenizer(panicking)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(tok, "_plain_tok", type("T", (), {"encode": staticmethod(interrupted)})())
  with pytest.raises(KeyboardInterrupt):
    tok.encode("x")


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory):
  folder = make_folder(tmp_path_factory.mktemp("gen"), CHATML, eos_token="<|im_end|>")
  return folder, HFTokenizer(folder).vocab_size


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.one_of(st.integers(-5, 500), st.text(max_size=3), st.floats(), st.none()), max_size=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(eos=JUNK)
@example(eos="</s>")
@example(eos=1e308)
@example(eos={"id": 2})
@example(eos=10**12)
@example(eos=[3, 9])
def test_generation_config_eos_token_id_is_an_id_or_a_one_line_error(chatml_folder, eos):
  chatml_folder, vocab_size = chatml_folder
  path = chatml_folder / "generation_config.json"
  path.write_text(json.dumps({"eos_token_id": eos}))
  ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
  valid = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids)
  try:
    tok = HFTokenizer(chatml_folder)
  except ConfigError as err:
    assert not valid and str(path) in str(err) and "eos_token_id" in str(err) and "\n" not in str(err)
  else:
    assert valid and set(ids) <= set(tok.stop_ids)
  finally:
    path.unlink()


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("generation_config.json", "{eos_token_id: 2", "generation_config.json is not valid JSON"),
        ("generation_config.json", "[2]", "generation_config.json must hold a JSON object"),
        ("tokenizer_config.json", "{", "tokenizer_config.json is not valid JSON"),
        ("tokenizer_config.json", json.dumps({"chat_template": CHATML, "eos_token": 5}), "tokenizer_config.json: eos_token"),
        ("tokenizer_config.json", json.dumps({"chat_template": "{% for %}"}), "not a valid jinja template"),
        ("tokenizer_config.json", json.dumps({"chat_template": 7}), "chat_template must be a string"),
        ("tokenizer.json", '{"model": 1}', "tokenizer.json cannot be read"),
    ],
)
def test_a_bad_tokenizer_folder_is_a_config_error_naming_the_file(tmp_path, name, text, says):
  folder = make_folder(tmp_path / "f", CHATML)
  (folder / name).write_text(text)
  with pytest.raises(ConfigError, match=says):
    HFTokenizer(folder)


def test_a_chat_template_blocked_by_the_sandbox_is_a_config_error(tmp_path):
  folder = make_folder(tmp_path, CHATML + "{{ ''.__class__.__mro__ }}")
  tok = HFTokenizer(folder)
  with pytest.raises(ConfigError, match=r"tokenizer_config.json is blocked by the sandbox"):
    tok.tokenize_chat(CHAT)
  with pytest.raises(ConfigError, match=r"record 'r:1': the chat template of .* is blocked by the sandbox"):
    tokenize_record({"id": "r:1", "messages": CHAT}, tok)
