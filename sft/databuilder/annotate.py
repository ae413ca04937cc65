"""Annotate with a model: fill missing responses, write new instructions from seed tasks
(self-instruct), and score examples as a filter. All through one small interface,

    generator.generate(prompts: Sequence[str]) -> list[str]

that the caller injects: `sft.serve.ModelGenerator` serves a model trained with this project (what
`sft.build_dataset` passes for `annotate.model_workdir`), or anything else with that method.
What a model writes goes through the same cleaning, filters and deduplication as what was read.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence

from sft.databuilder import records

SELF_INSTRUCT_SOURCE = "self-instruct"
SCORE_PROMPT = (
    "Rate how helpful and correct the response is for the instruction, from 1 (useless) to 5 "
    "(excellent). Reply with the number only.\n\nInstruction: {prompt}\n\nResponse: {response}\n\nRating:"
)
_TASK_PREFIX = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]|\d+\s*[:.)-])\s*", re.IGNORECASE)
_RATING = re.compile(r"\b([1-5])\b")


class Generator(Protocol):
  def generate(self, prompts: Sequence[str]) -> list[str]: ...


def fill_responses(batch: list[records.Record], generator: Generator | None) -> list[records.Record]:
  """Records marked needs_response get the generator's answer as their last turn (or are dropped
  when there is no generator); the rest pass through."""
  todo = [i for i, r in enumerate(batch) if not records.is_dropped(r) and r.get("needs_response")]
  if not todo:
    return batch
  out = list(batch)
  if generator is None:
    for i in todo:
      out[i] = records.drop(batch[i], "annotate", "missing response", "no annotate.model_workdir to fill it")
    return out
  answers = generator.generate([_prompt_text(batch[i]["messages"]) for i in todo])
  for i, answer in zip(todo, answers):
    record = {k: v for k, v in batch[i].items() if k != "needs_response"}
    record["messages"] = [*record["messages"], {"role": "assistant", "content": answer}]
    out[i] = {**record, "annotated": "response"}
  return out


def _prompt_text(messages: list[dict[str, str]]) -> str:
  return "\n\n".join(m["content"] for m in messages if m["role"] != "assistant") if len(messages) > 2 else messages[-1]["content"]


def self_instruct_prompts(seeds: list[records.Record], params: dict[str, Any]) -> list[str]:
  """`num_instructions` prompts, each showing `examples_per_prompt` seed instructions (a fixed,
  seeded choice) and asking for a new one."""
  if not seeds or params["num_instructions"] <= 0:
    return []
  order = sorted(seeds, key=lambda r: records.stable_hash(f"{params['seed']}:{r['id']}"))
  k = min(params["examples_per_prompt"], len(order))
  prompts = []
  for i in range(params["num_instructions"]):
    examples = [records.prompt_and_response(order[(i * k + j) % len(order)])[0] for j in range(k)]
    shown = "\n\n".join(f"Task {j + 1}: {text}" for j, text in enumerate(examples))
    prompts.append(f"Here are some tasks.\n\n{shown}\n\nWrite one new task that is different from these.\n\nTask {k + 1}:")
  return prompts


def parse_instruction(text: str) -> str:
  """The first non-empty line of a generation, without a leading "Task 4:" or "4." label."""
  line = next((x for x in text.splitlines() if x.strip()), "")
  return _TASK_PREFIX.sub("", line).strip()


def self_instruct(seeds: list[records.Record], generator: Generator | None, params: dict[str, Any]) -> list[records.Record]:
  """New chat records written by the generator from seed tasks (instruction, then its response)."""
  prompts = self_instruct_prompts(seeds, params)
  if not prompts:
    return []
  if generator is None:
    raise ValueError("annotate.self_instruct.num_instructions > 0 needs annotate.model_workdir")
  instructions = [parse_instruction(x) for x in generator.generate(prompts)]
  usable = [i for i, x in enumerate(instructions) if x]
  answers = dict(zip(usable, generator.generate([instructions[i] for i in usable])))
  out = []
  for i, instruction in enumerate(instructions):
    record_id = f"{SELF_INSTRUCT_SOURCE}:{i}"
    if i not in answers:
      out.append(records.rejected(record_id, SELF_INSTRUCT_SOURCE, "annotate", "no instruction generated", raw=prompts[i]))
      continue
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answers[i]}]
    out.append(records.chat(record_id, SELF_INSTRUCT_SOURCE, messages, annotated="self-instruct"))
  return out


def parse_rating(text: str) -> int | None:
  match = _RATING.search(text)
  return int(match.group(1)) if match else None


def score_batch(batch: list[records.Record], generator: Generator, min_score: int) -> list[records.Record]:
  """Chat records get the generator's 1-5 rating as "score"; below `min_score` or unreadable: dropped."""
  todo = [i for i, r in enumerate(batch) if not records.is_dropped(r) and r["kind"] == "chat"]
  if not todo:
    return batch
  prompts = [SCORE_PROMPT.format(prompt=p, response=a) for p, a in (records.prompt_and_response(batch[i]) for i in todo)]
  out = list(batch)
  for i, answer in zip(todo, generator.generate(prompts)):
    rating = parse_rating(answer)
    if rating is None:
      out[i] = records.drop(batch[i], "score", "unreadable score", repr(answer[:80]))
    elif rating < min_score:
      out[i] = records.drop({**batch[i], "score": rating}, "score", "low score", f"{rating} < {min_score}")
    else:
      out[i] = {**batch[i], "score": rating}
  return out
