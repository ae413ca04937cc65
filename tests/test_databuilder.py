"""The embedded default source: stdlib source -> API records, every rejected candidate kept with its reason."""

from sft.databuilder import api_records, read_module, read_stdlib, strip_markup, summary_sentence
from sft.databuilder.stdlib_docs import module_name

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
  import collections

  docs = read_module(SOURCE, "mini") + read_module(SOURCE, "other")
  records, rejected = api_records(docs)
  # dumps, Encoder and helper are documented and have a parameter with a default: one record per task
  # each, in both modules; encode has no docstring: one rejected candidate stands for its four tasks.
  assert collections.Counter(r["task"] for r in records) == {"summarisation": 6, "extraction": 6, "qa": 6, "classification": 6}
  assert [r["dropped"]["reason"] for r in rejected] == ["no docstring"] * 2
  assert [r["id"] for r in rejected] == ["stdlib/undocumented:mini.Encoder.encode", "stdlib/undocumented:other.Encoder.encode"]
  assert len(records) + len(rejected) == 3 * 4 * 2 + 2
  assert {r["dropped"]["stage"] for r in rejected} == {"read"}
  by_id = {r["id"]: r for r in records}
  qa = {m["role"]: m["content"] for m in by_id["stdlib/qa:mini.dumps"]["messages"]}
  assert qa == {"user": "In `dumps(obj, *, indent=None)`, what is the default value of `indent`?", "assistant": "None"}
  extraction = by_id["stdlib/extraction:mini.Encoder.helper"]
  assert [m["content"] for m in extraction["messages"]] == ["List the parameter names of `helper(a, b=2)`.", "a, b"]
  assert extraction["group"] == "mini.Encoder" and extraction["source"] == "stdlib" and extraction["kind"] == "chat"
  summary = by_id["stdlib/summarisation:mini.dumps"]["messages"]
  assert summary[0]["content"] == "Summarise in one sentence:\n\nSerialize obj to a JSON formatted str. More detail here."
  assert summary[1]["content"] == "Serialize obj to a JSON formatted str."
  kinds = {r["id"].split(":")[1]: r["messages"][1]["content"] for r in records if r["task"] == "classification"}
  assert kinds == {f"{m}.{q}": k for m in ("mini", "other") for q, k in (("dumps", "function"), ("Encoder", "class"), ("Encoder.helper", "method"))}


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


def test_every_stdlib_record_has_its_own_id():
  # A property's getter and setter share a name: with one id between them, near-dedup marked the id and
  # so dropped both copies, losing the API entirely.
  from sft.databuilder import pretrain_texts

  source = '''
class Box:
    @property
    def size(self):
        """The number of items in the box, counted when asked."""

    @size.setter
    def size(self, value):
        """Sets the number of items the box claims to hold."""
'''
  docs = read_module(source, "box")
  kept, rejected = api_records(docs)
  ids = [r["id"] for r in kept + rejected + pretrain_texts(docs)]
  assert len(ids) == len(set(ids)), sorted(ids)
  assert "stdlib/summarisation:box.Box.size#2" in ids
