"""ApiDocs -> instruction/response chat records, and raw text for pretraining.

Three tasks, each a question a user could ask about an API and an answer taken from the source:

    summary:    "What does `json.dumps` do?"             -> the docstring's summary sentence
    module:     "Which module defines `dumps`?"          -> "json" (only for names defined once)
    signature:  "What is the signature of `json.dumps`?" -> "json.dumps(obj, *, skipkeys=False, ...)"
"""

from __future__ import annotations

import collections
import re
from typing import Iterable

from sft.databuilder import records
from sft.databuilder.stdlib_docs import ApiDoc, read_stdlib

SOURCE = "stdlib"

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]+?)(?:\s*<[^>]*>)?`")  # :func:`json.dumps` -> json.dumps
_LITERAL = re.compile(r"``([^`]+)``")  # ``None`` -> None
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # "dumps(obj) -> str", as C modules document
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"]\.)\s+(?=[A-Z])")  # keeps the full stop

MAX_SUMMARY_CHARS = 200
MAX_SIGNATURE_CHARS = 120


def strip_markup(text: str) -> str:
  """`Return :class:`str` for ``None``.` -> `Return str for None.` (reST roles and literals)."""
  return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def summary_sentence(docstring: str) -> str | None:
  """The first sentence of the docstring's first prose paragraph, or None if there is none usable.

  >>> summary_sentence("dumps(obj) -> str\\n\\nSerialize ``obj`` to a JSON\\nformatted str. More here.")
  'Serialize obj to a JSON formatted str.'
  """
  for paragraph in re.split(r"\n\s*\n", docstring.strip()):
    text = " ".join(paragraph.split())
    if not text or _SIGNATURE_LINE.match(text) or text.startswith(">>>"):
      continue
    text = strip_markup(_SENTENCE_END.split(text, maxsplit=1)[0]).strip()
    if len(text.split()) < 3 or len(text) > MAX_SUMMARY_CHARS:
      return None
    return text
  return None


def api_records(docs: Iterable[ApiDoc]) -> tuple[list[dict], list[dict]]:
  """(chat records for every task an ApiDoc supports, rejected candidates with their reason).

  Every record carries `group`: the module and top-level name it is about, so that a class and its
  methods fall in the same split. Duplicates are left to the builder's deduplication.
  """
  docs = list(docs)
  defined_in = collections.defaultdict(set)
  for doc in docs:
    if doc.kind != "method":
      defined_in[doc.qualname].add(doc.module)

  kept, rejected = [], []
  seen_ids: collections.Counter[str] = collections.Counter()

  def add(doc: ApiDoc, task: str, question: str, answer: str | None, reason: str):
    record_id = _unique(f"{SOURCE}/{task}:{doc.name}", seen_ids)
    if answer is None:
      rejected.append(records.rejected(record_id, SOURCE, "read", reason, raw=f"{doc.name}{doc.signature}\n{doc.docstring}"))
      return
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    kept.append(records.chat(record_id, SOURCE, messages, task=task, group=f"{doc.module}.{doc.qualname.split('.')[0]}"))

  for doc in docs:
    summary = summary_sentence(doc.docstring) if doc.docstring else None
    add(doc, "summary", f"What does `{doc.name}` do?", summary, "no docstring" if not doc.docstring else "no usable summary")
    if doc.kind != "method":
      unique = len(defined_in[doc.qualname]) == 1
      add(doc, "module", f"Which module defines `{doc.qualname}`?", doc.module if unique else None, "name in several modules")
    signature = f"{doc.name}{doc.signature}"
    ok = len(signature) <= MAX_SIGNATURE_CHARS
    add(doc, "signature", f"What is the signature of `{doc.name}`?", signature if ok else None, "signature too long")
  return kept, rejected


def _unique(record_id: str, seen: collections.Counter[str]) -> str:
  """`record_id`, or `record_id#k` for its k-th use: a property's getter and setter share a name, and two
  records with one id could not be told apart by deduplication or the accounting."""
  seen[record_id] += 1
  return record_id if seen[record_id] == 1 else f"{record_id}#{seen[record_id]}"


def pretrain_texts(docs: Iterable[ApiDoc]) -> list[dict]:
  """Raw text records, one per documented API: `name(signature)` then its docstring."""
  seen_ids: collections.Counter[str] = collections.Counter()
  return [
      records.text(_unique(f"{SOURCE}/text:{doc.name}", seen_ids), SOURCE, f"{doc.name}{doc.signature}\n{doc.docstring}")
      for doc in docs if doc.docstring
  ]


def read_records() -> list[dict]:
  """The embedded default source: API questions, their docstrings as text, and every rejected candidate."""
  docs, _ = read_stdlib()
  kept, rejected = api_records(docs)
  return kept + pretrain_texts(docs) + rejected
