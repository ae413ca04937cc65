"""What training sees: `inspect_training_rows` renders the train job's own first packed rows, the marked
tokens exactly those with loss_mask 1, the counts per example right; masks that train on nothing, on
everything or on one turn of several are warned about; hostile content never becomes markup or a
terminal escape; the data build's report links a page of its first train chats."""

import html.parser
import json
import pathlib
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft.config import base_config
from sft.errors import ConfigError
from sft.pipeline import inspect as view
from sft.pipeline import train_dataset
from sft.trainer import sources
from sft.trainer.inspect import inspect_training_rows

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "section", "div", "pre", "span"}


class Page(html.parser.HTMLParser):
  """The tags of a page, and per token span its attributes and text."""

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.tags, self.spans, self.examples, self.warnings, self._open = [], [], [], [], None
    self._in_warning = False
    self.feed(text)
    self.close()

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append(tag)
    if tag == "div" and attrs.get("class") == "example":
      self.examples.append({k: int(v) for k, v in attrs.items() if k.startswith("data-")})
    elif tag == "span":
      self._open = {"class": attrs["class"], "id": int(attrs["data-id"]), "text": ""}
      if "data-col" in attrs:
        self._open["col"] = int(attrs["data-col"])
      self._open["row"] = self.examples[-1]["data-row"]
      self.spans.append(self._open)
    elif tag == "p" and attrs.get("class") == "warning":
      self._in_warning = True

  def handle_endtag(self, tag):
    if tag == "span":
      self._open = None
    self._in_warning = False

  def handle_data(self, data):
    if self._open is not None:
      self._open["text"] += data
    if self._in_warning:
      self.warnings.append(data)


@pytest.fixture
def workdir(tmp_path, tokenizer):
  """A workdir with the tokenizer a run from scratch would have trained there."""
  folder = tmp_path / "run"
  folder.mkdir()
  (folder / "tokenizer.model").write_bytes(tokenizer.model_proto)
  return folder


def train_config(data_dir):
  config = base_config()
  config.data.source = "dir"
  config.data.dir = str(data_dir)
  config.tokenizer.vocab_size = 512
  config.train.seq_len = 64
  config.train.batch_size = 2
  config.seed = 3
  return config


def files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_page_marks_exactly_the_trained_tokens_of_the_first_packed_rows(data_dir, tokenizer, workdir, tmp_path):
  config = train_config(data_dir)
  before = files(workdir)
  result = inspect_training_rows(config, workdir, rows=4, out=tmp_path / "rows.html", color=False)
  assert files(workdir) == before, "inspecting writes nothing into the workdir"

  # The train job's stream, made here on its own: 2 batches of 2 rows.
  records = sources.read_built(data_dir, need_pretrain=False)["train"]
  it = iter(train_dataset(records, tokenizer=tokenizer, seq_len=64, batch_size=2, seed=3))
  first = [next(it), next(it)]
  batch = {k: np.concatenate([b[k] for b in first]) for k in first[0]}
  for key in batch:
    np.testing.assert_array_equal(result.batch[key], batch[key])

  page = Page(result.html_path.read_text())
  assert set(page.tags) <= ALLOWED_TAGS
  for row in range(4):
    segments = batch["segment_ids"][row]
    spans = [s for s in page.spans if s["row"] == row and "col" in s]
    real = np.flatnonzero(segments)
    assert [s["col"] for s in spans] == real.tolist(), "every column of every example, once, in order"
    assert [s["col"] for s in spans if s["class"] == "trained"] == np.flatnonzero(batch["loss_mask"][row]).tolist()
    assert [s["id"] for s in spans] == batch["targets"][row, real].tolist()
    for example in (e for e in page.examples if e["data-row"] == row):
      start, stop = example["data-start"], example["data-stop"]
      assert set(segments[start:stop]) == {example["data-segment"]}
      assert example["data-trained"] == int(batch["loss_mask"][row, start:stop].sum())
      assert batch["positions"][row, start] == 0, "each example starts at position 0"
    assert sum(e["data-stop"] - e["data-start"] for e in page.examples if e["data-row"] == row) == len(real)
  leads = [s for s in page.spans if "col" not in s]
  assert len(leads) == len(page.examples) == len(result.examples) > 4, "rows are packed: more examples than rows"
  for example in result.examples:
    count = f"{example.trained} of {example.tokens} tokens trained"
    assert f"row {example.row} example {example.segment} " in result.text and count in result.text
  assert f"the rows with their tokens: {result.html_path}" in result.text
  assert not result.warnings and not page.warnings, "the built-in template masks the prompts only"


