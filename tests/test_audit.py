"""The data audit: a tiny build is sampled, reviewed by hand with known verdicts and scored, and every figure
is checked against its value worked out here; a machine reviewer fills a sample; gold answers are scored
without a review; hostile review files are counted rejections (or a ConfigError), never a traceback."""

import csv
import hashlib
import io
import json
import math
import pathlib
import statistics
import subprocess
import sys

import pytest

import sft
from configs import audit as audit_configs
from sft.annotator.base import Generation
from sft.audit import data, report, review, sample, score
from sft.databuilder import build_config, build_dataset
from sft.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOOD = [
    ("Explain how to water tomato plants during a hot and dry summer week.",
     "Water them deeply early in the morning, at the base, so the roots get the moisture before the heat."),
    ("Describe a simple way to keep bread fresh for several days at home.",
     "Keep it wrapped in a cloth or paper bag at room temperature, away from direct sunlight and heat."),
    ("What should a beginner pack for a short hike in the nearby mountains?",
     "Bring water, a snack, a light jacket, sun cream, a map of the trail and shoes with a good grip."),
    ("Give one tip for learning the names of new colleagues at work quickly.",
     "Repeat each name when you are introduced and use it again in the conversation soon after."),
    ("How can someone reduce the noise of a squeaking wooden door at home?",
     "Rub a little soap or candle wax on the hinges, or add a drop of oil and swing the door a few times."),
    ("Suggest a quick breakfast that is healthy and easy to prepare before work.",
     "Oats soaked overnight in milk with some fruit and nuts are ready in the morning without cooking."),
    ("What is a good way to remember to drink enough water during the day?",
     "Keep a full bottle on your desk and refill it at fixed times, such as every meal and every break."),
    ("How do you clean a cast iron pan without damaging its surface?",
     "Rinse it with hot water, scrub with a brush, dry it on the stove and rub in a thin layer of oil."),
]
REFUSAL = "I'm sorry, but as an AI language model I cannot help with that request today."
REVIEWS = {"verdict", "right_label", "reviewer"}


def chat_row(prompt, answer):
  return json.dumps({"instruction": prompt, "output": answer}) + "\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A build of 16 records: 8 chats and 4 labelled reviews kept; 2 refusals, a duplicate and a bad line dropped."""
  raw = tmp_path_factory.mktemp("raw")
  lines = [chat_row(p, a) for p, a in GOOD]
  lines += [chat_row("Tell me a secret about the moon and its far side.", REFUSAL)]
  lines += [chat_row("Tell me something about the history of the old town.", REFUSAL)]
  lines += [chat_row(*GOOD[0]), "{not json\n"]
  (raw / "chats.jsonl").write_text("".join(lines))
  films = ["The film was a delight from the first scene to the last one.", "A dull story told far too slowly for anyone.",
           "The actors were wonderful and the music lifted every moment.", "I left before the end because it bored me so much."]
  (raw / "films.jsonl").write_text("".join(
      json.dumps({"text": t, "label": "positive" if i % 2 == 0 else "negative", "labels": ["positive", "negative"]}) + "\n"
      for i, t in enumerate(films)
  ))
  config = build_config()
  config.input_dir = str(raw)
  config.num_workers = 1
  config.output.validation_fraction = 0.0
  out = tmp_path_factory.mktemp("build") / "data"
  build_dataset(config, out, progress=False)
  return out


def audit_config(build_dir, **keys):
  config = audit_configs.get_config()
  config.build_dir = str(build_dir)
  config.bootstrap_samples = 200
  for k, v in keys.items():
    setattr(config, k, v)
  return config


def read_rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def wilson(k, n):
  """Wilson's 95% score interval, written out from its formula."""
  z = statistics.NormalDist().inv_cdf(0.975)
  p = k / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


# --- sample -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(built, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("audit")
  out = sft.audit(audit_config(built, per_stratum=4, seed=3), workdir)
  return workdir, out


