"""The stdlib API tasks: every answer follows from its prompt, and every candidate is kept or rejected with a reason."""

import collections
import inspect
import keyword
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sft.databuilder import api_records, read_module, records
from sft.databuilder.stdlib_tasks import (
    KINDS,
    MAX_EXCERPT_CHARS,
    TASKS,
    parameter_defaults,
    parameter_names,
    summary_excerpt,
    summary_sentence,
)

# Canonical task names a record's `task` may carry.
CANONICAL_TASKS = {"classification", "summarisation", "qa", "extraction", "translation", "cloze", "chat"}


def _check_record(record, doc):
  """One record is well formed and its answer follows from its prompt."""
  assert record["kind"] == "chat" and record["source"] == "stdlib" and record["task"] in CANONICAL_TASKS
  assert record["group"] == f"{doc.module}.{doc.qualname.split('.')[0]}"
  assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
  prompt, answer = records.prompt_and_response(record)
  assert prompt.strip() and answer.strip() and answer == answer.strip()
  task = record["task"]
  if task == "summarisation":
    excerpt = prompt.split("\n\n", 1)[1]
    assert excerpt.startswith(answer) and answer == summary_sentence(doc.docstring)
  elif task == "extraction":
    signature = re.fullmatch(r"List the parameter names of `(.*)`\.", prompt).group(1)
    assert answer.split(", ") == parameter_names(signature[signature.index("("):])
    assert all(name in signature for name in answer.split(", "))
  elif task == "qa":
    name = re.search(r"default value of `(\w+)`\?$", prompt).group(1)
    assert re.search(rf"\b{name}(: [^=,]+)?={re.escape(answer)}[,)]", prompt), (prompt, answer)
  else:
    assert task == "classification" and answer == doc.kind and answer in KINDS
    assert prompt == f"In module `{doc.module}`, is `{doc.qualname}` a function, a class or a method?"


def test_stdlib_records_are_well_formed_and_answers_follow_from_prompts(stdlib_sample):
  kept, rejected = api_records(stdlib_sample)
  documented_as = collections.defaultdict(list)  # a property's getter and setter share a name
  for doc in stdlib_sample:
    if doc.docstring:
      documented_as[doc.name].append(doc)
  assert {r["task"] for r in kept} == set(TASKS)
  for record in kept:
    name, _, k = record["id"].split(":", 1)[1].partition("#")  # "#k": the k-th ApiDoc of that name
    _check_record(record, documented_as[name][int(k or 1) - 1])
  ids = [r["id"] for r in kept + rejected]
  assert len(ids) == len(set(ids))
  # Every documented ApiDoc is a candidate of each task; an undocumented one is one rejected candidate.
  documented = sum(bool(d.docstring) for d in stdlib_sample)
  assert len(kept) + len(rejected) == 4 * documented + (len(stdlib_sample) - documented)
  assert all(r["dropped"]["reason"] and r["dropped"]["stage"] == "read" and r["raw"] for r in rejected)


SOURCE = '''
def noargs():
    """Do it."""

def plain(a, b):
    """Combine a and b into a pair of values."""

def blank(sep=''):
    """Join the parts with a separator string."""

def very_long_signature_here(argument_number_one, argument_number_two, argument_number_three, argument_number_four=None, *more):
    """Take many arguments and return nothing."""

def nothing():
    pass
'''


def test_every_rejection_has_its_reason():
  kept, rejected = api_records(read_module(SOURCE, "m"))
  reasons = {r["id"]: r["dropped"]["reason"] for r in rejected}
  assert reasons == {
      "stdlib/summarisation:m.noargs": "no usable summary",  # "Do it." is too short to summarise
      "stdlib/extraction:m.noargs": "no parameters",
      "stdlib/qa:m.noargs": "no parameter with a default",
      "stdlib/qa:m.plain": "no parameter with a default",
      "stdlib/qa:m.blank": "no short default with a word",  # '' normalises to nothing to score
      "stdlib/extraction:m.very_long_signature_here": "signature too long",
      "stdlib/qa:m.very_long_signature_here": "signature too long",
      "stdlib/undocumented:m.nothing": "no docstring",
  }
  assert collections.Counter(r["task"] for r in kept) == {"classification": 4, "summarisation": 3, "extraction": 2}


