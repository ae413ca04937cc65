"""How the annotation tasks read a model's answers, hostile ones included: labels that look alike, judge
scores in the forms models write them, answers cut short or made of invisible characters, log-likelihoods
that rank nothing, instructions in scripts without spaces, and the guard holding each task to its limit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.annotator import Decoding, Generation
from sft.annotator.base import AnnotatorError
from sft.databuilder import annotate, records
from sft.databuilder.annotate.common import guard_problem

DECODING = Decoding(max_new_tokens=16)


class Answers:
  """An annotator that answers every chat with the next of its fixed generations."""

  fingerprint = "fixed"

  def __init__(self, generations, loglik=None):
    self.generations, self.loglik = list(generations), loglik or {}

  def generate(self, chats, decoding):
    return [self.generations.pop(0) for _ in chats]

  def log_likelihoods(self, chats, answers):
    return [self.loglik[a] for a in answers]


def _chat(user, assistant, record_id="x:1"):
  return records.chat(record_id, "x", [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def _unlabelled(labels, n=1):
  return [
      records.chat(f"r:{i}", "r", [{"role": "user", "content": "Classify: hi"}], labels=list(labels), needs_label=True)
      for i in range(n)
  ]


@pytest.mark.parametrize(
    "answer, labels, expected",
    [
        ("The answer is man, not woman.", ["man", "woman"], None),  # two labels named: "man" is no part of "woman"
        ("man or woman", ["man", "woman"], None),
        ("woman", ["man", "woman"], "woman"),
        ("-", ["+", "-"], "-"),  # labels that are all punctuation: read as written
        ("\N{THUMBS DOWN SIGN}", ["\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"], "\N{THUMBS DOWN SIGN}"),
        ("C", ["C++", "C"], "C"),
        (" c++ ", ["C++", "C"], "C++"),
        ("the language is c", ["C++", "C"], None),  # both read "c" once punctuation is gone: not told apart
        ("pos or positive", ["pos", "positive", "negative"], None),
        ("it is very good", ["good", "very good"], "very good"),  # "good" only inside "very good"
        ("good, very good", ["good", "very good"], None),
        ("Positive.", ["positive", "negative"], "positive"),
    ],
)
def test_a_label_answer_names_one_label_or_none(answer, labels, expected):
  assert annotate.parse_label(answer, labels) == expected


_LABEL = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LABEL, min_size=1, max_size=6, unique_by=lambda x: x.strip().casefold()), st.data())
def test_a_label_answered_as_written_is_that_label_and_nothing_else_is_ever_invented(labels, data):
  labels = [x for x in labels if x.strip()]
  if not labels:
    return
  pick = data.draw(st.sampled_from(labels))
  assert annotate.parse_label(pick, labels) == pick
  assert annotate.parse_label(f"  {pick.upper()}  ", labels) in (pick, None)  # upper() can turn one label into another
  noise = data.draw(st.text(max_size=40))
  assert annotate.parse_label(noise, labels) in (*labels, None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z]{1,6}( [a-z]{1,6})?", fullmatch=True), min_size=2, max_size=5, unique=True), st.data())
def test_an_answer_that_names_two_labels_is_never_read_as_one(labels, data):
  first, second = data.draw(st.permutations(labels))[:2]
  assert annotate.parse_label(f"{first}, or maybe {second}", labels) is None


@pytest.mark.parametrize(
    "answer, score",
    [
        ("4", 4), ("Score: 4.", 4), ("The score is 5.", 5), ("**4**", 4), ("**Score:** 3", 3), ("4/5", 4),
        ("I would say 4/5", 4), ("Score: 3 (out of 5)", 3), ("I'd give it a 3 out of 5 but 2 for style", 3),
        ("On a scale of 1 to 5, I give it 4.", 4), ("Using the rubric (1-5): 4", 4), ("Score (1-5): 4", 4),
        ("1. The response is correct. Score: 4", 4), ("5\n\nIt meets point 2 of the rubric.", 5), ("Rating: 4", 4),
        ("2/10", None), ("2 out of 10", None), ("4.5", None), ("3.5", None), ("4,5", None), ("10", None),
        ("great", None), ("1-5", None), ("maybe 3, maybe 2", None), ("I give it 4 out of 5. Score: 2", None),
    ],
)
def test_judge_scores_are_read_as_models_write_them(answer, score):
  assert annotate.parse_score(answer) == score


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_a_judge_answer_gives_a_score_of_1_to_5_or_none(text):
  score = annotate.parse_score(text)
  assert score is None or (1 <= score <= 5 and str(score) in text)
  if not any(d in text for d in "12345"):
    assert score is None


def test_judge_answers_cut_short_empty_or_invisible_are_counted_not_read():
  chats = [_chat(f"q{i}", "an answer", f"x:{i}") for i in range(4)]
  answers = [Generation("5", finished=False), Generation("", True), Generation("\u200b\ufeff ", True), Generation("Score: 4.", True)]
  judged = annotate.judge_batch(chats, Answers(answers), DECODING, "rubric", min_score=3)
  assert [r.get("dropped", {}).get("reason") for r in judged] == ["truncated", "empty", "empty", None]
  assert judged[3]["judge_score"] == 4


def test_an_answer_of_invisible_characters_is_an_empty_fill():
  todo = [records.chat(f"a:{i}", "a", [{"role": "user", "content": "Say hi"}], needs_response=True) for i in range(3)]
  answers = [Generation("\u200b", True), Generation("\u2060\ufeff\n", True), Generation("hi\u200b", True)]
  filled = annotate.fill_responses(todo, Answers(answers), DECODING)
  assert [r.get("dropped", {}).get("reason") for r in filled] == ["fill: empty", "fill: empty", None]


@pytest.mark.parametrize(
    "loglik, outcome",
    [
        ({"yes": -1.0, "no": math.nan}, "label: bad score"),
        ({"yes": -math.inf, "no": -math.inf}, "label: bad score"),
        ({"yes": math.inf, "no": -1.0}, "label: bad score"),
        ({"yes": -math.inf, "no": -0.5}, "no"),  # one label impossible: the other, sure
    ],
)
def test_log_likelihoods_that_rank_nothing_never_give_a_label(loglik, outcome):
  [labelled] = annotate.label_records(_unlabelled(["yes", "no"]), Answers([], loglik), DECODING, "loglik", 0.0)
  if outcome.startswith("label:"):
    assert labelled["dropped"]["reason"] == outcome and "label_confidence" not in labelled
  else:
    assert labelled["messages"][-1]["content"] == outcome and labelled["label_confidence"] == 1.0


@pytest.mark.parametrize(
    "seed, copy",
    [
        ("Напиши стихотворение о дожде.", "Напиши стихотворение о дожде!"),
        ("写一首关于雨的诗", "写一首关于雨的诗。"),
        ("เขียนบทกวีเกี่ยวกับฝน", "เขียนบทกวีเกี่ยวกับฝน!"),
    ],
)
def test_self_instruct_novelty_is_measured_in_every_script(seed, copy):
  assert annotate.rouge_l(seed, copy) == 1.0
  seeds = [_chat(seed, "ok", "s:0")]
  params = {"num_instructions": 1, "examples_per_prompt": 1, "seed": 0, "max_similarity": 0.7}
  [new] = annotate.self_instruct(seeds, Answers([Generation(copy, True)]), DECODING, params)
  assert new["dropped"]["reason"] == "self-instruct: too similar"


def test_an_instruction_without_words_is_empty():
  seeds = [_chat("Write a poem.", "ok", "s:0")]
  params = {"num_instructions": 1, "examples_per_prompt": 1, "seed": 0, "max_similarity": 0.7}
  [new] = annotate.self_instruct(seeds, Answers([Generation("\N{CLOUD WITH RAIN}?!", True)]), DECODING, params)
  assert new["dropped"]["reason"] == "self-instruct: empty"


def _fact(annotated=None, stage=None, reason=None, **extra):
  fact = {"annotated": annotated, **extra} if annotated else dict(extra)
  return {**fact, "stage": stage, "reason": reason} if stage else fact


def test_the_guard_holds_each_task_to_its_limit():
  # Every fill answer was cut, every label succeeded: pooled, 12 of 32 (38%) would pass.
  facts = [_fact("response", "annotate", "fill: truncated") for _ in range(12)] + [_fact("label") for _ in range(20)]
  problem = guard_problem(facts, 0.5)
  assert problem.startswith("annotation dropped 12 of the 12 records fill was given (100%") and "label" not in problem
  # A filled record the judge dropped counts for both tasks, against the judge only.
  judged = [_fact("response", "judge", "low score", judge_score=1) for _ in range(3)] + [_fact("response", judge_score=5)]
  problem = guard_problem(judged, 0.5)
  assert problem.startswith("annotation dropped 3 of the 4 records judge was given") and "fill" not in problem
  assert guard_problem(judged, 0.75) is None and guard_problem([_fact("label")], 0.0) is None
  # Dropped before any annotation mark (no annotator): its task is its reason's.
  assert "label was given" in guard_problem([_fact(None, "annotate", "label: unsure")], 0.5)


def _seeds(n):
  return [_chat(f"Seed task {i}?", "ok", f"s:{i}") for i in range(n)]


def test_self_instruct_prompts_differ_beyond_the_number_of_seeds():
  """Prompt i shows seeds in an order seeded by i: a fixed rotation of 10 seeds, 3 at a time, repeated
  itself after 10 prompts, and a repeated prompt's answer is a copy, dropped as too similar."""
  params = {"num_instructions": 40, "examples_per_prompt": 3, "seed": 0, "max_similarity": 0.7}
  prompts = annotate.self_instruct_prompts(_seeds(10), params)
  assert len(prompts) == 40 and len(set(prompts)) >= 36
  assert annotate.self_instruct_prompts(_seeds(10), params) == prompts  # seeded: the same build asks the same
  assert annotate.self_instruct_prompts(_seeds(10), {**params, "seed": 1}) != prompts


