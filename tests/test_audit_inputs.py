"""The data audit's pieces on any input: review files of arbitrary bytes or rows are counted rejections (or a
ConfigError), never a traceback; Cohen's kappa is scikit-learn's; the machine reviewer's answers parse."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.audit import judge, review, sample, score
from sft.errors import ConfigError


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc")), min_size=1, max_size=30))
def test_cohen_kappa_matches_scikit_learn(pairs):
  import warnings

  from sklearn.metrics import cohen_kappa_score

  x, y = [p[0] for p in pairs], [p[1] for p in pairs]
  ours = score.cohen_kappa(x, y)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = cohen_kappa_score(x, y)
  assert (ours is None and math.isnan(theirs)) or ours == pytest.approx(theirs)


def test_parsers_of_the_machine_reviewers_answers():
  assert judge.parse_verdict("Keep.") == "keep" and judge.parse_verdict("DROP it") == "drop"
  assert judge.parse_verdict("keep or drop?") is None and judge.parse_verdict("keeps") is None
  labels = ["good", "very good", "bad"]
  assert judge.parse_label("Very good!", labels) == "very good" and judge.parse_label("it is very good", labels) == "very good"
  assert judge.parse_label("good or bad", labels) is None and judge.parse_label("", labels) is None


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_arbitrary_bytes_are_rejections_or_a_config_error(raw, suffix, tmp_path_factory):
  path = tmp_path_factory.mktemp("bytes") / f"review{suffix}"
  path.write_bytes(raw)
  try:
    reviews = review.parse([str(path)], "a" * 64)
  except ConfigError:
    return
  assert all(r.verdict in ("", "keep", "drop") and r.review_id and r.record_id for r in reviews.reviews)
  assert all(r["file"] == str(path) and r["reason"] for r in reviews.rejected)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.dictionaries(st.sampled_from(sample.COLUMNS), _VALUES, max_size=8), max_size=6))
def test_arbitrary_rows_are_counted_never_a_traceback(rows, tmp_path_factory):
  digest = "b" * 64
  rows = [dict(r, build=digest) if i % 2 else r for i, r in enumerate(rows)]  # some rows of this build, some not
  path = tmp_path_factory.mktemp("rows") / "review.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  try:
    reviews = review.parse([str(path)], digest)
  except ConfigError as err:
    assert "another build" in str(err)
    return
  reviews = review.resolve(reviews, {})
  assert reviews.reviews == []  # no record of an empty build matches
  assert len(reviews.rejected) + reviews.unfilled >= len(rows) or not rows


# --- labels, reviewers and files that look alike ----------------------------------------------------------

DIGEST = "c" * 64


def filled_row(record_id, verdict="keep", reviewer="", right_label="", build=DIGEST):
  row = dict.fromkeys(sample.COLUMNS, "")
  return dict(row, review_id=sample.review_id(DIGEST, record_id), build=build, record_id=record_id, verdict=verdict,
              reviewer=reviewer, right_label=right_label)


def label_facts(label, labels, annotated="label"):
  return {"id": "", "stratum": "kept: classification / s", "kept": True, "annotated": annotated, "label": label,
          "labels": labels, "response": label, "gold": None}


# Labels that often collide once SQuAD-normalised: "+" and "-" are both "", "a" is an article, "b!" is "b".
_LABELS = st.lists(st.text(alphabet="+-!aAb ", min_size=1, max_size=3).filter(str.strip), min_size=2, max_size=4,
                   unique_by=lambda x: x.strip().casefold())


@settings(max_examples=80, deadline=None)
@given(labels=_LABELS, picks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=6))
def test_label_accuracy_counts_labels_as_written_even_when_they_normalise_alike(labels, picks):
  """Every reviewer names a label of the set (perhaps in capitals, padded): it is kept as that label, never
  rewritten to another, and the accuracy counts exactly the records whose label it is."""
  picks = [(given % len(labels), right % len(labels), shout) for given, right, shout in picks]
  known = {f"r{i}": label_facts(labels[given], labels) for i, (given, _, _) in enumerate(picks)}
  written = [f" {labels[right].upper()} " if shout else labels[right] for _, right, shout in picks]
  reviews = review.Reviews([
      review.Review(sample.review_id(DIGEST, f"r{i}"), f"r{i}", "ann", "keep", text, "f", i) for i, text in enumerate(written)
  ])
  reviews = review.resolve(reviews, known)
  assert reviews.rejected == [] and [r.right_label for r in reviews.reviews] == [labels[right] for _, right, _ in picks]
  accuracy = score.annotation_accuracy({}, {r.record_id: r.right_label for r in reviews.reviews}, known)
  assert (accuracy[0]["k"], accuracy[0]["n"]) == (sum(given == right for given, right, _ in picks), len(picks))


def test_a_right_label_naming_no_label_or_several_is_a_named_rejection():
  known = {
      "q": label_facts("B", ["A", "B", "C", "D"]),  # "The" and "A" both normalise to ""
      "p": label_facts("positive", ["positive", "Positive!"]),
      "s": label_facts("positive", ["positive", "negative"]),
  }
  given = [("q", "The"), ("q", "a"), ("p", "POSITIVE."), ("s", "Negative!"), ("s", "neutral")]
  reviews = review.Reviews([
      review.Review(sample.review_id(DIGEST, i), i, f"r{n}", "keep", text, "f", n) for n, (i, text) in enumerate(given)
  ])
  reviews = review.resolve(reviews, known)
  assert [(r.record_id, r.right_label) for r in reviews.reviews] == [("q", "A"), ("s", "negative")]
  assert [r["reason"] for r in reviews.rejected] == [
      "right_label 'The' is not one of the record's labels (A | B | C | D): write it as the label set does",
      "right_label 'POSITIVE.' could be any of the record's labels (positive | Positive!): write it as the label set does",
      "right_label 'neutral' is not one of the record's labels (positive | negative): write it as the label set does",
  ]


def test_gold_labels_that_normalise_alike_are_still_different():
  gold = [dict(label_facts("+", ["+", "-"]), gold="-"), dict(label_facts("+", ["+", "-"]), gold=["+"]),
          dict(label_facts("Positive", ["positive", "negative"]), gold="neutral"),
          dict(label_facts(".", None, annotated="response"), response="!", gold="?"),
          dict(label_facts(None, None, annotated="response"), response="The Paris.", gold=["Rome", "paris"])]
  kinds = {g["kind"]: g for g in score.gold_accuracy(gold)["kinds"]}
  assert (kinds["label"]["k"], kinds["label"]["n"]) == (1, 3) and (kinds["response"]["k"], kinds["response"]["n"]) == (1, 2)


@settings(max_examples=30, deadline=None)
@given(records=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True), bom=st.booleans(),
       pad=st.sampled_from(["", " ", "\t", "  \r"]), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_a_byte_order_mark_or_a_padded_build_cell_changes_nothing(records, bom, pad, suffix, tmp_path_factory):
  """An editor's byte order mark (JSONL too) and spaces a spreadsheet left round the build's hash lose no row."""
  folder = tmp_path_factory.mktemp("bom")
  rows = [filled_row(r, reviewer="ann") for r in records]
  text = (sample.jsonl_text if suffix == ".jsonl" else sample.csv_text)([dict(r, build=r["build"] + pad) for r in rows])
  (folder / f"review{suffix}").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
  reviews = review.parse([str(folder / f"review{suffix}")], DIGEST)
  assert reviews.rejected == [] and [r.record_id for r in reviews.reviews] == records


def test_a_review_of_another_build_names_both_hashes_whole(tmp_path):
  other = DIGEST[:-1] + "d"  # alike for 63 characters
  path = tmp_path / "review.jsonl"
  path.write_text(sample.jsonl_text([filled_row("a", build=other)]))
  with pytest.raises(ConfigError, match="reviews another build") as err:
    review.parse([str(path)], DIGEST)
  assert other in str(err.value) and DIGEST in str(err.value)


def test_unnamed_reviewers_are_told_apart_by_their_files_path(tmp_path):
  paths = []
  for who, verdicts in {"alice": ("keep", "drop", "keep"), "bob": ("keep", "drop", "drop")}.items():
    (tmp_path / who).mkdir()
    paths.append(tmp_path / who / "review.csv")  # the same file name, filled by two people who left reviewer empty
    paths[-1].write_text(sample.csv_text([filled_row(r, verdict=v) for r, v in zip("abc", verdicts)]))
  reviews = review.parse([str(p) for p in paths], DIGEST)
  assert reviews.rejected == [] and len(reviews.reviews) == 6
  assert sorted({r.reviewer for r in reviews.reviews}) == [f"unnamed ({p})" for p in paths]
  assert [p["agreement"]["n"] for p in score.agreement(reviews.reviews, 20, 0)] == [3]


@settings(max_examples=30, deadline=None)
@given(names=st.lists(st.sampled_from(["Alice", "alice", " ALICE", "Bob", "bob", "machine", "Machine"]), min_size=1, max_size=5))
def test_a_reviewer_is_one_person_whatever_the_case_of_the_name(names, tmp_path_factory):
  """A name written in another case is the same reviewer (shown as first written), whose second review of a
  record is rejected; only the exact name "machine" is the model."""
  folder = tmp_path_factory.mktemp("names")
  paths = [folder / f"{i}.jsonl" for i in range(len(names))]
  for path, name in zip(paths, names):
    path.write_text(sample.jsonl_text([filled_row("a", reviewer=name)]))
  reviews = review.parse([str(p) for p in paths], DIGEST)
  people = {n.strip().casefold() for n in names if n != "machine"}
  assert len(reviews.reviews) == len(people) + ("machine" in names)
  assert len(reviews.rejected) == len(names) - len(reviews.reviews)
  assert all("reviewed by" in r["reason"] and "again" in r["reason"] for r in reviews.rejected)
  first = {n.strip().casefold(): n.strip() for n in reversed(names) if n != "machine"}
  assert sorted(r.reviewer for r in reviews.reviews) == sorted(first.values()) + ["machine"] * ("machine" in names)
