"""The whole data build: every planted record lands in its bucket, the accounting adds up, the output
is byte-identical across runs, runners and worker counts, and the trainer reads it. A build never loses
data: a failed one leaves the previous build as it was, and a rebuild removes only what the previous
build wrote."""

import json
import pathlib
import shutil

import ml_collections
import pytest

from sft.annotator.base import Generation
from sft.databuilder import build, build_config, build_dataset, records, report, runner_local
from sft.errors import ConfigError
from sft.trainer import sources

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIX = ROOT / "experiments" / "sft_mix"

# Every planted problem of experiments/sft_mix/raw, and where it must land.
EXPECTED_DROPS = {
    "alpaca.jsonl:4": ("dedup", "exact duplicate"),
    "alpaca.jsonl:6": ("annotate", "missing response"),
    "alpaca.jsonl:7": ("filter", "refusal boilerplate"),
    "alpaca.jsonl:10": ("read", "wrong type"),
    "alpaca.jsonl:11": ("read", "bad json"),
    "sharegpt.json:0": ("dedup", "near duplicate"),
    "sharegpt.json:2": ("read", "unknown role"),
    "sharegpt.json:3": ("read", "empty turn"),
    "messages.jsonl:2": ("filter", "language"),
    "messages.jsonl:3": ("filter", "trivial response"),
    "messages.jsonl:4": ("decontaminate", "overlaps eval set"),
    "messages.jsonl:6": ("read", "wrong type"),
    "prompts.parquet:2": ("filter", "response repeats prompt"),
    "reviews.csv:5": ("read", "wrong number of fields"),
    "structured.jsonl:5": ("read", "unknown schema"),
    "docs/latin1.txt": ("read", "invalid utf-8"),
    "docs/spam.txt": ("filter", "gopher: stop words"),
    "notes.xml": ("read", "unsupported file type"),
}


def mix_config(**overrides):
  config = build_config()
  config.input_dir = str(MIX / "raw")
  config.decontaminate.eval_files = (str(MIX / "eval" / "benchmark.jsonl"),)
  config.output.validation_fraction = 0.2
  config.output.num_shards = 2
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def shard_bytes(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.glob("*-of-*"))}


