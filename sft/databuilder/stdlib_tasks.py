"""ApiDocs -> instruction/response chat records, and raw text for pretraining.

Four tasks about each documented API (one with a docstring). Every answer follows from its prompt, by
copying or a light transformation, so a small model can learn them and answer for APIs it never saw:

    summarisation:  "Summarise in one sentence:\\n\\nSerialize obj to a JSON formatted str. More detail here."
                    -> "Serialize obj to a JSON formatted str."
    extraction:     "List the parameter names of `dumps(obj, *, skipkeys=False)`."  -> "obj, skipkeys"
    qa:             "In `dumps(obj, *, skipkeys=False)`, what is the default value of `skipkeys`?"  -> "False"
    classification: "In module `json`, is `JSONEncoder.encode` a function, a class or a method?"  -> "method"

The text to summarise (`summary_excerpt`) is the docstring's prose from its first prose paragraph on,
markup stripped, as whole sentences up to a bound; the summary is its first sentence (`summary_sentence`).
Parameter names and defaults are read from the signature with `ast`. The classification labels are
KINDS: a method's qualified name is nested in its class, and a class's name is capitalised by
convention (not always: a judgement, not a rule). An undocumented API is one rejected candidate ("no docstring"), any
other candidate that cannot be asked is rejected with its reason. `pretrain_texts` holds every docstring whole.
"""

from __future__ import annotations

import ast
import collections
import re
from typing import Iterable

from sft.databuilder import records
from sft.databuilder.stdlib_docs import ApiDoc, read_stdlib

SOURCE = "stdlib"
TASKS = ("summarisation", "extraction", "qa", "classification")
KINDS = ("function", "class", "method")  # the classification labels: ApiDoc.kind

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]+?)(?:\s*<[^>]*>)?`")  # :func:`json.dumps` -> json.dumps
_LITERAL = re.compile(r"``([^`]+)``")  # ``None`` -> None
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # "dumps(obj) -> str", as C modules document
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"]\.)\s+(?=[A-Z])")  # keeps the full stop

MAX_SUMMARY_CHARS = 120  # a summary to generate: about 30 tokens
MAX_EXCERPT_CHARS = 160  # the text to summarise: whole sentences up to this, at least the first
MAX_SIGNATURE_CHARS = 120  # `name(signature)` in the extraction and qa prompts
MAX_DEFAULT_CHARS = 24  # a default value asked about


def strip_markup(text: str) -> str:
  """`Return :class:`str` for ``None``.` -> `Return str for None.` (reST roles and literals)."""
  return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _prose_paragraphs(docstring: str) -> list[str]:
  """The docstring's paragraphs on one line each, from its first prose paragraph (neither a signature
  line nor a doctest) up to the next doctest or signature line."""
  paragraphs = []
  for paragraph in re.split(r"\n\s*\n", docstring.strip()):
    text = " ".join(paragraph.split())
    if not text:
      continue
    if _SIGNATURE_LINE.match(text) or text.startswith(">>>"):
      if paragraphs:
        break
      continue
    paragraphs.append(text)
  return paragraphs


def summary_sentence(docstring: str) -> str | None:
  """The first sentence of the docstring's first prose paragraph, or None if there is none usable.

  >>> summary_sentence("dumps(obj) -> str\\n\\nSerialize ``obj`` to a JSON\\nformatted str. More here.")
  'Serialize obj to a JSON formatted str.'
  """
  paragraphs = _prose_paragraphs(docstring)
  if not paragraphs:
    return None
  text = strip_markup(_SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]).strip()
  if len(text.split()) < 3 or len(text) > MAX_SUMMARY_CHARS:
    return None
  return text


def summary_excerpt(docstring: str) -> str | None:
  """The text a summary is asked of: the docstring's prose from its first prose paragraph on, markup
  stripped, as whole sentences up to MAX_EXCERPT_CHARS (at least the first). It stops before a sentence
  that does not end like one (a heading, a list, code).

  >>> summary_excerpt("dumps(obj) -> str\\n\\nSerialize ``obj``.\\n\\nThen more. Args:\\n  obj: it")
  'Serialize obj. Then more.'
  """
  paragraphs = _prose_paragraphs(docstring)
  if not paragraphs:
    return None
  sentences = [strip_markup(s).strip() for paragraph in paragraphs for s in _SENTENCE_END.split(paragraph)]
  excerpt = sentences[0]
  for sentence in sentences[1:]:
    if not sentence.endswith((".", "!", "?")) or len(excerpt) + 1 + len(sentence) > MAX_EXCERPT_CHARS:
      break
    excerpt = f"{excerpt} {sentence}"
  return excerpt


