"""Decontamination: the n-gram matcher, and the exact matcher for eval items too short for it."""

import json
import pickle

import pytest

from sft.databuilder import decontaminate, records, report

QUESTION = "Which planet in the solar system has the largest number of confirmed moons orbiting it?"


def _chat(user, assistant, record_id="x:1", **extra):
  return records.chat(record_id, "x", [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra)


def _index(*texts, **kwargs):
  return decontaminate.build_index([(f"eval:{i}", t) for i, t in enumerate(texts)], n=13, min_words=8, **kwargs)


def _reason(record, index):
  dropped = decontaminate.decontaminate_record(record, index).get("dropped")
  return dropped and (dropped["reason"], dropped["detail"])


def test_a_short_eval_item_copied_verbatim_is_dropped_as_exact():
  index = _index("Define photosynthesis briefly.", QUESTION)
  assert index["grams"] and "define photosynthesis briefly" in index["exact"]
  reason, detail = _reason(_chat("Please define photosynthesis briefly, for a child.", "Plants make sugar from light."), index)
  assert reason == decontaminate.EXACT_REASON == "eval item (exact)" and detail == "eval:0: 'define photosynthesis briefly'"
  assert _reason(_chat("Tell me a joke.", "Define photosynthesis briefly."), index)[0] == "eval item (exact)"  # in any turn


def test_case_punctuation_and_spacing_variants_are_dropped():
  index = _index("Define photosynthesis briefly.")
  for variant in ("DEFINE   photosynthesis -- BRIEFLY!!", "define\nphotosynthesis,\tbriefly", "(Define) photosynthesis: briefly?"):
    assert _reason(_chat(variant, "Plants make sugar."), index)[0] == "eval item (exact)", variant


def test_a_record_sharing_common_words_is_kept():
  index = _index("Define photosynthesis briefly.", "Hello", "What is love?")
  for record in (
      _chat("Define the word briefly.", "To state the meaning."),
      _chat("Photosynthesis needs light; define it.", "It is how plants feed."),
      _chat("Hello there, how do I sort a list?", "Use sorted()."),  # a one-word item only matches a whole text
      _chat("What is the capital of France?", "Paris."),
  ):
    assert _reason(record, index) is None, record
  # a key shorter than exact_min_words matches only a whole text, prompt or turn equal to it
  assert _reason(_chat("Hello!", "Hi, how can I help?"), index)[0] == "eval item (exact)"


def test_ngram_matches_still_win_and_keep_their_reason():
  index = _index(QUESTION, "Name eight planets of the solar system now")
  reason, detail = _reason(_chat(f"QUIZ -- {QUESTION.upper()}", "Saturn."), index)
  assert reason == decontaminate.NGRAM_REASON == "overlaps eval set" and detail.startswith("eval:0: 'which planet in the solar system")
  assert _reason(_chat("Please name eight planets of the solar system now.", "Mercury"), index)[0] == "overlaps eval set"
  assert _reason(_chat(QUESTION, "Saturn."), index)[0] == "overlaps eval set"  # also an exact copy: counted once, as n-gram
  assert _reason(_chat("Which planet is largest?", "Jupiter."), index) is None


def test_template_eval_items_are_keyed_by_their_fields(tmp_path):
  # {"question", "answer"} becomes a chat with a paraphrased instruction ("Q: ..."): its question is the key
  path = tmp_path / "eval.jsonl"
  path.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in ("What is entropy?", "Define osmosis.", "Why is the sky blue?")))
  index, counts = decontaminate.index_from_files([str(path)], n=13, min_words=8)
  assert counts == {str(path): {"items": 3, "raw": 0}}
  assert {"what is entropy", "define osmosis", "why is the sky blue"} <= set(index["exact"])
  assert _reason(_chat("Why is the sky blue?", "Rayleigh scattering."), index)[0] == "eval item (exact)"
  # a two-word question matches a record whose own template fields equal it, whatever the paraphrase
  templated = _chat("Answer the following question.\n\nDefine osmosis.", "Water moving across a membrane.", task="qa", template="closed_qa")
  assert _reason(templated, index)[0] == "eval item (exact)"
  assert _reason(_chat("Define osmosis in plants and animals.", "..."), index) is None  # below exact_min_words: equality only


def test_the_index_is_plain_data():
  index = _index(QUESTION, "Define photosynthesis briefly.")
  assert pickle.loads(pickle.dumps(index)) == index
  assert index["starts"] == {"define": [3]}  # the 14-word question is left to the n-gram matcher


def test_report_counts_both_kinds_of_decontamination(tmp_path):
  facts = [
      {"id": "a", "source": "s", "kind": "chat", "chars": 1, "words": 1, "split": "train"},
      {"id": "b", "source": "s", "kind": "chat", "chars": 1, "words": 1, "stage": "decontaminate", "reason": "overlaps eval set", "detail": ""},
      {"id": "c", "source": "s", "kind": "chat", "chars": 1, "words": 1, "stage": "decontaminate", "reason": "eval item (exact)", "detail": ""},
      {"id": "d", "source": "s", "kind": "chat", "chars": 1, "words": 1, "stage": "decontaminate", "reason": "eval item (exact)", "detail": ""},
  ]
  manifest = {"accounting": report.accounting(facts), "eval_sets": {"eval.jsonl": {"items": 5, "raw": 0}}}
  text = report.write_report(tmp_path, facts, manifest, examples_per_reason=1).read_text()
  assert "against 5 eval items: 1 dropped for a shared n-gram, 2 for holding a short eval item whole (exact)" in text


def test_exact_min_words_is_a_config_key(tmp_path):
  from sft.databuilder import build_config
  from sft.databuilder.build import params_of
  from sft.databuilder.config import check_build_config
  from sft.errors import ConfigError

  config = build_config()
  config.input_dir = str(tmp_path)
  assert params_of(config)["decontaminate"]["exact_min_words"] == decontaminate.EXACT_MIN_WORDS
  config.decontaminate.exact_min_words = 0
  with pytest.raises(ConfigError, match="decontaminate.exact_min_words: must be >= 1, got 0"):
    check_build_config(config)