def test_on_a_terminal_the_tokens_are_coloured_and_no_page_is_written(data_dir, workdir):
  result = inspect_training_rows(train_config(data_dir), workdir, rows=1, color=True)
  assert result.html_path is None
  assert "\x1b[30;42m" in result.text or "\x1b[30;102m" in result.text, "trained tokens highlighted"
  assert result.text.count("row 0 example ") == len(result.examples) >= 1


def test_off_a_terminal_without_out_the_page_is_a_temporary_file(data_dir, workdir, monkeypatch):
  import tempfile

  monkeypatch.setattr("sys.stdout.isatty", lambda: False)
  before = files(workdir)
  result = inspect_training_rows(train_config(data_dir), workdir, rows=1)
  try:
    assert result.html_path.parent == pathlib.Path(tempfile.gettempdir()) and "\x1b" not in result.text
    assert files(workdir) == before
  finally:
    result.html_path.unlink()


def test_bad_rows_and_out_are_one_line_errors(data_dir, workdir, tmp_path):
  with pytest.raises(ConfigError, match="rows must be"):
    inspect_training_rows(train_config(data_dir), workdir, rows=0)
  with pytest.raises(ConfigError, match="its folder does not exist"):
    inspect_training_rows(train_config(data_dir), workdir, rows=1, out=tmp_path / "missing" / "rows.html")


class MaskTemplate:
  """The built-in tokenizer with a broken chat template: it learns every token, none, or the last turn only."""

  def __init__(self, tokenizer, mode: str):
    self.tokenizer, self.mode = tokenizer, mode

  def __getattr__(self, name):
    return getattr(self.tokenizer, name)

  def tokenize_chat(self, messages):
    tokens, mask = self.tokenizer.tokenize_chat(messages)
    if self.mode in ("all", "none"):
      return tokens, np.full_like(mask, int(self.mode == "all"))
    last = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)[-1]  # where the last trained run starts
    mask = mask.copy()
    mask[:last] = 0
    return tokens, mask


MULTI_TURN = {"messages": [
    {"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"},
]}


@pytest.mark.parametrize("mode, expected", [("none", "trains on no token"), ("all", "trains on every token")])
def test_a_template_that_masks_everything_or_nothing_is_warned_about(tokenizer, chat_records, mode, expected):
  broken = MaskTemplate(tokenizer, mode)
  batch = next(iter(train_dataset(chat_records[:6], tokenizer=broken, seq_len=64, batch_size=2, seed=0)))
  examples = view.examples_of(batch)
  assert examples and all(e.warning and e.warning.startswith(expected) for e in examples)
  text = view.render_text(batch, broken, examples, color=False)
  assert text.count(f"WARNING row 0 example 1 {expected}") == 1
  page = Page(view.render_html(batch, broken, examples, title="t"))
  assert len(page.warnings) == len(examples)


def test_records_that_train_on_nothing_or_everything_are_warned_about(tokenizer):
  fills_the_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "yes"}]}
  text = {"text": "plain text trains every token"}
  good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
  batch = next(iter(train_dataset([fills_the_row, text, good], tokenizer=tokenizer, seq_len=32, batch_size=3, seed=0)))
  warnings = sorted(e.warning.split(" (")[0] for e in view.examples_of(batch) if e.warning)
  assert warnings == ["trains on every token, its prompt too", "trains on no token"]


def test_a_mask_that_keeps_only_the_last_turn_is_warned_about(tokenizer):
  for tok, warned in ((tokenizer, False), (MaskTemplate(tokenizer, "last"), True)):
    batch, turns = view.chat_batch([MULTI_TURN], tok)
    (example,) = view.examples_of(batch, turns)
    assert (example.assistant_turns, example.spans) == (2, 1 if warned else 2)
    assert (example.warning is not None) == warned
    if warned:
      assert "1 span but has 2 assistant turns" in example.warning


def test_counts_of_a_hand_made_row():
  batch = {
      "loss_mask": np.array([[0, 0, 1, 1, 0, 1, 0]]),
      "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0]]),
      "positions": np.array([[0, 1, 2, 3, 0, 1, 0]]),
  }
  found = [(e.segment, e.start, e.stop, e.trained, e.tokens, e.spans, e.positions) for e in view.examples_of(batch)]
  assert found == [(1, 0, 4, 2, 4, 1, (0, 3)), (2, 4, 6, 1, 2, 1, (0, 1))]