def test_the_sample_is_stratified_seeded_and_names_the_build(built, sampled):
  workdir, out = sampled
  rows = read_rows(workdir / "review.jsonl")
  digest = hashlib.sha256((built / "manifest.json").read_bytes()).hexdigest()
  assert {r["build"] for r in rows} == {digest}
  sizes = {r["stratum"]: r["stratum_size"] for r in rows}
  assert sizes == {
      "dropped: dedup: exact duplicate": 1, "dropped: filter: refusal boilerplate": 2, "dropped: read: bad json": 1,
      "kept: chat / chats.jsonl": 8, "kept: classification / films.jsonl": 4,
  }
  per = {s: sum(r["stratum"] == s for r in rows) for s in sizes}
  assert per == {s: min(4, n) for s, n in sizes.items()} and out["rows"] == len(rows) == 12
  assert all(r[k] == "" for r in rows for k in ("verdict", "right_label", "reviewer", "note"))
  assert len({r["review_id"] for r in rows}) == len(rows)
  # The CSV holds the same rows; sampling again with the same seed rewrites the same bytes, another seed is refused.
  csv_rows = list(csv.DictReader(io.StringIO((workdir / "review.csv").read_text(encoding="utf-8-sig"))))
  assert [{k: str(v) for k, v in r.items()} for r in rows] == csv_rows
  before = (workdir / "review.jsonl").read_bytes()
  sft.audit(audit_config(built, per_stratum=4, seed=3), workdir)
  assert (workdir / "review.jsonl").read_bytes() == before
  with pytest.raises(ConfigError, match="another sample"):
    sft.audit(audit_config(built, per_stratum=4, seed=4), workdir)
  assert "verdict" in (workdir / "instructions.md").read_text()


def test_kept_chats_show_the_trained_text_marked(sampled, tokenizer):
  workdir, _ = sampled
  rows = read_rows(workdir / "review.jsonl")
  chat = next(r for r in rows if r["stratum"] == "kept: chat / chats.jsonl")
  assert chat["marks"].startswith("assistant turns")
  answer = next(a for p, a in GOOD if p in chat["text"])
  assert f"assistant: {data.MARK_OPEN}{answer}{data.MARK_CLOSE}" in chat["text"]
  dropped = next(r for r in rows if r["status"] == "dropped: filter: refusal boilerplate")
  assert data.MARK_OPEN not in dropped["text"] and "dropped because" in dropped["text"]
  label = next(r for r in rows if r["stratum"].startswith("kept: classification"))
  assert label["label"] in ("positive", "negative") and label["labels"] == "positive | negative"
  # With a tokenizer: the loss mask's runs are marked, and they hold the answer, not the prompt.
  record = {"id": "x", "kind": "chat", "messages": [{"role": "user", "content": "join two strings"},
                                                    {"role": "assistant", "content": "use the join method"}]}
  text, marks = data.review_text(record, tokenizer, 10_000)
  assert marks == "the tokenizer's loss mask"
  inside = text.split(data.MARK_OPEN, 1)[1].split(data.MARK_CLOSE, 1)[0]
  assert "join method" in inside and "two strings" not in inside


# --- score ------------------------------------------------------------------------------------------

# Known verdicts: one refusal of two was wrongly dropped; one sampled kept chat of four should have gone;
# one labelled review of four carries the wrong label.
def fill(rows, reviewer="ann"):
  filled, kept_chats = [], 0
  for r in rows:
    r = dict(r, reviewer=reviewer)
    if r["status"].startswith("dropped"):
      wrong = r["stratum"] == "dropped: filter: refusal boilerplate" and "moon" in r["text"]
      r["verdict"] = "keep" if wrong else "drop"
    elif r["label"]:
      r["verdict"] = "keep"
      r["right_label"] = r["label"] if "wonderful" not in r["text"] else ("negative" if r["label"] == "positive" else "positive")
    else:
      r["verdict"] = "drop" if kept_chats == 0 else "keep"
      kept_chats += 1
    filled.append(r)
  return filled


@pytest.fixture(scope="module")
def scored(built, sampled):
  workdir, _ = sampled
  reviews = write_jsonl(workdir / "ann.jsonl", fill(read_rows(workdir / "review.jsonl")))
  before = (built / "report.md").read_text()
  results = sft.audit(audit_config(built, mode="score", reviews=(reviews,), seed=3), workdir)
  return workdir, results, before


