"""Filter for quality: each rule returns None (keep) or the reason and detail of a drop.

    length     characters, words and (with a tokenizer) tokens of the whole record, within bounds; a
               text the tokenizer library fails on (a Rust panic included) is dropped with the reason
    gopher     Gopher heuristics (Rae et al. 2021, as in datatrove): mean word length, symbol and
               non-alphabetic word ratios, duplicated lines and paragraphs, top and duplicated
               n-gram character fractions, stop words. Applied to texts of at least
               `min_words_to_apply` words: on a one-line answer the ratios say nothing.
    language   py3langid (its model ships inside the package); a record is dropped when the identifier
               is at least `min_confidence` sure of a language outside `languages`. A text shorter than
               `min_chars`, a translation example (two languages by design) or one the identifier is less
               sure of gets no verdict: it is kept, and the report counts it as not judged.
    sft        an empty or trivial response, a response that repeats the prompt, refusal boilerplate
"""

from __future__ import annotations

import collections
import functools
import itertools
import re
from typing import Any, Callable

from sft.databuilder import language_id, records

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's
REFUSALS = (
    r"\bas an ai(?: language)? model\b",
    r"\bi(?:'m| am) (?:sorry|afraid),? (?:but )?i (?:can(?:no|')t|am unable to|won't)\b",
    r"\bi can(?:no|')t (?:help|assist) with (?:that|this)\b",
    r"\bi(?:'m| am) (?:not able|unable) to (?:help|assist|provide)\b",
    r"\bi do not have the ability to\b",
)


def length(record: records.Record, p: dict[str, Any], count_tokens: Callable[[str], int] | None) -> tuple[str, str] | None:
  text = records.contents(record)
  n_chars, n_words = len(text), len(text.split())
  for what, n in (("characters", n_chars), ("words", n_words)):
    lo, hi = p[f"min_{what}"], p[f"max_{what}"]
    if n < lo:
      return f"too few {what}", f"{n} < {lo}"
    if hi and n > hi:
      return f"too many {what}", f"{n} > {hi}"
  if count_tokens is not None:
    try:
      n_tokens = count_tokens(text)
    except ValueError as err:  # the tokenizer library failed on this text (TokenizerFailure): this record only
      return "tokenizer failed", str(err)
    if n_tokens < p["min_tokens"]:
      return "too few tokens", f"{n_tokens} < {p['min_tokens']}"
    if p["max_tokens"] and n_tokens > p["max_tokens"]:
      return "too many tokens", f"{n_tokens} > {p['max_tokens']}"
  return None


def _duplicate_fraction(items: list[str]) -> tuple[float, float]:
  """(share of items that repeat an earlier one, share of characters in them)."""
  seen, dup_items, dup_chars = set(), 0, 0
  for item in items:
    if item in seen:
      dup_items += 1
      dup_chars += len(item)
    seen.add(item)
  total_chars = sum(len(x) for x in items) or 1
  return dup_items / max(len(items), 1), dup_chars / total_chars


def _ngrams(words: list[str], n: int) -> zip:
  """The word n-grams of `words` as tuples, in order (tuple(words[i:i + n]) for each i), built in C."""
  return zip(*(words[k:] for k in range(n)))


def _top_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
  """Characters covered by the most frequent word n-gram (the first seen among equals), over all word
  characters (`total_chars`)."""
  grams = collections.Counter(_ngrams(words, n))
  if not grams:
    return 0.0
  gram, count = grams.most_common(1)[0]
  return count * sum(len(w) for w in gram) / max(total_chars, 1)


def _duplicated_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
  """Characters of words inside an n-gram that occurs more than once, over all word characters."""
  grams = list(_ngrams(words, n))
  if len(set(grams)) == len(grams):  # no n-gram repeats (most texts): nothing is covered
    return 0.0
  seen: set = set()
  repeats = [i for i, gram in enumerate(grams) if gram in seen or seen.add(gram)]  # starts of later occurrences
  covered = [False] * len(words)
  for i in repeats:
    covered[i:i + n] = [True] * n
  return sum(map(len, itertools.compress(words, covered))) / max(total_chars, 1)


