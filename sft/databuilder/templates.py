"""Structured raw data -> instruction examples, with several paraphrased instructions per task type.

A record whose fields match a task type becomes a chat; which paraphrase it gets is chosen by a
stable hash of its id, so the same input always gives the same example and the mix is even.

    {"text": "Great film!", "label": "positive", "labels": ["positive", "negative"]}
      -> user: "Classify the following text into one of: positive, negative.\n\nGreat film!"
         assistant: "positive"
"""

from __future__ import annotations

from typing import Any

from sft.databuilder import records

# task type -> (fields that identify it, optional fields, instruction paraphrases, response field)
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
}


def task_of(fields: set[str]) -> str | None:
  """The task type whose identifying fields are all present and that accounts for the most fields."""
  matches = [name for name, (needed, optional, _, _) in TASKS.items() if set(needed) <= fields and fields <= set(needed) | set(optional) | {"id", "system"}]
  return max(matches, key=lambda n: len(TASKS[n][0])) if matches else None


def to_chat(raw: dict[str, Any], task: str, record_id: str, source: str) -> records.Record:
  """The chat for one structured record; raises ValueError naming a field that is not text."""
  needed, optional, paraphrases, response_field = TASKS[task]
  values = {}
  for field in needed:
    value = raw[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and field == "label":
      value = str(value)
    if not isinstance(value, str):
      raise ValueError(f"field '{field}' is {type(value).__name__}, not text")
    values[field] = value
  if task == "classification":
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels)):
      raise ValueError("field 'labels' is not a list of labels")
    values["options"] = f" as one of: {', '.join(map(str, labels))}" if labels else ""
  template = paraphrases[records.stable_hash(record_id) % len(paraphrases)]
  messages = [{"role": "user", "content": template.format(**values)}, {"role": "assistant", "content": values[response_field]}]
  if isinstance(raw.get("system"), str) and raw["system"]:
    messages.insert(0, {"role": "system", "content": raw["system"]})
  return records.chat(record_id, source, messages, task=task)