def test_summaries_and_excerpts():
  doc = "f(x) -> int\n\nReturn ``x`` plus one. It never fails.\n\nSee also g. Options:\n  - a\n\n>>> f(1)\n2"
  assert summary_sentence(doc) == "Return x plus one."
  assert summary_excerpt(doc) == "Return x plus one. It never fails. See also g."  # stops before "Options: - a"
  assert summary_excerpt("Only one.") == "Only one." and summary_excerpt(">>> f()\n1") is None
  long = " ".join(f"Sentence number {i} is here." for i in range(40))
  assert summary_excerpt(long).startswith("Sentence number 0 is here.") and len(summary_excerpt(long)) <= MAX_EXCERPT_CHARS


def test_unparsable_signatures():
  assert parameter_names("(a,") is None and parameter_defaults("(a,") is None
  assert parameter_names("a, b") is None  # no parentheses: not a signature
  assert parameter_names("()") == [] and parameter_defaults("()") == {}
  assert parameter_names("(*, a: int = 1, **kw) -> str") == ["a", "kw"]


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(lambda s: not keyword.iskeyword(s))
_DEFAULT = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), _WORD)
_KINDS = [
    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD,
]


@st.composite
def signatures(draw):
  """A valid inspect.Signature: distinct names, kinds in order, no positional without a default after one with."""
  names = draw(st.lists(_NAME, unique=True, max_size=7))
  kinds = sorted(draw(st.lists(st.sampled_from(_KINDS), min_size=len(names), max_size=len(names))), key=_KINDS.index)
  params, seen_default, seen_star = [], False, set()
  for name, kind in zip(names, kinds):
    if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
      if kind in seen_star:
        continue
      seen_star.add(kind)
      params.append(inspect.Parameter(name, kind))
      continue
    positional = kind != inspect.Parameter.KEYWORD_ONLY
    with_default = draw(st.booleans()) or (positional and seen_default)
    seen_default |= with_default and positional
    annotation = draw(st.sampled_from([inspect.Parameter.empty, int, str]))
    default = draw(_DEFAULT) if with_default else inspect.Parameter.empty
    params.append(inspect.Parameter(name, kind, default=default, annotation=annotation))
  return inspect.Signature(params)


@settings(max_examples=100, deadline=None)
@given(signatures())
def test_parameters_round_trip_through_the_signature_text(signature):
  text = str(signature).replace("<class 'int'>", "int").replace("<class 'str'>", "str")
  assert parameter_names(text) == list(signature.parameters)
  expected = {name: repr(p.default) for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
  assert parameter_defaults(text) == expected


_SENTENCE = st.builds(
    lambda first, rest, literal: " ".join([first.capitalize(), *rest, f"``{literal}``" if literal else ""]).strip() + ".",
    _WORD, st.lists(_WORD, min_size=2, max_size=8), st.one_of(st.none(), _WORD),
)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(_SENTENCE, min_size=1, max_size=4), min_size=1, max_size=3), st.booleans())
def test_a_summary_is_the_start_of_its_excerpt(paragraphs, signature_line):
  docstring = "\n\n".join(["f(a) -> b"] * signature_line + ["\n".join(p) for p in paragraphs])
  summary, excerpt = summary_sentence(docstring), summary_excerpt(docstring)
  assert excerpt is not None and "``" not in excerpt
  assert summary is None or excerpt.startswith(summary)
  first_sentence = paragraphs[0][0].replace("``", "")
  assert excerpt.startswith(first_sentence) and (len(excerpt) <= MAX_EXCERPT_CHARS or excerpt == first_sentence)