def test_precision_error_rate_and_recall_are_the_worked_values(scored):
  _, results, _ = scored
  precision = {p["stratum"]: p for p in results["drop_precision"]}
  refusal = precision["dropped: filter: refusal boilerplate"]
  assert (refusal["k"], refusal["n"], refusal["value"]) == (1, 2, 0.5)
  assert (refusal["low"], refusal["high"]) == pytest.approx(wilson(1, 2))
  assert precision["dropped: dedup: exact duplicate"]["value"] == 1.0
  assert precision["dropped: read: bad json"]["value"] == 1.0
  kept = {s["stratum"]: s for s in results["kept_error"]["strata"]}
  chats = kept["kept: chat / chats.jsonl"]
  assert (chats["k"], chats["n"], chats["size"], chats["value"]) == (1, 4, 8, 0.25)
  assert (chats["low"], chats["high"]) == pytest.approx(wilson(1, 4))
  assert kept["kept: classification / films.jsonl"]["value"] == 0.0
  # Weighted by the strata's sizes (8 and 4 records), not pooled over the 8 reviewed (1 / 8).
  overall = results["kept_error"]["overall"]
  assert overall["value"] == pytest.approx((8 * 0.25 + 4 * 0.0) / 12)
  assert overall["low"] <= overall["value"] <= overall["high"] and overall["coverage"] == 1.0
  # Bad records removed: 2 x 1/2 + 1 + 1 = 3; still kept: 8 x 1/4 = 2; recall 3 / 5.
  recall = results["recall"]
  assert (recall["removed_bad"], recall["kept_bad"]) == pytest.approx((3.0, 2.0))
  assert recall["value"] == pytest.approx(0.6)
  assert 0.0 <= recall["low"] <= 0.6 <= recall["high"] <= 1.0


def test_the_overall_figures_from_few_records_are_marked(scored):
  workdir, results, _ = scored
  # The kept error rate rests on the 8 kept records reviewed, the recall on those and the 4 dropped ones.
  assert (results["kept_error"]["overall"]["n"], results["recall"]["n"]) == (8, 12)
  lines = [x for x in (workdir / "report.md").read_text().splitlines() if x.startswith(("- Kept records judged", "- Recall of"))]
  assert len(lines) == 2 and all("(few items)" in x for x in lines)


def test_label_accuracy_and_its_classification_report(scored):
  _, results, _ = scored
  labels = next(a for a in results["annotation_accuracy"] if a["kind"] == "source label")
  assert (labels["k"], labels["n"], labels["value"]) == (3, 4, 0.75)
  assert (labels["low"], labels["high"]) == pytest.approx(wilson(3, 4))
  report_ = labels["classification"]
  assert report_["accuracy"] == 0.75 and report_["labels"] == ["negative", "positive"]
  assert sum(map(sum, report_["confusion_matrix"])) == 4 and sum(report_["confusion_matrix"][i][i] for i in range(2)) == 3


def test_reports_and_the_build_reports_data_quality_section(built, scored):
  workdir, results, before = scored
  text = (workdir / "report.md").read_text()
  assert "refusal boilerplate" in text and "0.600" in text
  assert json.loads((workdir / "results.json").read_text())["recall"]["value"] == pytest.approx(0.6)
  after = (built / "report.md").read_text()
  assert after.startswith(before) and after.count(report.SECTION) == 1
  # Scoring again replaces the section, and a section in the middle is replaced with what follows kept.
  sft.audit(audit_config(built, mode="score", reviews=(str(workdir / "ann.jsonl"),), seed=3), workdir)
  assert (built / "report.md").read_text() == after
  middle = "# R\n\n## A\n\na\n\n## Data quality\n\nold\n\n## B\n\nb\n"
  replaced = report.with_section(middle, "## Data quality\n\nnew\n")
  assert replaced == "# R\n\n## A\n\na\n\n## Data quality\n\nnew\n\n## B\n\nb\n"