def _arguments(signature: str) -> ast.arguments | None:
  """The parsed parameters of a signature such as `(obj, *, skipkeys=False) -> str`, or None."""
  if not signature.startswith("("):
    return None
  try:
    node = ast.parse(f"def _{signature}: pass", mode="exec").body[0]
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  return node.args if isinstance(node, ast.FunctionDef) else None


def parameter_names(signature: str) -> list[str] | None:
  """The parameter names of a signature in their order, or None when it does not parse.

  >>> parameter_names("(a, /, b=1, *args, c, d=None, **kw)")
  ['a', 'b', 'args', 'c', 'd', 'kw']
  """
  args = _arguments(signature)
  if args is None:
    return None
  star = [args.vararg] if args.vararg else []
  double_star = [args.kwarg] if args.kwarg else []
  return [a.arg for a in [*args.posonlyargs, *args.args, *star, *args.kwonlyargs, *double_star]]


def parameter_defaults(signature: str) -> dict[str, str] | None:
  """{parameter name: its default as written} for the parameters that have one, or None when the
  signature does not parse.

  >>> parameter_defaults("(a, b=1, *, c, d=None)")
  {'b': '1', 'd': 'None'}
  """
  args = _arguments(signature)
  if args is None:
    return None
  positional = [*args.posonlyargs, *args.args]
  # Defaults belong to the last positional parameters; a keyword-only one without a default has None.
  pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
  pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
  return {a.arg: ast.unparse(d) for a, d in pairs}


def kind_question(doc: ApiDoc) -> str:
  return f"In module `{doc.module}`, is `{doc.qualname}` a function, a class or a method?"


def api_records(docs: Iterable[ApiDoc]) -> tuple[list[dict], list[dict]]:
  """(chat records for every task an ApiDoc supports, rejected candidates with their reason).

  Every record carries `task` (one of TASKS) and `group`: the module and top-level name it is about,
  so that a class and its methods fall in the same split. Duplicates are left to the builder's
  deduplication.
  """
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
    if not doc.docstring:  # one candidate for all four tasks
      add(doc, "undocumented", "", None, "no docstring")
      continue
    add(doc, "summarisation", *_summarisation(doc))
    add(doc, "extraction", *_extraction(doc))
    add(doc, "qa", *_qa(doc))
    add(doc, "classification", kind_question(doc), doc.kind, "")
  return kept, rejected


def _summarisation(doc: ApiDoc) -> tuple[str, str | None, str]:
  """(question, answer or None, why not)."""
  summary, excerpt = summary_sentence(doc.docstring), summary_excerpt(doc.docstring)
  question = f"Summarise in one sentence:\n\n{excerpt}"
  if summary is None or excerpt is None:
    return question, None, "no usable summary"
  if not excerpt.startswith(summary):  # a sentence break that markup hid; never seen in the stdlib
    return question, None, "summary not at the start of the excerpt"
  return question, summary, ""


def _signature_or_reason(doc: ApiDoc) -> tuple[str, str]:
  """`dumps(obj, *, skipkeys=False)`: the unqualified name and the signature, and why it is unusable or ""."""
  signature = f"{doc.qualname.rsplit('.', 1)[-1]}{doc.signature}"
  if len(signature) > MAX_SIGNATURE_CHARS:
    return signature, "signature too long"
  return signature, ""


def _extraction(doc: ApiDoc) -> tuple[str, str | None, str]:
  signature, reason = _signature_or_reason(doc)
  question = f"List the parameter names of `{signature}`."
  names = parameter_names(doc.signature)
  if reason:
    return question, None, reason
  if names is None:
    return question, None, "unparsable signature"
  if not names:
    return question, None, "no parameters"
  return question, ", ".join(names), ""


def _qa(doc: ApiDoc) -> tuple[str, str | None, str]:
  """A default value read off the signature; which parameter is asked about is fixed by a hash of the name."""
  signature, reason = _signature_or_reason(doc)
  defaults = parameter_defaults(doc.signature)
  if reason:
    return signature, None, reason
  if defaults is None:
    return signature, None, "unparsable signature"
  if not defaults:
    return signature, None, "no parameter with a default"
  # A default such as '' or {} has no word to score an answer by (and no letter for the quality filter).
  short = sorted(name for name, value in defaults.items() if len(value) <= MAX_DEFAULT_CHARS and any(c.isalnum() for c in value))
  if not short:
    return signature, None, "no short default with a word"
  name = short[records.stable_hash(doc.name) % len(short)]
  return f"In `{signature}`, what is the default value of `{name}`?", defaults[name], ""


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