MARKUP = st.sampled_from(list("<>&\"'/ =ab\n\t\x1b[2J;\u202e\x00é🙂"))  # markup, escapes, bidi, NUL, multi-byte
HOSTILE = st.text(alphabet=MARKUP | st.characters(codec="utf-8"), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=HOSTILE, answer=HOSTILE)
def test_hostile_content_is_text_on_the_page_and_in_the_terminal(tokenizer, user, answer):
  chat = {"messages": [{"role": "user", "content": f"<script>{user}</pre>"}, {"role": "assistant", "content": answer}]}
  if not all(m["content"].strip() for m in chat["messages"]):
    return
  batch, turns = view.chat_batch([chat], tokenizer)
  examples = view.examples_of(batch, turns)
  texts = view.token_texts(tokenizer, [batch["inputs"][0, 0], *batch["targets"][0]])
  page = Page(view.render_html(batch, tokenizer, examples, title=f"<b>{user}", notes=[answer], row_names=[user]))
  assert set(page.tags) <= ALLOWED_TAGS and "script" not in page.tags
  assert len(page.spans) == len(texts), "one span per token: nothing closed or opened early"
  assert [s["text"] for s in page.spans] == [view.visible(t or "∅") for t in texts]
  assert [s["col"] for s in page.spans if s["class"] == "trained"] == np.flatnonzero(batch["loss_mask"][0]).tolist()
  terminal = view.render_text(batch, tokenizer, examples, color=True)
  ours = re.sub(r"\x1b\[[0-9;]*m", "", terminal)
  assert "\x1b" not in ours and "\u202e" not in ours, "only the renderer's own colour codes reach the terminal"
  assert re.findall(r"\x1b\[[^m]*m", terminal) == re.findall(r"\x1b\[[0-9;]*m", terminal)


@settings(max_examples=40, deadline=None)
@given(content=st.text(st.characters(codec="utf-8"), min_size=1, max_size=60))
def test_token_texts_add_up_to_the_decoded_text(tokenizer, content):
  ids = tokenizer.encode(content)
  assert "".join(view.token_texts(tokenizer, ids)) == tokenizer.decode(ids)


def test_the_build_report_links_a_page_of_the_first_train_chats(tmp_path, tokenizer, chat_records):
  from sft.databuilder import build_config, build_dataset, report

  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "chats.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in chat_records[:30]))
  (tmp_path / "tok.model").write_bytes(tokenizer.model_proto)
  config = build_config()
  config.input_dir = str(raw)
  config.filter.language.enabled = False
  config.filter.length.tokenizer = str(tmp_path / "tok.model")
  out = tmp_path / "built"
  build_dataset(config, out, progress=False)

  md = (out / "report.md").read_text()
  assert f"]({report.INSPECT_PAGE})" in md and "sft inspect" in md
  page = Page((out / report.INSPECT_PAGE).read_text())
  chats = report.first_chats(out, "train", report.INSPECT_CHATS)
  assert len(page.examples) == len(chats) == report.INSPECT_CHATS
  for row, chat in enumerate(chats):
    tokens, mask = tokenizer.tokenize_chat(chat["messages"])
    spans = [s for s in page.spans if s["row"] == row]
    assert [s["id"] for s in spans] == tokens.tolist()
    assert [s["col"] + 1 for s in spans if s["class"] == "trained"] == np.flatnonzero(mask).tolist()


def test_a_build_without_a_tokenizer_says_how_to_see_the_masks(data_dir):
  md = (data_dir / "report.md").read_text()
  assert "## What training sees" in md and "`sft inspect --config=" in md
  assert not (data_dir / "plots" / "inspect.html").exists()


def test_a_hugging_face_template_shows_its_special_tokens_by_name(tmp_path):
  from test_hf_tokenizer import CHAT, CHATML, make_folder

  from sft.tokenizer import load_tokenizer

  tok = load_tokenizer(make_folder(tmp_path / "chatml", CHATML))
  batch, turns = view.chat_batch([{"messages": CHAT}], tok)
  (example,) = view.examples_of(batch, turns)
  assert (example.assistant_turns, example.spans, example.warning) == (2, 2, None)
  page = Page(view.render_html(batch, tok, [example], title="chatml"))
  texts = [s["text"] for s in page.spans]
  assert texts.count("<|im_start|>") == len(CHAT) and texts.count("<|im_end|>") == len(CHAT)
  trained = "".join(s["text"] for s in page.spans if s["class"] == "trained")
  assert "Serialize obj to a JSON formatted str." in trained and "Deserialize a str." in trained
  assert "What does json.dumps do?" not in trained


def test_an_empty_workdir_gets_only_what_the_train_job_makes_first(tmp_path, chat_records):
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "chats.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in chat_records[:40]))
  config = train_config("")
  config.data.source = "build"
  config.data.build.stdlib = False
  config.data.build.input_dir = str(raw)
  config.data.build.filter.language.enabled = False
  config.data.build.output.validation_fraction = 0.2
  config.tokenizer.vocab_size = 400  # what 40 short chats can fill
  workdir = tmp_path / "run"
  result = inspect_training_rows(config, workdir, rows=2, out=tmp_path / "rows.html", color=False)
  assert sorted(p.name for p in workdir.iterdir()) == ["data", "tokenizer.model"], "no config, lock or checkpoint"
  assert result.examples and (tmp_path / "rows.html").exists()
