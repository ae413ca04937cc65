"""ApiDocs -> instruction/response chat records, and raw text for pretraining.

Three tasks, each a question a user could ask about an API and an answer taken from the source:

    summary:    "What does `json.dumps` do?"             -> the docstring's summary sentence
    module:     "Which module defines `dumps`?"          -> "json" (only for names defined once)
    signature:  "What is the signature of `json.dumps`?" -> "json.dumps(obj, *, skipkeys=False, ...)"
"""

from __future__ import annotations

import collections
import hashlib
import re
from typing import Iterable

from sft.databuilder.stdlib_docs import ApiDoc

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


def split_of(key: str, eval_fraction: float, salt: str = "") -> str:
  """'train' or 'eval', by a stable hash of `key` (the same on every machine and Python run)."""
  bucket = int.from_bytes(hashlib.sha256(f"{salt}{key}".encode()).digest()[:8], "big") / 2**64
  return "eval" if bucket < eval_fraction else "train"


def _chat(question: str, answer: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def api_records(docs: Iterable[ApiDoc]) -> tuple[list[dict], dict[str, int]]:
  """Chat records for every task an ApiDoc supports, and counts of candidates dropped by reason.

  Every record carries `group`: the module and top-level name it is about, so that a class and its
  methods fall in the same split. Exact duplicates (same question and answer) are dropped once seen.
  """
  docs = list(docs)
  defined_in = collections.defaultdict(set)
  for doc in docs:
    if doc.kind != "method":
      defined_in[doc.qualname].add(doc.module)

  records, dropped, seen = [], collections.Counter(), set()

  def add(doc: ApiDoc, task: str, question: str, answer: str | None, reason: str):
    if answer is None:
      dropped[f"{task}:{reason}"] += 1
      return
    if (question, answer) in seen:
      dropped[f"{task}:duplicate"] += 1
      return
    seen.add((question, answer))
    group = f"{doc.module}.{doc.qualname.split('.')[0]}"
    records.append({"id": f"{task}:{doc.name}", "task": task, "group": group, "messages": _chat(question, answer)})

  for doc in docs:
    summary = summary_sentence(doc.docstring) if doc.docstring else None
    add(doc, "summary", f"What does `{doc.name}` do?", summary, "no docstring" if not doc.docstring else "no usable summary")
    if doc.kind != "method":
      unique = len(defined_in[doc.qualname]) == 1
      add(doc, "module", f"Which module defines `{doc.qualname}`?", doc.module if unique else None, "name in several modules")
    signature = f"{doc.name}{doc.signature}"
    ok = len(signature) <= MAX_SIGNATURE_CHARS
    add(doc, "signature", f"What is the signature of `{doc.name}`?", signature if ok else None, "signature too long")
  return records, dict(sorted(dropped.items()))


def pretrain_texts(docs: Iterable[ApiDoc]) -> list[dict[str, str]]:
  """Raw text, one document per documented API: `name(signature)` then its docstring."""
  return [{"text": f"{doc.name}{doc.signature}\n{doc.docstring}"} for doc in docs if doc.docstring]
