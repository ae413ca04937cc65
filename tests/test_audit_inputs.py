"""The data audit's pieces on any input: review files of arbitrary bytes or rows are counted rejections (or a
ConfigError), never a traceback; Cohen's kappa is scikit-learn's; the machine reviewer's answers parse."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.annotator.base import Generation
from sft.audit import judge, report, review, sample, score
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


# --- the machine reviewer's answers: a verdict only from an answer that is one, and nothing that negates it ----

NEGATIONS = ["not", "no", "never", "don't", "Don’t", "isn't", "n't", "cannot", "NOT", "No.", "won't", "nor", "neither"]
_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


def test_negated_answers_give_no_verdict_and_plain_ones_do():
  for answer in ("I would not keep it.", "Keep? No.", "Don't keep this one.", "Definitely not keep", "Do not drop it.",
                 "Keep? No - drop.", "keep or drop", "raindrop", "keeps", ""):
    assert judge.parse_verdict(answer) is None, answer
  for answer, verdict in (("Keep.", "keep"), ("DROP it", "drop"), ("Verdict: drop", "drop"), ("keep, it is fine", "keep")):
    assert judge.parse_verdict(answer) == verdict
  labels = ["positive", "negative"]
  assert judge.parse_label("Not positive.", labels) is None and judge.parse_label("Not positive; it reads negatively", labels) is None
  assert judge.parse_label("Positive.", labels) == "positive"
  # A negation that is a label's own word is the label, not a negation of it.
  assert judge.parse_label("Not spam.", ["spam", "not spam"]) == "not spam" and judge.parse_label("No", ["yes", "no"]) == "no"
  assert judge.parse_label("not not spam", ["spam", "not spam"]) is None and judge.parse_label("not yes", ["yes", "no"]) is None


@settings(max_examples=100, deadline=None)
@given(before=_ANY_TEXT, negation=st.sampled_from(NEGATIONS), after=_ANY_TEXT, verdict=st.sampled_from(["keep", "drop", "positive"]))
def test_an_answer_holding_a_negation_never_gives_a_verdict_or_a_label(before, negation, after, verdict):
  answer = f"{before} {verdict} {negation} {after}"
  assert judge.parse_verdict(answer) is None
  assert judge.parse_label(answer, ["positive", "negative"]) is None
  assert judge.parse_verdict(f"{before} {negation} {verdict} {after}") is None


@settings(max_examples=100, deadline=None)
@given(verdict=st.sampled_from(["keep", "drop"]), upper=st.lists(st.booleans(), min_size=4, max_size=4),
       left=st.text(" \t\n.,:;!?*\"'()[]-", max_size=4), right=st.text(" \t\n.,:;!?*\"'()[]-", max_size=4),
       prefix=st.sampled_from(["", "verdict:", "Verdict -", "VERDICT "]))
def test_the_verdict_word_alone_always_gives_the_verdict(verdict, upper, left, right, prefix):
  word = "".join(c.upper() if u else c for c, u in zip(verdict, upper))
  assert judge.parse_verdict(f"{left}{prefix} {word}{right}") == verdict


def test_an_answer_cut_short_or_failed_fills_no_row_and_is_counted():
  from sft.annotator.base import Decoding

  chat_record = {"kind": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  film = {"kind": "chat", "labels": ["positive", "negative"],
          "messages": [{"role": "user", "content": "Good film"}, {"role": "assistant", "content": "positive"}]}
  answers = {"c0": Generation("keep", False), "f1": Generation("", False, error="HTTP 503"), "f2": Generation("Not positive.", True),
             "c3": Generation("Don't keep it", True), "c4": Generation("", True), "c5": Generation("Keep.", True),
             "f6": Generation("Positive", True)}
  found = {i: dict(film if i.startswith("f") else chat_record, id=i) for i in answers}

  class Answers:
    def generate(self, chats, decoding):
      return list(answers.values())

  rows, unfilled = judge.fill([{"record_id": i, "note": ""} for i in answers], found, Answers(), "rubric", Decoding(max_new_tokens=5), 10)
  assert unfilled == {"unparseable": 3, "truncated": 1, "annotator error": 1}
  assert [r.get("verdict", "") for r in rows] == ["", "", "", "", "", "keep", "keep"] and rows[6]["right_label"] == "positive"
  assert rows[0]["note"].startswith("truncated: cut at max_new_tokens=5") and rows[1]["note"] == "annotator error: HTTP 503"
  assert all("unparseable" in r["note"] for r in rows[2:5]) and all(r["reviewer"] == "machine" for r in rows)


# --- the recall of a build with no dropped (or no kept) record ------------------------------------------


def test_the_recall_of_a_build_without_one_side_is_exact():
  # No dropped record: the filters removed no bad record, so the recall is 0 once a kept record is bad.
  none_dropped = score.stratified({"kept: chat / a": 10}, {}, {"kept: chat / a": (5, 5)}, 50, 0)["recall"]
  assert (none_dropped["removed_bad"], none_dropped["kept_bad"]) == (0.0, 10.0)
  assert (none_dropped["value"], none_dropped["low"], none_dropped["high"]) == (0.0, 0.0, 0.0)
  # No kept record: every bad record was removed.
  none_kept = score.stratified({"dropped: f: r": 8}, {"dropped: f: r": (2, 4)}, {}, 50, 0)["recall"]
  assert (none_kept["removed_bad"], none_kept["kept_bad"], none_kept["value"], none_kept["low"], none_kept["high"]) == (4.0, 0.0, 1.0, 1.0, 1.0)
  # No bad record at all, or a side the build has but nobody reviewed: no recall.
  assert score.stratified({"kept: chat / a": 10}, {}, {"kept: chat / a": (0, 5)}, 50, 0)["recall"]["value"] is None
  unreviewed = score.stratified({"kept: chat / a": 10, "dropped: f: r": 3}, {}, {"kept: chat / a": (5, 5)}, 50, 0)["recall"]
  assert (unreviewed["value"], unreviewed["removed_bad"]) == (None, None)


# --- record ids and reviewer names as written ----------------------------------------------------------

_ID = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.sampled_from("'=+-@\t\ra"), max_size=4) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
def test_a_csv_cell_reads_back_as_written(text):
  assert review._uncell(sample._cell(text)) == text


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(_ID, min_size=1, max_size=4, unique=True), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_any_record_id_survives_the_review_file(ids, suffix, tmp_path_factory):
  """A record id is read back as written (" lead.jsonl:1" with its space, "'=q.jsonl:1" with its quote), so
  the review of any record is its record's."""
  ids = [*ids, " lead.jsonl:1", "'=q.jsonl:1", "''x"]
  path = tmp_path_factory.mktemp("ids") / f"review{suffix}"
  text = (sample.jsonl_text if suffix == ".jsonl" else sample.csv_text)([filled_row(i, reviewer="ann") for i in dict.fromkeys(ids)])
  path.write_text(text, encoding="utf-8", newline="")
  reviews = review.parse([str(path)], DIGEST)
  assert reviews.rejected == [] and [r.record_id for r in reviews.reviews] == list(dict.fromkeys(ids))


