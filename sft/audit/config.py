"""Every key of a data audit: its default, its check and its meaning, in one place. `configs/audit.py` starts
from `audit_config()`; keys that only work together are RULES, at the end."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import ml_collections

from sft.config_keys import (
  AT_LEAST_1,
  SEED,
  OneOf,
  Range,
  key,
  locked,
  problems_against,
  raise_problems,
  rule_problems,
  section,
  strings,
  to_config_dict,
)

MODES = ("sample", "judge", "score")
RUBRIC = (
    "You review examples for training a chat assistant. Keep an example when its response is correct, helpful "
    "and safe, answers its instruction, and is worth learning from. Drop it when it is wrong, harmful, "
    "off-topic, garbled, a refusal without reason, or not a usable example (broken text, a duplicate of no "
    "value)."
)


@dataclasses.dataclass(frozen=True)
class Judge:
  """The machine reviewer (mode "judge"): a model behind sft/annotator/base.py's Annotator interface."""

  # The model that reviews: a training workdir, a Hugging Face folder (sft.annotator.open_annotator) or the URL of
  # an OpenAI-compatible server (its first model, the key from SFT_API_KEY: sft.annotator.open_endpoint); an
  # annotator passed to sft.audit(..., annotator=) is used instead.
  model: str = key("")
  rubric: str = key(RUBRIC)  # what makes a record worth keeping; the prompt adds the record and the answer format
  max_new_tokens: int = key(16, AT_LEAST_1)  # the answer is one word or a label
  batch_size: int = key(16, AT_LEAST_1)  # records per generate call


@dataclasses.dataclass(frozen=True)
class Audit:
  job: str = key("audit", OneOf(("audit",)))  # launch.py runs the data audit for this config
  build_dir: str = key("")  # the finished data build to audit (a folder with manifest.json)
  # "sample": review.jsonl / review.csv to fill; "judge": a model fills them; "score": filled reviews -> figures
  mode: str = key("sample", OneOf(MODES))
  seed: int = key(0, SEED)  # which records are sampled, and the bootstrap's draws
  per_stratum: int = key(20, AT_LEAST_1)  # records sampled from each stratum (all of a smaller one)
  reviews: tuple = key((), strings)  # filled review files (JSONL or CSV) that mode "score" reads
  tokenizer: str = key("")  # a SentencePiece .model or a Hugging Face folder: trained tokens marked by its loss mask
  bootstrap_samples: int = key(1000, AT_LEAST_1)  # draws of the stratified bootstrap (recall, overall error)
  # A record's text in a review row is cut after this many characters (a CSV field holds at most 131072).
  max_text_chars: int = key(6000, Range(1, 100_000))
  judge: Judge = section(Judge)


def audit_config() -> ml_collections.ConfigDict:
  """The defaults, locked: a key a config file or a flag misspells fails where it is set."""
  return locked(to_config_dict(Audit), Audit)


# --- keys that only work together: (the keys read, the check of their values), checked once they are each valid


def _build_named(v: dict[str, Any]) -> str | None:
  return None if v["build_dir"] else "build_dir is not set: name the finished data build to audit (--config.build_dir=...)"


def _tokenizer_exists(v: dict[str, Any]) -> str | None:
  path = v["tokenizer"]
  return f"tokenizer={path!r} does not exist" if path and not pathlib.Path(path).exists() else None


RULES = (
    (("build_dir",), _build_named),
    (("tokenizer",), _tokenizer_exists),
)


def audit_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of an audit config: keys, types, each value's check, then RULES."""
  problems, values, bad = problems_against(config, audit_config(), Audit)
  return [p for p in problems + rule_problems(RULES, values, bad) if p]


def check_audit_config(config: ml_collections.ConfigDict) -> None:
  """Raises one ConfigError listing every problem of an audit config."""
  raise_problems(audit_problems(config))