def test_agreement_is_cohens_kappa_and_people_outvote_the_machine(built, sampled, tmp_path):
  from sklearn.metrics import cohen_kappa_score

  workdir, _ = sampled
  rows = fill(read_rows(workdir / "review.jsonl"))
  ann = write_jsonl(tmp_path / "ann.jsonl", rows)
  # bob disagrees with ann on two records; the machine reviews them all, the opposite of ann on three.
  flip = {"keep": "drop", "drop": "keep"}
  bob = [dict(r, reviewer="bob", verdict=flip[r["verdict"]] if i in (0, 5) else r["verdict"]) for i, r in enumerate(rows)]
  machine = [dict(r, reviewer="machine", verdict=flip[r["verdict"]] if i in (1, 2, 6) else r["verdict"], right_label="") for i, r in enumerate(rows)]
  files = (ann, write_jsonl(tmp_path / "bob.jsonl", bob), write_jsonl(tmp_path / "machine.jsonl", machine))
  results = sft.audit(audit_config(built, mode="score", reviews=files, seed=3), tmp_path / "out")
  pairs = {(p["a"], p["b"], p["what"]): p for p in results["agreement"]}
  a, b, m = ([r["verdict"] for r in x] for x in (rows, bob, machine))
  for (first, second), (x, y) in {("ann", "bob"): (a, b), ("ann", "machine"): (a, m)}.items():
    pair = pairs[first, second, "verdict"]
    # By hand: observed agreement, chance agreement from each reviewer's share of "drop".
    n = len(x)
    observed = sum(i == j for i, j in zip(x, y)) / n
    chance = (x.count("drop") * y.count("drop") + x.count("keep") * y.count("keep")) / n**2
    assert pair["kappa"]["value"] == pytest.approx((observed - chance) / (1 - chance))
    assert pair["kappa"]["value"] == pytest.approx(cohen_kappa_score(x, y))
    assert pair["agreement"]["value"] == pytest.approx(observed) and pair["machine"] == (second == "machine")
  # ann and bob split evenly on two records: those are left out (the machine does not break a tie).
  assert results["reviews"]["split_evenly"] == 2 and results["reviews"]["records"] == len(rows) - 2


def test_an_even_split_on_the_right_label_is_counted():
  digest = "a" * 64
  facts = {"stratum": "kept: classification / s", "kept": True, "annotated": None, "label": "positive",
           "labels": ["positive", "negative"], "response": "positive", "gold": None}
  known = {f"r{i}": dict(facts, id=f"r{i}") for i in range(3)}
  given = {"r0": ("positive", "negative"), "r1": ("positive", "positive"), "r2": ("negative", "positive")}  # ann, bob
  rows = [review.Review(sample.review_id(digest, i), i, who, "keep", label, "f", 1)
          for i, labels in given.items() for who, label in zip(("ann", "bob"), labels)]
  results = score.score(score.Index({facts["stratum"]: 3}, known, []), review.resolve(review.Reviews(rows), known), 50, 0)
  assert (results["reviews"]["split_evenly"], results["reviews"]["label_split_evenly"]) == (0, 2)
  accuracy = next(a for a in results["annotation_accuracy"] if a["kind"] == "source label")
  assert (accuracy["k"], accuracy["n"]) == (1, 1)
  text = report.write_markdown(dict(results, build={"folder": "x", "sha256": digest}))
  assert "2 left out of label accuracy (split evenly on right_label)" in text


# --- gold and the machine reviewer ----------------------------------------------------------------


def hand_build(folder, records):
  """A build folder written as the builder writes one (a record per line, the manifest naming each file and its
  size), for record fields today's builder does not yet write."""
  folder.mkdir(parents=True)
  body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
  (folder / "train-00000-of-00001.jsonl").write_text(body)
  (folder / "rejected-00000-of-00001.jsonl").write_text("")
  outputs = [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(folder.glob("*.jsonl"))]
  manifest = {"config_hash": "0" * 16, "outputs": outputs, "accounting": {"total": {"read": len(records)}}}
  (folder / "manifest.json").write_text(json.dumps(manifest))
  return folder


def labelled(i, label, gold, **extra):
  messages = [{"role": "user", "content": f"Is review {i} positive or negative?"}, {"role": "assistant", "content": label}]
  return {"id": f"r{i}", "source": "s", "kind": "chat", "task": "classification", "messages": messages,
          "labels": ["positive", "negative"], "annotated": "label", "label_confidence": 0.9, "gold": gold, **extra}


