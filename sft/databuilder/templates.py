"""Structured raw data -> instruction examples, with several paraphrased instructions per template.

A record whose fields match a template becomes a chat; which paraphrase it gets is chosen by a
stable hash of its id, so the same input always gives the same example and the mix is even.

    {"text": "Great film!", "label": "positive", "labels": ["positive", "negative"]}
      -> user: "Classify the following text as one of: positive, negative.\n\nGreat film!"
         assistant: "positive"
         task: "classification", template: "classification", labels: ["positive", "negative"]

Every built chat record carries its `task`, one of TASK_NAMES, which decides how evaluation scores
it (sft/evaluator/tasks.py); a chat that came without a template is "chat". Classification records
keep their label set as `labels`; cloze records keep their candidates as `choices`, which evaluation
ranks by log-likelihood.
"""

from __future__ import annotations

import re
from typing import Any

from sft.databuilder import records

# What evaluation knows how to score; a template maps to one of them (TEMPLATE_TASK).
TASK_NAMES = ("classification", "summarisation", "qa", "translation", "extraction", "cloze", "chat")
BLANK = "____"  # where a cloze text's answer goes

# template -> (fields that identify it, optional fields, instruction paraphrases, response field)
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]] = {
    "qa": (
        ("context", "question", "answer"), (),
        (
            "Answer the question using the passage.\n\nPassage: {context}\n\nQuestion: {question}",
            "{context}\n\nBased on the text above, {question}",
            "Read the passage and answer the question that follows.\n\n{context}\n\nQ: {question}",
        ),
        "answer",
    ),
    "closed_qa": (
        ("question", "answer"), (),
        ("{question}", "Answer the following question.\n\n{question}", "Q: {question}"),
        "answer",
    ),
    "summary": (
        ("document", "summary"), (),
        (
            "Summarize the following text.\n\n{document}",
            "Write a short summary of this passage:\n\n{document}",
            "{document}\n\nTL;DR:",
        ),
        "summary",
    ),
    "translation": (
        ("source_lang", "target_lang", "source_text", "target_text"), (),
        (
            "Translate from {source_lang} to {target_lang}:\n\n{source_text}",
            "What is the {target_lang} translation of this {source_lang} text?\n\n{source_text}",
            "Render the following in {target_lang}.\n\n{source_text}",
        ),
        "target_text",
    ),
    "classification": (
        ("text", "label"), ("labels",),
        (
            "Classify the following text{options}.\n\n{text}",
            "Which category does this text belong to{options}?\n\n{text}",
            "{text}\n\nLabel the text above{options}.",
        ),
        "label",
    ),
    "extraction": (
        ("text", "field", "value"), (),
        (
            "Extract the {field} from the text below.\n\n{text}",
            "{text}\n\nWhat is the {field} mentioned above?",
            "From the following passage, pull out the {field}.\n\n{text}",
        ),
        "value",
    ),
    "cloze": (
        ("text", "answer"), ("choices",),
        (
            "Fill in the blank ({blank}){options}.\n\n{text}",
            "{text}\n\nWhich word goes in the blank{options}?",
            "Complete the sentence by filling in {blank}{options}.\n\n{text}",
        ),
        "answer",
    ),
}
TEMPLATE_TASK = {
    "qa": "qa", "closed_qa": "qa", "summary": "summarisation", "translation": "translation",
    "classification": "classification", "extraction": "extraction", "cloze": "cloze",
}


class Invalid(ValueError):
  """A record whose fields are present but unusable; `reason` is the short phrase the report counts."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def task_of(fields: set[str]) -> str | None:
  """The task type whose identifying fields are all present and that accounts for the most fields."""
  matches = [name for name, (needed, optional, _, _) in TASKS.items() if set(needed) <= fields and fields <= set(needed) | set(optional) | {"id", "system"}]
  return max(matches, key=lambda n: len(TASKS[n][0])) if matches else None


def _options(raw: dict[str, Any], field: str, answer: str | None) -> list[str] | None:
  """The record's label set or candidates as strings (None if absent); the answer (if any) must be one of them."""
  options = raw.get(field)
  if options is None:
    return None
  if isinstance(options, list) and not options:
    raise Invalid(f"bad {field}", f"field '{field}' is empty")
  if not isinstance(options, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in options):
    raise Invalid("wrong type", f"field '{field}' is not a list of labels")
  options = [str(x) for x in options]
  if len(set(options)) != len(options):
    raise Invalid(f"bad {field}", f"field '{field}' repeats an entry: {options}")
  if answer is not None and answer not in options:
    raise Invalid(f"bad {field}", f"the answer {answer!r} is not one of '{field}': {options}")
  return options