def gopher(record: records.Record, p: dict[str, Any]) -> tuple[str, str] | None:
  text = records.contents(record)
  words = text.split()
  if len(words) < p["min_words_to_apply"]:
    return None
  mean_len = sum(map(len, words)) / len(words)
  if not p["min_mean_word_length"] <= mean_len <= p["max_mean_word_length"]:
    return "gopher: mean word length", f"{mean_len:.1f} not in [{p['min_mean_word_length']}, {p['max_mean_word_length']}]"
  symbols = (text.count("#") + text.count("...") + text.count("\u2026")) / len(words)
  if symbols > p["max_symbol_word_ratio"]:
    return "gopher: symbol ratio", f"{symbols:.2f} > {p['max_symbol_word_ratio']}"
  alpha = sum(1 for w in words if any(map(str.isalpha, w))) / len(words)
  if alpha < p["min_alpha_word_ratio"]:
    return "gopher: non-alphabetic words", f"{alpha:.2f} of words have a letter < {p['min_alpha_word_ratio']}"
  lowered = [w.lower().strip(".,;:!?\"'()") for w in words]
  stop = sum(map(STOP_WORDS.__contains__, lowered))
  if stop < p["min_stop_words"]:
    return "gopher: stop words", f"{stop} < {p['min_stop_words']}"
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  line_frac, line_chars = _duplicate_fraction(lines)
  if line_frac > p["max_duplicate_line_fraction"] or line_chars > p["max_duplicate_line_char_fraction"]:
    return "gopher: duplicated lines", f"{line_frac:.2f} of lines, {line_chars:.2f} of characters"
  paragraphs = [x.strip() for x in re.split(r"\n\s*\n", text) if x.strip()]
  para_frac, para_chars = _duplicate_fraction(paragraphs)
  if para_frac > p["max_duplicate_paragraph_fraction"] or para_chars > p["max_duplicate_paragraph_char_fraction"]:
    return "gopher: duplicated paragraphs", f"{para_frac:.2f} of paragraphs, {para_chars:.2f} of characters"
  total_chars = sum(map(len, lowered))
  for n, limit in p["max_top_ngram_char_fraction"].items():
    frac = _top_ngram_char_fraction(lowered, int(n), total_chars)
    if frac > limit:
      return "gopher: repeated n-gram", f"top {n}-gram covers {frac:.2f} > {limit}"
  for n, limit in p["max_duplicated_ngram_char_fraction"].items():
    frac = _duplicated_ngram_char_fraction(lowered, int(n), total_chars)
    if frac > limit:
      return "gopher: duplicated n-grams", f"duplicated {n}-grams cover {frac:.2f} > {limit}"
  return None


def identify_language(text: str) -> tuple[str, float]:
  """('en', 0.99): the most likely language and its probability."""
  return language_id.identify([text])[0]


# The report's language mix counts a kept record the language filter gave no verdict under these.
NOT_JUDGED_SHORT, NOT_JUDGED_UNSURE, NOT_JUDGED_TRANSLATION = (
    "not judged (short)", "not judged (unsure)", "not judged (translation)"
)


def detect_language(record: records.Record, p: dict[str, Any]) -> tuple[str, float] | None:
  """The record's (language, probability), or None where it is not judged: shorter than
  `min_chars`, or a translation pair (two languages by design)."""
  return identify_language(records.contents(record)) if _judged(record, p) else None


def _judged(record: records.Record, p: dict[str, Any]) -> bool:
  return len(records.contents(record)) >= p["min_chars"] and record.get("task") != "translation"


def language(record: records.Record, p: dict[str, Any]) -> tuple[str, str] | None:
  return language_verdict(detect_language(record, p), p)


def language_verdict(judged: tuple[str, float] | None, p: dict[str, Any]) -> tuple[str, str] | None:
  """A drop only when the identifier is at least `min_confidence` sure of a language outside `languages`:
  on a short or mixed text (a one-word answer, code, names) its best guess is often wrong but unsure,
  and an unsure guess says nothing either way."""
  if judged is None:
    return None
  lang, prob = judged
  if lang not in p["languages"] and prob >= p["min_confidence"]:
    return "language", f"{lang} ({prob:.2f} >= {p['min_confidence']})"
  return None