def test_gold_answers_score_annotations_without_a_review(tmp_path):
  answer = {"role": "assistant", "content": "Paris"}
  records = [
      labelled(1, "positive", "positive"), labelled(2, "negative", "negative"), labelled(3, "negative", "positive"),
      labelled(4, "positive", {"odd": 1}),
      {"id": "q1", "source": "s", "kind": "chat", "task": "qa", "annotated": "response", "gold": ["paris", "Paris, France"],
       "messages": [{"role": "user", "content": "Capital of France?"}, answer]},
      {"id": "q2", "source": "s", "kind": "chat", "task": "qa", "annotated": "response", "gold": "Rome",
       "messages": [{"role": "user", "content": "Capital of Italy?"}, answer]},
  ]
  build = hand_build(tmp_path / "build", records)
  results = sft.audit(audit_config(build, mode="score"), tmp_path / "audit")
  kinds = {g["kind"]: g for g in results["gold"]["kinds"]}
  assert (kinds["label"]["k"], kinds["label"]["n"]) == (2, 3) and (kinds["response"]["k"], kinds["response"]["n"]) == (1, 2)
  assert (kinds["label"]["low"], kinds["label"]["high"]) == pytest.approx(wilson(2, 3))
  assert kinds["label"]["classification"]["confusion_matrix"] == [[1, 0, 0], [1, 1, 0]]  # rows: negative, positive
  assert results["gold"]["unusable"] == {"gold is no text, number or list of them": 1}
  assert "Gold answers" in (tmp_path / "audit" / "report.md").read_text()


class Reviewer:
  """A deterministic annotator: drops what reads like a refusal or broken JSON, keeps the rest, picks
  "positive" for every label, and says something unparseable about the bread."""

  fingerprint = "test-reviewer"

  def __init__(self):
    self.decodings = []

  def generate(self, chats, decoding):
    self.decodings.append(decoding)
    out = []
    for chat in chats:
      text = chat[-1]["content"]
      if "Which label" in text:
        out.append(Generation("Positive.", True))
      elif "bread" in text:
        out.append(Generation("It depends.", True))
      else:
        bad = "sorry" in text or "not json" in text
        out.append(Generation("Drop" if bad else "keep, it is fine", True))
    return out

  def log_likelihoods(self, chats, answers):
    raise NotImplementedError


def test_the_machine_reviewer_fills_a_sample(built, tmp_path):
  reviewer = Reviewer()
  config = audit_config(built, mode="judge", per_stratum=20)
  config.judge.max_new_tokens = 7
  out = sft.audit(config, tmp_path, annotator=reviewer)
  rows = read_rows(tmp_path / "review-machine.jsonl")
  assert out["rows"] == len(rows) == 16 and out["unparseable"] == 1
  assert all(r["reviewer"] == "machine" for r in rows) and reviewer.decodings[0].max_new_tokens == 7
  by_status = {(r["status"], r["verdict"]) for r in rows if r["verdict"]}
  assert ("dropped: filter: refusal boilerplate", "drop") in by_status and ("dropped: read: bad json", "drop") in by_status
  unparsed = [r for r in rows if not r["verdict"]]
  assert len(unparsed) == 1 and "unparseable" in unparsed[0]["note"] and "bread" in unparsed[0]["text"]
  films = [r for r in rows if r["label"]]
  assert {r["right_label"] for r in films} == {"positive"}
  assert all(r["verdict"] == ("keep" if r["label"] == "positive" else "drop") for r in films)
  # Its file is scored like a person's.
  results = sft.audit(audit_config(built, mode="score", reviews=(str(tmp_path / "review-machine.jsonl"),)), tmp_path / "s")
  assert results["reviews"]["reviewers"] == ["machine"] and results["reviews"]["records"] == 15


def test_judge_without_an_annotator_is_a_config_error(built, tmp_path):
  with pytest.raises(ConfigError, match="mode=judge needs a model to review with: set judge.model"):
    sft.audit(audit_config(built, mode="judge"), tmp_path)
  config = audit_config(built, mode="judge")
  config.judge.model = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="judge.model=.*nowhere' is not a folder"):
    sft.audit(config, tmp_path)


# --- hostile review files ------------------------------------------------------------------------


def test_a_review_of_another_build_is_refused(built, sampled, tmp_path):
  workdir, _ = sampled
  rows = [dict(r, build="f" * 64) for r in fill(read_rows(workdir / "review.jsonl"))]
  path = write_jsonl(tmp_path / "other.jsonl", rows)
  with pytest.raises(ConfigError, match=r"other\.jsonl reviews another build \(manifest sha256 ffffffffffff"):
    sft.audit(audit_config(built, mode="score", reviews=(path,)), tmp_path / "out")


