"""self_instruct: new instructions written by the annotator from kept seed tasks, then answered by it
(Wang et al., 2023, "Self-Instruct").

Each prompt shows `examples_per_prompt` seed instructions (a fixed, seeded choice) and asks for a new
one. A new instruction is kept only if it is novel: its ROUGE-L F-measure against every seed and every
instruction already accepted stays below `max_similarity` (the paper's 0.7); else it is dropped
("self-instruct: too similar", naming the nearest). Generated records are counted as `generated` in
the accounting (read + generated = kept + dropped), and go through the same cleaning, filters and
deduplication as what was read.
"""

from __future__ import annotations

import functools
import heapq
import logging
import re
from typing import Any, Sequence

from sft.databuilder import records
from sft.databuilder.annotate.common import STAGE, failure, generate

SELF_INSTRUCT_SOURCE = "self-instruct"
KIND = "self-instruct"  # the `annotated` mark of a generated record
log = logging.getLogger("sft")
_TASK_PREFIX = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]|\d+\s*[:.)-])\s*", re.IGNORECASE)


def self_instruct_prompts(seeds: list[records.Record], params: dict[str, Any]) -> list[str]:
  """`num_instructions` prompts, each showing `examples_per_prompt` seed instructions and asking for a new
  one: prompt i's examples are the seeds first in an order seeded by (seed, i), so prompts differ whatever
  the number of seeds (a fixed rotation repeated itself after a few, and an annotator answers a repeated
  prompt alike: a copy, dropped as too similar)."""
  if not seeds or params["num_instructions"] <= 0:
    return []
  k = min(params["examples_per_prompt"], len(seeds))
  prompts = []
  for i in range(params["num_instructions"]):
    chosen = heapq.nsmallest(k, seeds, key=lambda r: records.stable_hash(f"{params['seed']}:{i}:{r['id']}"))
    examples = [records.prompt_and_response(r)[0] for r in chosen]
    shown = "\n\n".join(f"Task {j + 1}: {text}" for j, text in enumerate(examples))
    prompts.append(f"Here are some tasks.\n\n{shown}\n\nWrite one new task that is different from these.\n\nTask {k + 1}:")
  return prompts


def parse_instruction(text: str) -> str:
  """The first non-empty line of a generation, without a leading "Task 4:" or "4." label."""
  line = next((x for x in text.splitlines() if x.strip()), "")
  return _TASK_PREFIX.sub("", line).strip()


@functools.lru_cache(maxsize=1)
def _tokenizer():
  from rouge_score import tokenizers  # noqa: PLC0415 (the reference implementation's own tokens)

  return tokenizers.DefaultTokenizer(use_stemmer=False)


# Scripts written without spaces between words (Han, kana, Thai, Lao, Myanmar, Khmer): a token per character.
_UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+")


def tokens(text: str) -> list[str]:
  """ROUGE-L's tokens of a text: rouge_score's own for ASCII text (lower case, runs of a-z and 0-9);
  otherwise, where those would drop every letter of other scripts and make any two texts look novel,
  the case-folded runs of letters and digits of any script, one per character where words are not
  spaced: tokens("Напиши стихотворение") -> ["напиши", "стихотворение"]; tokens("写诗") -> ["写", "诗"]."""
  if text.isascii():
    return _tokenizer().tokenize(text)
  return _WORD.findall(text.casefold().replace("_", " "))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(a: str | Sequence[str], b: str | Sequence[str]) -> float:
  """ROUGE-L F-measure of two texts (or token lists), as rouge_score's "rougeL" computes it."""
  a_tokens = tokens(a) if isinstance(a, str) else a
  b_tokens = tokens(b) if isinstance(b, str) else b
  if not a_tokens or not b_tokens:
    return 0.0
  lcs = _lcs(a_tokens, b_tokens)
  if not lcs:
    return 0.0
  precision, recall = lcs / len(a_tokens), lcs / len(b_tokens)
  return 2 * precision * recall / (precision + recall)


def _nearest(tokens: list[str], pool: list[tuple[str, list[str]]]) -> tuple[float, str]:
  return max(((rouge_l(tokens, other), text) for text, other in pool), default=(0.0, ""))


def _rejected(index: int, reason: str, detail: str, raw: str) -> records.Record:
  return {**records.rejected(f"{SELF_INSTRUCT_SOURCE}:{index}", SELF_INSTRUCT_SOURCE, STAGE, reason, detail, raw), "annotated": KIND}


def self_instruct(seeds: list[records.Record], annotator: Any, decoding: Any, params: dict[str, Any]) -> list[records.Record]:
  """New chat records (instruction, then its answer) written from the seeds, and one counted rejection per
  prompt that gave none."""
  prompts = self_instruct_prompts(seeds, params)
  if params["num_instructions"] > 0 and not seeds:
    log.warning("annotate: self-instruct asked for %d instructions, but no kept chat is left to show as a seed: none written", params["num_instructions"])
  distinct = len(set(prompts))
  if distinct < len(prompts):  # few seeds: a repeated prompt is answered alike, and dropped as too similar
    log.warning(
        "annotate: self-instruct: %d seeds make %d distinct prompts of the %d asked for: the repeats' answers will "
        "be dropped as too similar; add seeds or lower annotate.self_instruct.num_instructions", len(seeds), distinct, len(prompts),
    )
  if not prompts:
    return []
  if annotator is None:
    raise ValueError("annotate.self_instruct.num_instructions > 0 needs annotate.model")
  written = generate(annotator, [[{"role": "user", "content": p}] for p in prompts], decoding)
  pool = [(text, tokens(text)) for text in (records.prompt_and_response(r)[0] for r in seeds)]
  out: dict[int, records.Record] = {}
  accepted: list[tuple[int, str]] = []
  for i, generation in enumerate(written):
    instruction = parse_instruction(generation.text)
    whole_line = generation.finished or "\n" in generation.text.strip()
    if generation.error:  # the request failed (an endpoint's error after its retries)
      out[i] = _rejected(i, "self-instruct: annotator error", generation.error, "")
      continue
    if not instruction:
      out[i] = _rejected(i, "self-instruct: empty", "no instruction in the answer", generation.text)
      continue
    if not whole_line:
      out[i] = _rejected(i, "self-instruct: truncated", f"cut at max_new_tokens={decoding.max_new_tokens}", generation.text)
      continue
    instruction_tokens = tokens(instruction)
    if not instruction_tokens:  # no word to compare, so no novelty to measure: no instruction either
      out[i] = _rejected(i, "self-instruct: empty", f"no words in the instruction {instruction[:80]!r}", generation.text)
      continue
    similarity, nearest = _nearest(instruction_tokens, pool)
    if similarity >= params["max_similarity"]:
      detail = f"ROUGE-L {similarity:.2f} >= {params['max_similarity']} with {nearest[:80]!r}"
      out[i] = _rejected(i, "self-instruct: too similar", detail, instruction)
      continue
    pool.append((instruction, instruction_tokens))
    accepted.append((i, instruction))
  answers = generate(annotator, [[{"role": "user", "content": text}] for _, text in accepted], decoding)
  for (i, instruction), answer in zip(accepted, answers, strict=True):
    problem = failure(answer, decoding.max_new_tokens)
    if problem:
      out[i] = _rejected(i, f"self-instruct: {problem[0]}", problem[1], instruction)
      continue
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer.text}]
    out[i] = records.chat(f"{SELF_INSTRUCT_SOURCE}:{i}", SELF_INSTRUCT_SOURCE, messages, annotated=KIND)
  return [out[i] for i in sorted(out)]
