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
