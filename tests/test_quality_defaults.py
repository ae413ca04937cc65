"""The default filters on what they used to get wrong: short English records the language identifier is
unsure of are kept (no verdict), foreign ones are still dropped; and the hand-written set of
experiments/annotate_audit/planted, built with the default config, loses no clean record."""

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sft.databuilder import build_config, build_dataset, quality, records, templates
from sft.databuilder.build import params_of

PLANTED = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "annotate_audit" / "planted"
# Near copies of the planted set that the default near-duplicate rule misses: its whole text is under the 0.7
# Jaccard threshold (0.625: a reworded clause). Kept by design, not by the language or answer rules. (Copies
# just over it, at 0.70 and 0.74, are found: 28 bands of 4 rows propose nearly every pair at 0.7.)
MISSED_NEAR_COPIES = {"records_copies.jsonl:9"}


def _params():
  return params_of(build_config())["filter"]


def _chat(user, assistant, record_id="x:1"):
  return records.chat(record_id, "x", [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


SHORT_ENGLISH = [
    ("Spell the word 'bananas' backwards.", "sananab"),
    ("Convert 5 km to miles.", "About 3.11 miles."),
    ("Name the author of 'Don Quixote'.", "Miguel de Cervantes."),
    ("Who painted 'Las Meninas'?", "Diego Velazquez."),
    ("What does len([1, 2, 3]) return in Python?", "3"),
    ("Capitalize every word: 'hello world'", "Hello World"),
    ("Expand the acronym 'NASA'.", "National Aeronautics and Space Administration."),
    ("Write a regex for a five-digit US ZIP code.", "^\\d{5}$"),
    ("Which HTTP status code means 'Not Found'?", "404"),
    ("Who is Angela Merkel?", "A former German chancellor."),
    ("List three Italian dishes.", "Pizza, lasagne, risotto."),
    ("Fix the bug:\n\n```python\ndef add(a, b):\n    return a - b\n```",
     "```python\ndef add(a, b):\n    return a + b\n```"),
]
FOREIGN = [
    ("fr", "Quelle est la capitale de l'Australie et pourquoi ?", "La capitale de l'Australie est Canberra."),
    ("es", "¿Cuál es la mejor manera de aprender un idioma nuevo?", "Practicar todos los días."),
    ("de", "Was ist die Hauptstadt von Österreich?", "Die Hauptstadt von Österreich ist Wien."),
    ("es", "¿Cómo puedo ordenar una lista en Python?", "Usa `sorted(lista)` o el método `lista.sort()`."),
]


@pytest.mark.parametrize("user, assistant", SHORT_ENGLISH)
def test_short_english_is_kept_whatever_the_identifier_guesses(user, assistant):
  record = quality.filter_record(_chat(user, assistant), _params())
  assert "dropped" not in record
  assert record["lang"] in ("en", quality.NOT_JUDGED_UNSURE, quality.NOT_JUDGED_SHORT)


def test_the_spelling_example_is_unsure_and_counted_so():
  p = _params()
  chat = _chat("Spell the word 'bananas' backwards.", "sananab")
  lang, prob = quality.detect_language(chat, p["language"])
  assert prob < p["language"]["min_confidence"]  # the identifier is unsure: no verdict
  assert quality.filter_record(chat, p)["lang"] == quality.NOT_JUDGED_UNSURE
  assert quality.filter_record(_chat("Hi", "Hello"), p)["lang"] == quality.NOT_JUDGED_SHORT
  fields = {"source_lang": "English", "target_lang": "French", "source_text": "Where is the station, please?",
            "target_text": "Où est la gare, s'il vous plaît ?"}
  pair = templates.to_chat(fields, "translation", "t:1", "t")
  assert quality.filter_record(pair, p)["lang"] == quality.NOT_JUDGED_TRANSLATION
  clear = _chat("What is the difference between weather and climate?", "Weather is daily.")
  assert quality.filter_record(clear, p)["lang"] == "en"


@pytest.mark.parametrize("lang, user, assistant", FOREIGN)
def test_foreign_records_are_still_dropped(lang, user, assistant):
  dropped = quality.filter_record(_chat(user, assistant), _params())["dropped"]
  assert (dropped["stage"], dropped["reason"]) == ("filter", "language") and dropped["detail"].startswith(f"{lang} (")


@given(lang=st.sampled_from(["en", "fr", "de", "xx"]), prob=st.floats(0, 1), min_confidence=st.floats(0, 1))
def test_a_language_drop_needs_a_confident_other_language(lang, prob, min_confidence):
  # Property: the verdict is a drop exactly when the identifier is at least min_confidence sure of a
  # language outside `languages`; a kept record's label is its language only when that sure.
  p = {"languages": ("en",), "min_confidence": min_confidence, "min_chars": 40}
  verdict = quality.language_verdict((lang, prob), p)
  assert (verdict is not None) == (lang != "en" and prob >= min_confidence)
  assert verdict is None or verdict[0] == "language"
  label = quality.language_label(_chat("a", "b"), (lang, prob), p)
  assert label == (lang if prob >= min_confidence else quality.NOT_JUDGED_UNSURE)


@pytest.fixture(scope="module")
def planted_build(tmp_path_factory):
  config = build_config()
  config.input_dir = str(PLANTED / "raw")
  out = tmp_path_factory.mktemp("planted")
  build_dataset(config, out, progress=False)
  lines = [line for path in sorted(out.glob("*.jsonl")) for line in path.read_text(encoding="utf-8").splitlines()]
  return {r["id"]: r.get("dropped") for r in map(json.loads, lines)}


def test_the_planted_set_loses_no_clean_record(planted_build):
  gold = [json.loads(line) for line in (PLANTED / "gold.jsonl").read_text(encoding="utf-8").splitlines()]
  assert set(planted_build) == {g["id"] for g in gold}
  wrong = {}
  for g in gold:
    dropped = planted_build[g["id"]]
    got = (dropped["stage"], dropped["reason"]) if dropped else None
    want = (g["stage"], g["reason"]) if g["expect"] == "drop" and g["id"] not in MISSED_NEAR_COPIES else None
    if got != want:
      wrong[g["id"]] = (g["why"], want, got, (dropped or {}).get("detail"))
    if got and g.get("of"):
      assert dropped["duplicate_of"] == g["of"], g["id"]
  assert wrong == {}
