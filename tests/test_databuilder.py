"""The embedded default dataset: stdlib source -> API records, every drop counted."""

import json

import pytest

from sft.databuilder import (
    api_records,
    build_stdlib_dataset,
    get_or_build_stdlib_dataset,
    read_module,
    read_stdlib,
    split_of,
    strip_markup,
    summary_sentence,
)
from sft.databuilder.stdlib_docs import ApiDoc, module_name

SOURCE = '''
"""Module docstring."""

def dumps(obj, *, indent=None):
    """dumps(obj) -> str

    Serialize ``obj`` to a JSON
    formatted str. More detail here.
    """

def _private(x):
    """Hidden."""

class Encoder:
    """Encode things with :class:`json.JSONEncoder` rules."""

    def __init__(self, skipkeys=False):
        pass

    def encode(self, o):
        pass

    @staticmethod
    def helper(a, b=2):
        """Help with a and b."""
'''


def test_read_module_worked_example():
  docs = read_module(SOURCE, "mini")
  assert [(d.name, d.kind, d.signature) for d in docs] == [
      ("mini.dumps", "function", "(obj, *, indent=None)"),
      ("mini.Encoder", "class", "(skipkeys=False)"),
      ("mini.Encoder.encode", "method", "(o)"),
      ("mini.Encoder.helper", "method", "(a, b=2)"),
  ]
  assert docs[2].docstring == ""


def test_summary_sentence_and_markup():
  assert summary_sentence(read_module(SOURCE, "m")[0].docstring) == "Serialize obj to a JSON formatted str."
  assert strip_markup("Use :func:`~os.path.join` or :meth:`str.join <join>` with ``None``.") == "Use os.path.join or str.join with None."
  assert summary_sentence(">>> f()\n1") is None
  assert summary_sentence("Too short") is None
  assert summary_sentence("word " * 60) is None


def test_module_names():
  import pathlib

  root = pathlib.Path("/lib")
  assert module_name(root / "json/__init__.py", root) == "json"
  assert module_name(root / "email/mime/text.py", root) == "email.mime.text"


def test_records_account_for_every_candidate():
  docs = read_module(SOURCE, "mini") + read_module(SOURCE, "other")  # every name is now in two modules
  records, dropped = api_records(docs)
  tasks = [r["task"] for r in records]
  # summary: 4 candidates per module; dumps, Encoder and helper have usable summaries, encode has none.
  assert tasks.count("summary") == 6 and dropped["summary:no docstring"] == 2
  # module: "Which module defines `dumps`?" is ambiguous when two modules define it.
  assert tasks.count("module") == 0 and dropped["module:name in several modules"] == 4
  assert tasks.count("signature") == 8
  candidates = 8 + 4 + 8
  assert len(records) + sum(dropped.values()) == candidates
  record = next(r for r in records if r["id"] == "signature:mini.Encoder.encode")
  assert record["messages"][1]["content"] == "mini.Encoder.encode(o)"
  assert record["group"] == "mini.Encoder"


def test_exact_duplicates_are_dropped_and_counted():
  doc = ApiDoc("m", "f", "function", "()", "Do the thing well.")
  records, dropped = api_records([doc, doc])
  assert [r["task"] for r in records] == ["summary", "module", "signature"]
  assert dropped == {"module:duplicate": 1, "signature:duplicate": 1, "summary:duplicate": 1}


def test_split_is_stable_and_near_the_fraction():
  keys = [f"mod.name{i}" for i in range(4000)]
  splits = [split_of(k, 0.1) for k in keys]
  assert splits == [split_of(k, 0.1) for k in keys]
  assert 0.08 < splits.count("eval") / len(keys) < 0.12
  assert splits != [split_of(k, 0.1, salt="x") for k in keys]


def test_read_stdlib_counts_what_it_skips(tmp_path):
  (tmp_path / "good.py").write_text(SOURCE)
  (tmp_path / "broken.py").write_text("def f(:\n")
  (tmp_path / "_private.py").write_text(SOURCE)
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "test_x.py").write_text(SOURCE)
  docs, stats = read_stdlib(tmp_path)
  assert {d.module for d in docs} == {"good"}
  assert stats == {
      "files_seen": 3,
      "files_read": 1,
      "files_skipped_private_module": 1,
      "files_skipped_unparsable_SyntaxError": 1,
      "api_docs": 4,
  }


def test_build_writes_splits_and_an_accounting_that_adds_up(tmp_path):
  summary = build_stdlib_dataset(tmp_path, eval_fraction=0.1)
  for task, n in summary["candidates_by_task"].items():
    dropped = sum(v for k, v in summary["dropped_by_reason"].items() if k.startswith(f"{task}:"))
    assert summary["kept_by_task"][task] + dropped == n
  assert summary["records"]["train"] + summary["records"]["eval"] == sum(summary["kept_by_task"].values())
  train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
  eval_ = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
  assert len(train) == summary["records"]["train"] and len(eval_) == summary["records"]["eval"]
  assert not {r["group"] for r in train} & {r["group"] for r in eval_}, "an API is in one split only"
  assert any(r["id"] == "summary:json.dumps" for r in train + eval_)

  # A second build is byte-identical; a reuse with other options is refused with a clear error.
  first = (tmp_path / "train.jsonl").read_bytes()
  splits, _ = get_or_build_stdlib_dataset(tmp_path, eval_fraction=0.1)
  assert len(splits["train"]) == len(train)
  build_stdlib_dataset(tmp_path / "again", eval_fraction=0.1)
  assert (tmp_path / "again" / "train.jsonl").read_bytes() == first
  with pytest.raises(ValueError, match="eval_fraction=0.2"):
    get_or_build_stdlib_dataset(tmp_path, eval_fraction=0.2)