def language_label(record: records.Record, judged: tuple[str, float] | None, p: dict[str, Any]) -> str:
  """What the report's language mix counts a kept record as: its language, or why it was not judged."""
  if judged is None:
    return NOT_JUDGED_TRANSLATION if record.get("task") == "translation" else NOT_JUDGED_SHORT
  lang, prob = judged
  return lang if prob >= p["min_confidence"] else NOT_JUDGED_UNSURE


def _normalized(text: str) -> str:
  return " ".join(records.words(text))


@functools.lru_cache(maxsize=8)
def _refusal_pattern(patterns: tuple[str, ...]) -> re.Pattern:
  return re.compile("|".join(f"(?:{x})" for x in patterns), re.IGNORECASE)


# `[^\W_]` is exactly str.isalnum (re's Unicode \w is isalnum or "_").
_ALNUM = re.compile(r"[^\W_]")


def _has_alnum(text: str, n: int) -> bool:
  """Whether `text` has at least `n` alphanumeric characters; stops at the n-th."""
  return sum(1 for _ in itertools.islice(_ALNUM.finditer(text), max(n, 0))) >= n


def sft_rules(record: records.Record, p: dict[str, Any], per_message: list[list[str]] | None = None) -> tuple[str, str] | None:
  """`per_message`: the record's records.message_words, if known (the prompt's and answer's are among them)."""
  if record["kind"] != "chat":
    return None
  prompt, response = records.prompt_and_response(record)
  if not response.strip():
    return "empty response", ""
  if not _has_alnum(response, p["min_response_alnum_chars"]):
    return "trivial response", repr(response[:80])
  if per_message is None:
    norm_prompt, norm_response = _normalized(prompt), _normalized(response)
  else:
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    norm_prompt = " ".join(w for m, seq in zip(messages[:last], per_message) if m["role"] == "user" for w in seq)
    norm_response = " ".join(per_message[last])
  if norm_response and (norm_response == norm_prompt or (len(norm_prompt) >= 20 and norm_response.startswith(norm_prompt) and len(norm_response) < 1.2 * len(norm_prompt))):
    return "response repeats prompt", repr(response[:80])
  if p["refusal_patterns"] and (match := _refusal_pattern(tuple(p["refusal_patterns"])).search(response)):
    return "refusal boilerplate", repr(match.group())
  return None


def filter_record(record: records.Record, params: dict[str, Any], count_tokens=None) -> records.Record:
  """The record, or the record dropped by the first rule it fails (stage "filter")."""
  return filter_records([record], params, count_tokens)[0]


def _first_failure(record: records.Record, params: dict[str, Any], count_tokens, per_message: list[list[str]] | None = None) -> tuple[str, str] | None:
  """The rules before the language's, in order."""
  checks = (
      lambda: length(record, params["length"], count_tokens),
      lambda: sft_rules(record, params["sft"], per_message),
      lambda: gopher(record, params["gopher"]) if params["gopher"]["enabled"] else None,
  )
  for check in checks:
    failure = check()
    if failure:
      return failure
  return None


def filter_records(batch: list[records.Record], params: dict[str, Any], count_tokens=None, per_message: list | None = None) -> list[records.Record]:
  """filter_record on each record; the language identifier runs once over the texts it judges.
  `per_message`: each record's records.message_words, if known."""
  out = []
  for record, seqs in zip(batch, per_message or [None] * len(batch), strict=True):
    failure = _first_failure(record, params, count_tokens, seqs)
    out.append(records.drop(record, "filter", *failure) if failure else record)
  if not params["language"]["enabled"]:
    return out
  p = params["language"]
  judge = [i for i, r in enumerate(out) if not records.is_dropped(r) and _judged(r, p)]
  verdicts = dict(zip(judge, language_id.identify([records.contents(out[i]) for i in judge]), strict=True))
  for i, record in enumerate(out):
    if records.is_dropped(record):
      continue
    judged = verdicts.get(i)
    failure = language_verdict(judged, p)
    out[i] = records.drop(record, "filter", *failure) if failure else {**record, "lang": language_label(record, judged, p)}
  return out