def read_jsonl(folder: pathlib.Path, split: str) -> list[dict]:
  return [json.loads(line) for p in sorted(folder.glob(f"{split}-*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("mix")
  return out, build_dataset(mix_config(), out, progress=False)


def test_every_planted_record_lands_in_its_bucket(built):
  out, manifest = built
  rejected = {r["id"]: (r["dropped"]["stage"], r["dropped"]["reason"]) for r in read_jsonl(out, "rejected")}
  assert rejected == EXPECTED_DROPS
  near = next(r for r in read_jsonl(out, "rejected") if r["id"] == "sharegpt.json:0")
  assert near["dropped"]["duplicate_of"] == "alpaca.jsonl:1"
  contaminated = next(r for r in read_jsonl(out, "rejected") if r["id"] == "messages.jsonl:4")
  assert contaminated["dropped"]["detail"].startswith("eval:benchmark.jsonl:1:")

  kept = {r["id"]: r for split in ("train", "validation", "pretrain") for r in read_jsonl(out, split)}
  assert len(kept) == 20 and not set(kept) & set(rejected)
  # Cleaning happened on what was kept: HTML, PII and mojibake.
  ticket = kept["alpaca.jsonl:8"]["messages"][0]["content"]
  assert "<p>" not in ticket and "track()" not in ticket and "<EMAIL>" in ticket
  assert "Danke schön" in kept["alpaca.jsonl:9"]["messages"][1]["content"]
  assert "<PHONE>" in kept["messages.jsonl:5"]["messages"][0]["content"]
  assert kept["docs/rivers.txt"]["kind"] == "text" and kept["reviews.csv:2"]["task"] == "classification"


def test_accounting_adds_up_for_every_source(built):
  out, manifest = built
  accounting = manifest["accounting"]
  assert accounting["total"] == {"read": 38, "generated": 0, "kept": 20, "dropped": 18}
  for source, row in accounting["by_source"].items():
    assert row["read"] + row["generated"] == row["kept"] + sum(row["dropped_by_reason"].values()), source
    assert row["kept"] == sum(row["kept_by_split"].values()), source
  assert accounting["by_source"]["alpaca.jsonl"]["dropped_by_reason"] == {
      "annotate: missing response": 1, "dedup: exact duplicate": 1, "filter: refusal boilerplate": 1,
      "read: bad json": 1, "read: wrong type": 1,
  }
  on_disk = {e["file"]: e for e in manifest["outputs"]}
  assert sum(e["records"] for e in on_disk.values() if e["file"].endswith(".array_record")) == 20
  assert sum(e["records"] for e in on_disk.values() if e["file"].startswith("rejected")) == 18
  assert all(len(e["sha256"]) == 64 for e in manifest["outputs"] + [i for i in manifest["inputs"]])
  assert manifest["versions"]["ftfy"] and manifest["config"]["dedup"]["bands"] == 28


def test_report_has_tables_examples_and_plots(built):
  out, _ = built
  report = (out / "report.md").read_text()
  for heading in ("## Sources", "## Stages", "## Drop reasons, with examples", "## Cleaning", "## Duplicate clusters", "## Language and source mix"):
    assert heading in report
  assert "`alpaca.jsonl:4` of alpaca.jsonl:2" in report and "| pii_email | 1 |" in report
  tasks = report.split("## Tasks of kept chats", 1)[1]
  assert "| chat |" in tasks and "| classification |" in tasks  # the planted template records keep their task
  for plot in ("stages", "drop_reasons", "length_chars", "length_words", "languages", "sources"):
    assert (out / "plots" / f"{plot}.png").stat().st_size > 1000


def test_the_trainer_reads_the_output(built):
  out, _ = built
  splits = sources.read_built(out, need_pretrain=True)
  assert len(splits["train"]) + len(splits["eval"]) == 19 and len(splits["pretrain"]) == 1
  assert splits["pretrain"][0]["text"].startswith("Rivers shape the land")
  assert all(r["messages"][-1]["role"] == "assistant" for r in splits["train"])
  assert "dropped" not in splits["train"][0] and "edits" not in splits["train"][0]


@pytest.mark.slow
def test_same_input_same_bytes_with_workers_and_on_beam(built, tmp_path, monkeypatch):
  out, manifest = built
  again = build_dataset(mix_config(), tmp_path / "again", progress=False)
  assert shard_bytes(tmp_path / "again") == shard_bytes(out)
  assert (tmp_path / "again" / "report.md").read_bytes() == (out / "report.md").read_bytes()
  assert again["accounting"] == manifest["accounting"] and again["outputs"] == manifest["outputs"]

  monkeypatch.setattr(runner_local, "_MIN_PARALLEL", 0)  # worker processes even for this small input
  monkeypatch.setattr(report, "BACKGROUND_PLOTS_MIN_RECORDS", 0)  # and the plots drawn by a second process
  build_dataset(mix_config(num_workers=2), tmp_path / "workers", progress=False)
  assert shard_bytes(tmp_path / "workers") == shard_bytes(out)
  assert tree_bytes(tmp_path / "workers" / "plots") == tree_bytes(out / "plots")

  def no_second_process(*args):
    raise AssertionError("a build told to use one process started another")

  monkeypatch.setattr(report, "BackgroundPlots", no_second_process)
  build_dataset(mix_config(num_workers=1), tmp_path / "one", progress=False)
  assert tree_bytes(tmp_path / "one" / "plots") == tree_bytes(out / "plots")

  pytest.importorskip("apache_beam")
  beam = build_dataset(mix_config(runner="beam"), tmp_path / "beam", progress=False)
  assert shard_bytes(tmp_path / "beam") == shard_bytes(out)
  assert beam["accounting"] == manifest["accounting"]


class Writer:
  """A deterministic stand-in for an annotator (the real backends are tests/test_annotator.py's): new
  tasks that duplicate, refuse or are fine; judge scores by keyword; labels ranked by a keyword."""

  fingerprint = "writer"

  def __init__(self):
    self.prompts = []

  def generate(self, chats, decoding):
    out = []
    for i, chat in enumerate(chats):
      p = chat[-1]["content"]
      self.prompts.append(p)
      if p.startswith("Here are some tasks."):
        text = ["Give three tips for staying healthy.", "Name a colour.", "Describe how rivers carve valleys over time."][i % 3]
      elif p.startswith("Score the response"):
        text = "1" if "colour" in p else "4"
      elif p == "Give three tips for staying healthy.":
        text = "Eat a varied diet with plenty of vegetables, move your body every day, and get seven to nine hours of sleep."
      elif p == "Name a colour.":
        text = "Blue."
      else:
        text = f"Here is an answer about this: {p}"
      out.append(Generation(text, finished=True))
    return out

  def log_likelihoods(self, chats, answers):
    return [-0.5 if ("good" in c[-1]["content"].lower()) == (a == "positive") else -3.0 for c, a in zip(chats, answers)]


def _annotating(config, model="/unused"):
  config.annotate.model = model  # the annotator is passed in; the key says annotation is on
  config.annotate.backend = "workdir"
  return config


def test_generated_records_go_through_the_same_stages(tmp_path, monkeypatch):
  monkeypatch.setattr(build, "check_build_config", lambda config: None)  # "/unused" names no folder
  config = _annotating(mix_config())
  config.annotate.self_instruct.num_instructions = 3
  config.annotate.judge.enabled = True
  manifest = build_dataset(config, tmp_path, annotator=Writer(), progress=False)
  generated = manifest["accounting"]["by_source"]["self-instruct"]
  assert generated["generated"] == 3 and generated["read"] == 0  # written by the model, not read
  # One repeats a seed task word for word: not novel (ROUGE-L 1.0), so it never reaches deduplication.
  assert generated["dropped_by_reason"] == {"annotate: self-instruct: too similar": 1, "judge: low score": 1}
  total = manifest["accounting"]["total"]
  assert total["read"] + total["generated"] == total["kept"] + total["dropped"]
  filled = {r["id"]: r for r in read_jsonl(tmp_path, "train") + read_jsonl(tmp_path, "validation")}
  assert filled["alpaca.jsonl:6"]["annotated"] == "response"  # the missing haiku got written
  assert all(r["judge_score"] >= 3 for r in filled.values())
  assert manifest["annotation"]["annotator"]["fingerprint"] == "writer"
  assert manifest["annotation"]["decoding"]["max_new_tokens"] == config.annotate.max_new_tokens
  report = (tmp_path / "report.md").read_text()
  assert "## Annotation" in report and "Judge scores (1-5): 1: 2, 2: 0, 3: 0, 4: 20, 5: 0" in report


def _label_folder(tmp_path) -> pathlib.Path:
  raw = tmp_path / "raw"
  raw.mkdir()
  rows = [{"text": f"A {'good' if i % 2 else 'dull'} film, number {i}, with its own plot.", "labels": ["positive", "negative"],
           "verdict": "positive" if i % 2 else "negative"} for i in range(12)]
  rows.append({"text": "Fine.", "labels": ["positive", "positive"]})  # a label set that repeats itself
  (raw / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return raw


def _label_config(raw):
  config = build_config()
  config.input_dir = str(raw)
  config.filter.language.enabled = False
  config.dedup.near = False
  config.gold_field = "verdict"
  return config


def test_unlabelled_records_get_a_label_from_their_set_and_keep_their_gold(tmp_path, monkeypatch):
  raw = _label_folder(tmp_path)
  manifest = build_dataset(_label_config(raw), tmp_path / "none", progress=False)  # no annotator: counted drops
  assert manifest["accounting"]["by_source"]["reviews.jsonl"]["dropped_by_reason"] == {"annotate: missing label": 12, "read: bad labels": 1}
  monkeypatch.setattr(build, "check_build_config", lambda config: None)
  config = _annotating(_label_config(raw))
  build_dataset(config, tmp_path / "out", annotator=Writer(), progress=False)
  kept = read_jsonl(tmp_path / "out", "train") + read_jsonl(tmp_path / "out", "validation")
  assert len(kept) == 12
  for r in kept:
    assert r["annotated"] == "label" and r["task"] == "classification" and r["messages"][-1]["content"] == r["gold"]
    assert 0.5 < r["label_confidence"] < 1 and "needs_label" not in r


def test_an_annotation_that_mostly_fails_stops_the_build_and_keeps_the_previous_one(tmp_path, monkeypatch):
  monkeypatch.setattr(build, "check_build_config", lambda config: None)
  raw = _label_folder(tmp_path)
  out = tmp_path / "out"
  build_dataset(_label_config(raw), out, progress=False)
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

  class Unsure(Writer):
    def log_likelihoods(self, chats, answers):
      return [-1.0 for _ in answers]  # every label equally likely: a margin of 0

  config = _annotating(_label_config(raw))
  config.annotate.label.min_confidence = 0.2
  with pytest.raises(ConfigError, match=r"annotation dropped 12 of the 12 records .*max_drop_fraction=0.5\): annotate: label: unsure 12"):
    build_dataset(config, out, annotator=Unsure(), progress=False)
  after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(build.CACHE)}
  assert after == before
  config.annotate.max_drop_fraction = 1.0  # the user accepts it: a build with every drop counted
  manifest = build_dataset(config, out, annotator=Unsure(), progress=False)
  assert manifest["accounting"]["total"]["kept"] == 0
  assert manifest["annotation"]["cache"]["hits"] == 24 and manifest["annotation"]["cache"]["misses"] == 0


def test_bad_configs_fail_clearly(tmp_path):
  with pytest.raises(ConfigError, match="nothing to read"):
    build_dataset(build_config(), tmp_path)
  config = mix_config()
  config.dedup.bands = 10
  with pytest.raises(ConfigError, match="bands x dedup.rows"):
    build_dataset(config, tmp_path)
  config = mix_config()
  config.decontaminate.eval_files = ("/no/such/eval.jsonl",)
  with pytest.raises(ConfigError, match="does not exist"):
    build_dataset(config, tmp_path)
  config = mix_config()
  config.annotate.judge.enabled = True
  with pytest.raises(ConfigError, match="annotate.judge need annotate.model"):
    build_dataset(config, tmp_path)
  config.annotate.model = str(tmp_path / "untrained")
  with pytest.raises(ConfigError, match="is not a folder"):
    build_dataset(config, tmp_path)
  (tmp_path / "untrained").mkdir()
  with pytest.raises(ConfigError, match="none was given to serve it"):  # the builder never loads a model itself
    build_dataset(config, tmp_path / "out")
  config.annotate.label.method = "generate"
  config.annotate.label.min_confidence = 0.5
  with pytest.raises(ConfigError, match="min_confidence needs annotate.label.method='loglik'"):
    build_dataset(config, tmp_path / "out")


def test_token_bounds_and_token_histogram_with_a_tokenizer(tmp_path):
  from sft import tokenizer as tokenizer_lib  # noqa: PLC0415

  texts = [line for p in sorted((MIX / "raw").glob("*.jsonl")) for line in p.read_text(errors="replace").splitlines()]
  tokenizer_path = tmp_path / "tok.model"
  tokenizer_lib.get_or_train_tokenizer(tokenizer_path, texts * 20, vocab_size=600)
  count = tokenizer_lib.Tokenizer.load(tokenizer_path).encode
  config = mix_config()
  config.filter.length.tokenizer = str(tokenizer_path)
  config.filter.length.max_tokens = 80
  out = tmp_path / "out"
  manifest = build_dataset(config, out, progress=False)
  rejected = {json.loads(line)["id"]: json.loads(line) for p in out.glob("rejected-*.jsonl") for line in p.read_text().splitlines()}
  too_long = [r for r in rejected.values() if r["dropped"]["reason"] == "too many tokens"]
  assert too_long and all(int(r["dropped"]["detail"].split(" > ")[0]) > 80 for r in too_long)
  kept = read_jsonl(out, "train") + read_jsonl(out, "validation")
  assert kept and all(len(count(records.contents(r))) <= 80 for r in kept)
  assert (out / "plots" / "length_tokens.png").exists()
  assert "set filter.length.tokenizer" not in (out / "report.md").read_text()
  assert manifest["accounting"]["total"]["dropped"] > 18

  config.filter.length.tokenizer = str(tmp_path / "missing.model")
  with pytest.raises(ConfigError, match="does not exist"):
    build_dataset(config, out, progress=False)


def tree_bytes(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_build_leaves_the_previous_build_as_it_was(tmp_path, monkeypatch):
  out = tmp_path / "out"
  build_dataset(mix_config(), out, progress=False)
  before = tree_bytes(out)

  def broken(*args, **kwargs):
    raise RuntimeError("a bad record")

  config = mix_config()
  config.output.num_shards = 1  # other file names than the previous build's
  with monkeypatch.context() as m:  # fails after every shard of the new build is written
    m.setattr(build.report, "write_report", broken)
    with pytest.raises(RuntimeError, match="a bad record"):
      build_dataset(config, out, progress=False)
  assert tree_bytes(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the build's temporary folder is gone

  real_move, failed = shutil.move, []

  def move(src, dst):  # fails once while swapping, when the new manifest is about to arrive
    if pathlib.Path(dst) == out / "manifest.json" and not failed:
      failed.append(src)
      raise OSError("disk full")
    return real_move(src, dst)

  monkeypatch.setattr(build.shutil, "move", move)
  with pytest.raises(OSError, match="disk full"):
    build_dataset(config, out, progress=False)
  assert failed and tree_bytes(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_rebuild_replaces_only_what_the_previous_build_wrote(tmp_path):
  out = tmp_path / "out"
  first = build_dataset(mix_config(), out, progress=False)
  (out / "model-00001-of-00002.safetensors").write_bytes(b"weights")
  (out / "notes.txt").write_text("mine")
  (out / "runs").mkdir()
  (out / "runs" / "train-00000-of-00002.jsonl").write_text("not the builder's")
  config = mix_config()
  config.output.num_shards = 1
  second = build_dataset(config, out, progress=False)
  assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"weights" and (out / "notes.txt").read_text() == "mine"
  assert (out / "runs" / "train-00000-of-00002.jsonl").read_text() == "not the builder's"
  assert not any((out / e["file"]).exists() for e in first["outputs"])  # the 2-shard files are gone
  shards = {p.name for p in out.glob("*-of-*")} - {"model-00001-of-00002.safetensors"}
  assert shards == {e["file"] for e in second["outputs"]}
  assert all((out / e["file"]).stat().st_size == e["bytes"] for e in second["outputs"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

  # A file of the new build's name that the previous build did not write is never overwritten.
  (out / "train-00000-of-00002.jsonl").write_text("someone's")
  with pytest.raises(ConfigError, match="did not write"):
    build_dataset(mix_config(), out, progress=False)
  assert (out / "train-00000-of-00002.jsonl").read_text() == "someone's"


def test_output_folders_that_would_lose_data_are_refused(tmp_path):
  raw = tmp_path / "raw"
  shutil.copytree(MIX / "raw", raw)
  before = tree_bytes(tmp_path)
  for out in (raw / "out", raw, tmp_path):  # inside the input, the input itself, around the input
    with pytest.raises(ConfigError, match="overlap"):
      build_dataset(mix_config(input_dir=str(raw)), out, progress=False)
  assert tree_bytes(tmp_path) == before and not (raw / "out").exists()

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "model-00001-of-00002.safetensors").write_bytes(b"weights")
  with pytest.raises(ConfigError, match="not empty and has no manifest.json"):
    build_dataset(mix_config(), foreign, progress=False)
  assert [p.name for p in foreign.iterdir()] == ["model-00001-of-00002.safetensors"]

  (tmp_path / "empty").mkdir()
  build_dataset(mix_config(), tmp_path / "empty", progress=False)  # an empty folder is fine
  assert (tmp_path / "empty" / "manifest.json").exists()


def test_training_refuses_a_folder_without_a_finished_build(built, tmp_path):
  out, _ = built
  config = ml_collections.ConfigDict({"data": {"source": "dir", "dir": ""}, "train": {"pretrain_steps": 0}})
  config.data.dir = str(out)
  splits, summary = sources.load_splits(config, tmp_path)
  assert len(splits["train"]) and summary["build"]["kept"] == 20

  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  config.data.dir = str(copy)
  (copy / "rejected-00000-of-00002.jsonl").write_text("")  # changed after the build
  with pytest.raises(ConfigError, match="rejected-00000-of-00002.jsonl has 0 bytes"):
    sources.load_splits(config, tmp_path)
  (copy / "rejected-00000-of-00002.jsonl").unlink()
  with pytest.raises(ConfigError, match="missing: an incomplete data build"):
    sources.load_splits(config, tmp_path)
  (copy / "manifest.json").unlink()  # shards but no manifest: a build cut off half-way
  with pytest.raises(ConfigError, match="has no manifest.json: not a finished data build"):
    sources.load_splits(config, tmp_path)


@pytest.mark.parametrize("content", [
    "[1, 2]", '{"outputs": []}', '{"config_hash": "x", "outputs": [{"name": 1}], "accounting": {"total": {}}}',
    '{"config_hash": "x", "outputs": [{"file": "../train.jsonl"}], "accounting": {"total": {}}}',
    '{"config_hash": "x", "outputs": [], "accounting": []}', "\xff not json",
])
def test_a_hostile_manifest_is_a_config_error(tmp_path, content):
  from sft.databuilder import check_outputs

  folder = tmp_path / "data"
  folder.mkdir()
  (folder / "manifest.json").write_bytes(content.encode("latin-1"))
  with pytest.raises(ConfigError, match="manifest|outside|JSON"):
    check_outputs(folder)  # what training calls
  with pytest.raises(ConfigError, match="manifest|outside|JSON"):
    build_dataset(mix_config(), folder, progress=False)  # a rebuild into it