def test_self_instruct_says_when_its_seeds_cannot_give_what_was_asked(caplog):
  params = {"num_instructions": 4, "examples_per_prompt": 3, "seed": 0, "max_similarity": 0.7}
  with caplog.at_level("WARNING", logger="sft"):
    assert annotate.self_instruct([], Answers([]), DECODING, params) == []
  assert "no kept chat is left to show as a seed" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="sft"):
    annotate.self_instruct(_seeds(1), Answers([Generation("Write a limerick.", True)] * 5), DECODING, params)
  assert "1 seeds make 1 distinct prompts of the 4 asked for" in caplog.text


def test_the_stage_table_counts_generated_records_where_they_join():
  from sft.databuilder import report

  facts = [{"source": "a"} for _ in range(5)] + [{"source": "a", "stage": "filter", "reason": "x"}]
  facts += [{"source": "self-instruct", "annotated": "self-instruct"} for _ in range(3)]
  facts += [{"source": "self-instruct", "annotated": "self-instruct", "stage": "annotate", "reason": "self-instruct: too similar"}]
  rows = {r["stage"]: r for r in report.funnel(facts)}
  assert (rows["read"]["in"], rows["read"]["out"]) == (6, 6)
  assert (rows["annotate"]["in"], rows["annotate"]["added"], rows["annotate"]["dropped"], rows["annotate"]["out"]) == (10, 4, 1, 9)
  assert rows["judge"]["out"] == 8 == len(facts) - 2


@pytest.mark.parametrize(
    "answers, message",
    [
        (["4"], "answers 1 of 1 is str '4', not a Generation"),
        (None, "returned NoneType for 1 prompts"),
        ([Generation(None, True)], "not a Generation"),
        ([Generation("4", "yes")], "not a Generation"),
    ],
)
def test_an_annotator_that_answers_the_wrong_type_is_an_error_naming_it(answers, message):
  class Odd(Answers):
    def generate(self, chats, decoding):
      return answers

  with pytest.raises(AnnotatorError, match=message):
    annotate.judge_batch([_chat("q", "a")], Odd([]), DECODING, "rubric", min_score=3)


@pytest.mark.parametrize("scores", [["-1.0", "-2.0"], [True, False], [-1.0, None], np.asarray([-1.0])])
def test_log_likelihoods_of_the_wrong_type_are_an_error_naming_them(scores):
  class Odd(Answers):
    def log_likelihoods(self, chats, answers):
      return scores[: len(chats)] if len(scores) >= len(chats) else scores

  with pytest.raises(AnnotatorError, match="log-likelihoods"):
    annotate.label_records(_unlabelled(["yes", "no"]), Odd([]), DECODING, "loglik", 0.0)
