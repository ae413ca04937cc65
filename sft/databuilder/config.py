"""Every key of a data build: its default, its check and its meaning, in one place. Build configs under
`configs/` start from `build_config()`; keys that only work together are RULES, at the end."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import ml_collections

from sft.annotator.endpoint import DEFAULT_API_KEY_ENV, backend_of, env_name_problem, is_url
from sft.config_keys import (
  AT_LEAST_0,
  AT_LEAST_1,
  BELOW_1,
  FRACTION,
  POSITIVE,
  SEED,
  OneOf,
  Range,
  SomeOf,
  key,
  locked,
  ngram_fractions,
  problems_against,
  raise_problems,
  regexes,
  renames,
  rule_problems,
  section,
  strings,
  to_config_dict,
)
from sft.databuilder.annotate.judge import DEFAULT_RUBRIC
from sft.databuilder.clean import PHONE_LENIENCIES, PII_KINDS
from sft.databuilder.control import MODES as CONTROL_STRING_MODES


@dataclasses.dataclass(frozen=True)
class Clean:
  fix_unicode: bool = key(True)  # ftfy: mojibake, broken Unicode, control characters
  unicode_form: str = key("NFC", OneOf(("NFC", "NFD", "NFKC", "NFKD")))
  strip_html: bool = key(True)  # only texts that hold tags
  pii: tuple = key(("email", "ip_address", "phone"), SomeOf(PII_KINDS))  # replaced by <EMAIL>, ...; () keeps them
  phone_region: str = key("US")  # numbers without +country are read as this region's (phonenumbers); "" only +country
  phone_leniency: str = key("valid", OneOf(PHONE_LENIENCIES))  # "possible" also takes year ranges like (1313-1375)
  # Chat control strings in the data (<|im_start|>, [INST], <start_of_turn>, ..., and the ones of
  # filter.length.tokenizer) would become real control tokens and forge turns. "escape": a backslash after
  # the first character (<\|im_start|>), counted in edits as control_strings_escaped; "drop": the record.
  control_strings: str = key("escape", OneOf(CONTROL_STRING_MODES))


@dataclasses.dataclass(frozen=True)
class LengthFilter:
  min_characters: int = key(2, AT_LEAST_0)
  max_characters: int = key(100_000, AT_LEAST_0)  # 0: no limit
  min_words: int = key(1, AT_LEAST_0)
  max_words: int = key(20_000, AT_LEAST_0)
  min_tokens: int = key(0, AT_LEAST_0)  # token bounds need filter.length.tokenizer
  max_tokens: int = key(0, AT_LEAST_0)
  tokenizer: str = key("")  # a SentencePiece .model or a Hugging Face folder, to count tokens


@dataclasses.dataclass(frozen=True)
class GopherFilter:
  """Gopher quality rules (thresholds as in Rae et al. 2021 / datatrove)."""

  enabled: bool = key(True)
  min_words_to_apply: int = key(50, AT_LEAST_0)  # shorter texts skip these rules: their ratios are noise
  min_mean_word_length: float = key(3.0, AT_LEAST_0)
  max_mean_word_length: float = key(10.0, AT_LEAST_0)
  max_symbol_word_ratio: float = key(0.1, AT_LEAST_0)  # '#' and ellipses per word
  min_alpha_word_ratio: float = key(0.8, FRACTION)  # words with at least one letter
  min_stop_words: int = key(2, AT_LEAST_0)
  max_duplicate_line_fraction: float = key(0.3, FRACTION)
  max_duplicate_line_char_fraction: float = key(0.2, FRACTION)
  max_duplicate_paragraph_fraction: float = key(0.3, FRACTION)
  max_duplicate_paragraph_char_fraction: float = key(0.2, FRACTION)
  max_top_ngram_char_fraction: dict = key({"2": 0.2, "3": 0.18, "4": 0.16}, ngram_fractions, open_keys=True)
  max_duplicated_ngram_char_fraction: dict = key(
      {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}, ngram_fractions, open_keys=True
  )


@dataclasses.dataclass(frozen=True)
class LanguageFilter:
  enabled: bool = key(True)
  languages: tuple = key(("en",), strings)  # ISO 639-1 codes to keep
  # A record is dropped when py3langid is at least this sure of a language outside `languages`; a text it is
  # less sure of (short, names, code) gets no verdict: kept, counted "not judged (unsure)" in the report.
  min_confidence: float = key(0.5, FRACTION)
  min_chars: int = key(40, AT_LEAST_0)  # shorter texts are not judged (kept)


@dataclasses.dataclass(frozen=True)
class SftFilter:
  min_response_alnum_chars: int = key(1, AT_LEAST_0)  # fewer letters/digits than this: a trivial response
  refusal_patterns: tuple = key(("default",), regexes)  # regexes; ("default",) is quality.REFUSALS, () turns it off


@dataclasses.dataclass(frozen=True)
class Filter:
  length: LengthFilter = section(LengthFilter)
  gopher: GopherFilter = section(GopherFilter)
  language: LanguageFilter = section(LanguageFilter)
  sft: SftFilter = section(SftFilter)


@dataclasses.dataclass(frozen=True)
class Decontaminate:
  eval_files: tuple = key((), strings)  # evaluation sets, in any format the readers take
  ngram: int = key(13, AT_LEAST_1)
  min_words: int = key(8, AT_LEAST_1)  # shorter eval items are matched whole if at least this long
  # Every eval item is also matched by its whole normalised text, whatever its length: a record (or
  # turn) equal to it, or holding it when it has at least this many words, is dropped ("eval item (exact)").
  exact_min_words: int = key(3, AT_LEAST_1)


@dataclasses.dataclass(frozen=True)
class Dedup:
  exact: bool = key(True)  # same text after lowercasing and collapsing whitespace
  near: bool = key(True)
  num_perm: int = key(112, AT_LEAST_1)  # MinHash permutations = bands x rows
  # LSH proposes a pair of Jaccard J with probability 1 - (1 - J**rows)**bands: 28 x 4 proposes 99.95% of
  # pairs at 0.7 (FineWeb's 14 x 8: 57%). Proposals below the threshold cost only their verification.
  bands: int = key(28, AT_LEAST_1)
  rows: int = key(4, AT_LEAST_1)
  shingle_size: int = key(5, AT_LEAST_1)  # words per shingle
  # Exact Jaccard similarity a proposed pair must reach: of the whole texts' shingle sets, and for two chats
  # also of their answers' word sets, which must hold the same digits too (a shared prompt with other answers
  # is no duplicate).
  threshold: float = key(0.7, FRACTION)
  seed: int = key(1, SEED)


@dataclasses.dataclass(frozen=True)
class Label:
  # Records with a text and a label set but no label get one: "loglik" ranks the set by the annotator's
  # log-likelihood (label_confidence: the top label's probability margin); "generate" reads its answer.
  method: str = key("loglik", OneOf(("loglik", "generate")))
  min_confidence: float = key(0.0, FRACTION)  # a smaller margin drops the record ("label: unsure"); loglik only


@dataclasses.dataclass(frozen=True)
class SelfInstruct:
  num_instructions: int = key(0, AT_LEAST_0)  # new instructions to write from seed tasks
  examples_per_prompt: int = key(3, AT_LEAST_1)
  seed: int = key(0, SEED)
  max_similarity: float = key(0.7, FRACTION)  # ROUGE-L against seeds and accepted ones at or above it: dropped


@dataclasses.dataclass(frozen=True)
class Judge:
  enabled: bool = key(False)  # score every kept chat 1-5 against the rubric, drop below min_score
  rubric: str = key(DEFAULT_RUBRIC)
  min_score: int = key(3, Range(1, 5))


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """An OpenAI-compatible server as the annotator (annotate.model its base URL): sft.annotator.endpoint."""

  model: str = key("")  # the name the server serves the model under; "": the first one GET /models lists
  # The environment variable holding the API key, sent as a Bearer token ("" or unset: none); never the key.
  api_key_env: str = key(DEFAULT_API_KEY_ENV, env_name_problem)
  timeout_s: float = key(120.0, POSITIVE)  # seconds one request may take
  retries: int = key(4, AT_LEAST_0)  # further tries of a failed request (backoff, Retry-After); then a counted drop
  concurrency: int = key(8, AT_LEAST_1)  # requests in flight at once (at most annotate.batch_size are asked together)


@dataclasses.dataclass(frozen=True)
class Annotate:
  # The annotator: a training workdir of this project, a local Hugging Face folder, or the base URL of an
  # OpenAI-compatible server (http://127.0.0.1:8000/v1; see `endpoint`) ("" : none; records that need an
  # answer or a label are then dropped, counted).
  model: str = key("")
  # auto: a URL is "endpoint", a folder is told apart by its files
  backend: str = key("auto", OneOf(("auto", "workdir", "hf", "endpoint")))
  batch_size: int = key(32, AT_LEAST_1)
  max_new_tokens: int = key(128, AT_LEAST_1)
  temperature: float = key(0.0, AT_LEAST_0)  # 0: greedy
  top_p: float = key(1.0, Range(0, 1, low_open=True))
  seed: int = key(0, SEED)  # sampling: a row's randomness comes from it and the row's own prompt
  # Every generation and score is kept in <output folder>/annotations.sqlite, keyed by the annotator's
  # fingerprint, the task, the prompt and the decoding: a build run again regenerates nothing it has.
  cache: bool = key(True)
  # A build fails (the previous build stays) when an annotation task (fill, label, self-instruct, the judge)
  # drops more than this fraction of what it was given; each task is held to it on its own.
  max_drop_fraction: float = key(0.5, FRACTION)
  endpoint: Endpoint = section(Endpoint)
  label: Label = section(Label)
  self_instruct: SelfInstruct = section(SelfInstruct)
  judge: Judge = section(Judge)


@dataclasses.dataclass(frozen=True)
class Format:
  system_prompt: str = key("")  # added as the system turn of chats that have none


@dataclasses.dataclass(frozen=True)
class Output:
  validation_fraction: float = key(0.05, BELOW_1)  # by a hash of the record's group (or id)
  salt: str = key("")  # changes which records go to validation, deterministically
  num_shards: int = key(1, AT_LEAST_1)  # ArrayRecord shards per split
  examples_per_reason: int = key(3, AT_LEAST_0)  # in the report


@dataclasses.dataclass(frozen=True)
class Build:
  job: str = key("build", OneOf(("build",)))  # launch.py runs the data builder for this config
  input_dir: str = key("")  # every file under it is read (format by extension, schema per record)
  stdlib: bool = key(False)  # also read the embedded default: this Python's standard-library API docs
  # Renames raw fields before schema detection, e.g. {"question": "prompt"}.
  field_map: dict = key({}, renames, open_keys=True)
  # A raw field holding the right answer (e.g. "section"): kept as the record's `gold`, left out of schema
  # detection; the audit measures annotation against it.
  gold_field: str = key("")
  # A longer line, row or document is rejected unparsed (bounds memory); 0: no limit.
  read_max_record_bytes: int = key(16 * 2**20, AT_LEAST_0)
  clean: Clean = section(Clean)
  filter: Filter = section(Filter)
  decontaminate: Decontaminate = section(Decontaminate)
  dedup: Dedup = section(Dedup)
  annotate: Annotate = section(Annotate)
  format: Format = section(Format)
  output: Output = section(Output)
  runner: str = key("local", OneOf(("local", "beam")))  # "local": worker processes here; "beam": Apache Beam
  num_workers: int = key(0, AT_LEAST_0)  # local worker processes; 0: one per CPU
  beam_options: tuple = key((), strings)  # e.g. ("--runner=DataflowRunner", "--project=...") ; default DirectRunner


def build_config() -> ml_collections.ConfigDict:
  """The defaults, locked: a key a config file or a flag misspells fails where it is set."""
  return locked(to_config_dict(Build), Build)


# --- keys that only work together: (the keys read, the check of their values), checked once they are each valid


def _something_to_read(v: dict[str, Any]) -> str | None:
  return None if v["input_dir"] or v["stdlib"] else "nothing to read: set input_dir (a folder of raw files) and/or stdlib=True"


def _bands_make_perms(v: dict[str, Any]) -> str | None:
  if not v["dedup.near"] or v["dedup.bands"] * v["dedup.rows"] == v["dedup.num_perm"]:
    return None
  return f"dedup.bands x dedup.rows ({v['dedup.bands']} x {v['dedup.rows']}) must equal dedup.num_perm ({v['dedup.num_perm']})"


def _token_bounds_counted(v: dict[str, Any]) -> str | None:
  if (v["filter.length.min_tokens"] or v["filter.length.max_tokens"]) and not v["filter.length.tokenizer"]:
    return "filter.length.min_tokens / max_tokens need filter.length.tokenizer"
  return None


def _tokenizer_exists(v: dict[str, Any]) -> str | None:
  path = v["filter.length.tokenizer"]
  return f"filter.length.tokenizer={path!r} does not exist" if path and not pathlib.Path(path).exists() else None


def _annotation_model_named(v: dict[str, Any]) -> str | None:
  if (v["annotate.self_instruct.num_instructions"] > 0 or v["annotate.judge.enabled"]) and not v["annotate.model"]:
    return (
        "annotate.self_instruct and annotate.judge need annotate.model (a training workdir, a Hugging Face folder "
        "or an OpenAI-compatible server's URL)"
    )
  return None


def _annotator_exists(v: dict[str, Any]) -> str | None:
  model, backend = v["annotate.model"], backend_of(v["annotate.model"], v["annotate.backend"])
  if not model:
    return None
  if backend == "endpoint" and not is_url(model):
    return f"annotate.model={model!r} is no URL: the endpoint backend needs the server's base URL"
  if backend == "endpoint":
    return None
  if is_url(model):
    return f"annotate.model={model!r} is a URL: set annotate.backend='endpoint' (or 'auto'), not {backend!r}"
  return f"annotate.model={model!r} is not a folder" if not pathlib.Path(model).is_dir() else None


def _endpoint_cannot_score(v: dict[str, Any]) -> str | None:
  endpoint = v["annotate.model"] and backend_of(v["annotate.model"], v["annotate.backend"]) == "endpoint"
  if endpoint and v["annotate.label.method"] == "loglik":
    return (
        "annotate.label.method='loglik' needs log-likelihoods, which an OpenAI-compatible endpoint cannot give: "
        "set annotate.label.method='generate'"
    )
  return None


def _margin_of_loglik(v: dict[str, Any]) -> str | None:
  if v["annotate.label.min_confidence"] > 0 and v["annotate.label.method"] != "loglik":
    return "annotate.label.min_confidence needs annotate.label.method='loglik' (a generated label has no margin)"
  return None


RULES = (
    (("input_dir", "stdlib"), _something_to_read),
    (("dedup.near", "dedup.bands", "dedup.rows", "dedup.num_perm"), _bands_make_perms),
    (("filter.length.min_tokens", "filter.length.max_tokens", "filter.length.tokenizer"), _token_bounds_counted),
    (("filter.length.tokenizer",), _tokenizer_exists),
    (("annotate.self_instruct.num_instructions", "annotate.judge.enabled", "annotate.model"), _annotation_model_named),
    (("annotate.model", "annotate.backend"), _annotator_exists),
    (("annotate.model", "annotate.backend", "annotate.label.method"), _endpoint_cannot_score),
    (("annotate.label.min_confidence", "annotate.label.method"), _margin_of_loglik),
)


def build_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of a build config: keys, types, each value's check, then RULES."""
  problems, values, bad = problems_against(config, build_config(), Build)
  return [p for p in problems + rule_problems(RULES, values, bad) if p]


def check_build_config(config: ml_collections.ConfigDict) -> None:
  """Raises one ConfigError listing every problem of a build config (`sft.config_check` for a run config's)."""
  raise_problems(build_problems(config))