_PLACEHOLDER = re.compile(r"\{\w+\}")


def own_text(record: records.Record) -> str:
  """A chat's text without the words its template wrote: the user turn less the paraphrase's literal
  parts and the label set or candidates it lists, then the answers. What near-deduplication compares, so
  that two records are near duplicates for what their fields hold, never for the instruction they share
  ("Classify the following text as one of: doc, fonts, ...\n\nPython 3 module for X"). Any other record:
  its contents."""
  name = record.get("template")
  if record["kind"] != "chat" or name not in TASKS:
    return records.contents(record)
  paraphrases = TASKS[name][2]
  literals = [x for x in _PLACEHOLDER.split(paraphrases[records.stable_hash(record["id"]) % len(paraphrases)]) if x.strip()]
  options = record.get("labels") or record.get("choices")
  if options:
    literals += [f" as one of: {', '.join(options)}", f" with one of: {', '.join(options)}"]
  parts = []
  for message in record["messages"]:
    content = message["content"]
    if message["role"] == "user":
      for literal in literals:
        content = content.replace(literal, "\n", 1)
    if message["role"] != "system":
      parts.append(content)
  return "\n".join(parts)


_UNLABELLED_FIELDS = {"text", "labels", "label", "id", "system"}


def is_unlabelled(raw: dict[str, Any]) -> bool:
  """A classification record with its text and label set but no label (absent, null or empty): the
  annotation stage's label task chooses one."""
  return {"text", "labels"} <= set(raw) <= _UNLABELLED_FIELDS and raw.get("label") in (None, "")


def unlabelled_chat(raw: dict[str, Any], record_id: str, source: str) -> records.Record:
  """The chat of an unlabelled classification record: its user turn, no answer yet, marked needs_label;
  raises Invalid for a text that is not text or a bad label set."""
  if not isinstance(raw["text"], str):
    raise Invalid("wrong type", f"field 'text' is {type(raw['text']).__name__}, not text")
  if raw["labels"] is None:
    raise Invalid("missing field", "labels")
  labels = _options(raw, "labels", None)
  paraphrases = TASKS["classification"][2]
  template = paraphrases[records.stable_hash(record_id) % len(paraphrases)]
  messages = [{"role": "user", "content": template.format(text=raw["text"], options=f" as one of: {', '.join(labels)}")}]
  if isinstance(raw.get("system"), str) and raw["system"]:
    messages.insert(0, {"role": "system", "content": raw["system"]})
  return records.chat(record_id, source, messages, task="classification", template="classification", labels=labels, needs_label=True)


def to_chat(raw: dict[str, Any], template_name: str, record_id: str, source: str) -> records.Record:
  """The chat for one structured record; raises Invalid (a ValueError) naming a field that is not text,
  a label or answer missing from its options, or a cloze text without exactly one blank."""
  needed, optional, paraphrases, response_field = TASKS[template_name]
  values = {}
  for field in needed:
    value = raw[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and field == "label":
      value = str(value)
    if not isinstance(value, str):
      raise Invalid("wrong type", f"field '{field}' is {type(value).__name__}, not text")
    values[field] = value
  extra: dict[str, Any] = {}
  if template_name == "classification":
    labels = _options(raw, "labels", values["label"])
    values["options"] = f" as one of: {', '.join(labels)}" if labels else ""
    extra = {"labels": labels} if labels else {}
  elif template_name == "cloze":
    if values["text"].count(BLANK) != 1:
      raise Invalid("bad cloze", f"the text needs exactly one blank {BLANK}, has {values['text'].count(BLANK)}")
    if not values["answer"].strip():
      raise Invalid("bad cloze", "the answer is empty")
    choices = _options(raw, "choices", values["answer"])
    values["options"] = f" with one of: {', '.join(choices)}" if choices else ""
    values["blank"] = BLANK
    extra = {"choices": choices} if choices else {}
  template = paraphrases[records.stable_hash(record_id) % len(paraphrases)]
  messages = [{"role": "user", "content": template.format(**values)}, {"role": "assistant", "content": values[response_field]}]
  if isinstance(raw.get("system"), str) and raw["system"]:
    messages.insert(0, {"role": "system", "content": raw["system"]})
  return records.chat(record_id, source, messages, task=TEMPLATE_TASK[template_name], template=template_name, **extra)
