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
  docs = read_module(SOURCE, "mini") + read_module(SOURCE, "other")  # every name is now in two modules
  records, rejected = api_records(docs)
  tasks = [r["task"] for r in records]
  reasons = [r["dropped"]["reason"] for r in rejected]
  # summary: 4 candidates per module; dumps, Encoder and helper have usable summaries, encode has none.
  assert tasks.count("summary") == 6 and reasons.count("no docstring") == 2
  # module: "Which module defines `dumps`?" is ambiguous when two modules define it.
  assert tasks.count("module") == 0 and reasons.count("name in several modules") == 4
  assert tasks.count("signature") == 8
  assert len(records) + len(rejected) == 8 + 4 + 8
  assert {r["dropped"]["stage"] for r in rejected} == {"read"}
  record = next(r for r in records if r["id"] == "stdlib/signature:mini.Encoder.encode")
  assert record["messages"][1]["content"] == "mini.Encoder.encode(o)"
  assert record["group"] == "mini.Encoder" and record["source"] == "stdlib" and record["kind"] == "chat"


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
  assert "stdlib/summary:box.Box.size#2" in ids