def quality_results(reviewers):
  results = score.score(score.Index({"kept: chat / a": 1}, {}, []), review.Reviews(), 10, 0)
  return dict(results, reviews=dict(results["reviews"], reviewers=reviewers), build={"folder": "b\n## x", "sha256": DIGEST})


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.text(st.sampled_from("ab #*_`[]<>|\n\r\t-=."), max_size=12), max_size=3),
       path=st.text(st.sampled_from("a/`#\n "), min_size=1, max_size=8))
def test_a_reviewers_name_adds_no_heading_to_the_report(names, path):
  """Whatever the names (or the report's path), the section is one heading and what follows it on lines
  that start no heading; scoring again leaves one section, and the audit's own report one line per title."""
  names = [" ".join(n.split()) for n in names]  # as review.parse reads them
  section = report.quality_section(quality_results(names), path)
  assert [x for x in section.splitlines() if x.startswith("#")] == [report.SECTION]
  build_report = report.with_section(report.with_section("# Build\n\ntext\n", section), section)
  assert build_report.count(report.SECTION) == 1 and build_report.startswith("# Build\n\ntext\n")
  headings = [x for x in report.write_markdown(quality_results(names)).splitlines() if x.startswith("#")]
  assert len(headings) == len(set(headings)) and report.SECTION not in headings


def test_a_reviewers_name_is_read_on_one_line_and_an_old_duplicate_section_goes(tmp_path):
  path = tmp_path / "review.jsonl"
  path.write_text(sample.jsonl_text([filled_row("a", reviewer="eve\n## Data quality\r\nstale ")]))
  assert [r.reviewer for r in review.parse([str(path)], DIGEST).reviews] == ["eve ## Data quality stale"]
  split = "# R\n\n## Data quality\n\nold\n\n## Data quality\nstale\n\n## B\n\nb\n"
  assert report.with_section(split, "## Data quality\n\nnew\n") == "# R\n\n## Data quality\n\nnew\n\n## B\n\nb\n"