def test_bad_rows_are_counted_and_named(built, sampled, tmp_path):
  workdir, _ = sampled
  rows = fill(read_rows(workdir / "review.jsonl"))
  digest = rows[0]["build"]
  good = rows[:3]
  bad = [
      dict(rows[3], verdict="maybe"),
      dict(rows[4], verdict=3),
      dict(rows[0]),  # ann reviews the first record again
      dict(rows[5], record_id="nowhere.jsonl:1", review_id=sample.review_id(digest, "nowhere.jsonl:1")),
      dict(rows[6], review_id="R000000000000"),
      dict(rows[7], build="e" * 64),
      dict(next(r for r in rows if r["label"]), right_label="neutral"),
  ]
  text = "".join(json.dumps(r) + "\n" for r in good + bad) + "{broken\n" + "[1, 2]\n" + "\n"
  path = tmp_path / "mixed.jsonl"
  path.write_text(text)
  (tmp_path / "sheet.csv").write_text("name,score\nann,3\n")
  with pytest.raises(ConfigError, match="sheet.csv has no column 'review_id': not a review file"):
    sft.audit(audit_config(built, mode="score", reviews=(str(tmp_path / "sheet.csv"),)), tmp_path / "out")
  (tmp_path / "empty.jsonl").write_bytes(b"")
  (tmp_path / "empty.csv").write_bytes(b"")
  files = (str(path), str(tmp_path / "empty.jsonl"), str(tmp_path / "empty.csv"))
  results = sft.audit(audit_config(built, mode="score", reviews=files), tmp_path / "out")
  reasons = [r["reason"] for r in results["reviews"]["rejected"]]
  assert results["reviews"]["used"] == 3 and len(reasons) == len(bad) + 4
  for expected in ("verdict 'maybe' is not keep or drop", "verdict is a int, not text", "reviewed by ann again",
                   "no record 'nowhere.jsonl:1'", "is not the id of record", "is not this build's",
                   "right_label 'neutral' is not one of the record's labels", "bad JSON", "a JSON list, not an object",
                   "no review rows in the file"):
    assert any(expected in r for r in reasons), (expected, reasons)
  assert "Rejected review rows" in (tmp_path / "out" / "report.md").read_text()


def test_a_filled_csv_is_read_like_the_jsonl(built, sampled, tmp_path):
  workdir, _ = sampled
  filled = {r["review_id"]: r for r in fill(read_rows(workdir / "review.jsonl"))}
  table = list(csv.DictReader(io.StringIO((workdir / "review.csv").read_text(encoding="utf-8-sig"))))
  for row in table:
    row.update({k: filled[row["review_id"]][k] for k in REVIEWS})
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(table[0]))
  writer.writeheader()
  writer.writerows(table)
  (tmp_path / "ann.csv").write_text(out.getvalue() + "a,b\n")
  results = sft.audit(audit_config(built, mode="score", reviews=(str(tmp_path / "ann.csv"),), seed=3), tmp_path / "out")
  assert results["recall"]["value"] == pytest.approx(0.6)
  assert [r["reason"] for r in results["reviews"]["rejected"]] == ["2 fields, the header has 15"]


def test_an_audit_config_is_checked_whole(tmp_path):
  config = audit_configs.get_config()
  with pytest.raises(ConfigError, match="build_dir is not set"):
    sft.audit(config, tmp_path)
  config.build_dir, config.per_stratum, config.mode = str(tmp_path), 0, "grade"
  with pytest.raises(ConfigError, match="2 problems") as err:
    sft.audit(config, tmp_path)
  assert "per_stratum: must be >= 1" in str(err.value) and "mode: must be one of" in str(err.value)
  with pytest.raises(AttributeError):
    config.per_stratm = 3  # locked: a misspelt key fails where it is set
  config.per_stratum, config.mode = 1, "sample"
  with pytest.raises(ConfigError, match="no manifest.json: not a finished data build"):
    sft.audit(config, tmp_path / "audit")


def test_the_launcher_runs_an_audit(built, tmp_path):
  workdir = tmp_path / "audit"
  result = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/audit.py", f"--workdir={workdir}", f"--config.build_dir={built}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (workdir / "review.csv").is_file() and (workdir / "instructions.md").is_file()
