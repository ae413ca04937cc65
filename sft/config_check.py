"""`check_config(config)`: every key of a run or build config checked before any work is done.

A config file's get_config() works on an unlocked ConfigDict, so a mistyped key there is a new key
that nothing reads; a zero interval divides by zero only after the data build. check_config compares
a config with the defaults it was made from (keys and types: sft/config.py, no second copy) and with
CONSTRAINTS (ranges, choices), and reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

import ml_collections

from sft.config import base_config
from sft.databuilder.config import build_config
from sft.databuilder.pipeline import params_of
from sft.errors import ConfigError
from sft.model.config import ModelConfig

BUILD = "data.build."  # where a run config holds the config of its data build


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= value <= high (an open end excludes the bound, None leaves that side unbounded); `also`
  lists values allowed besides (mesh sizes: -1)."""

  low: float
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  also: tuple = ()

  def __str__(self) -> str:
    if self.high is None:
      text = f"{'>' if self.low_open else '>='} {self.low:g}"
    else:
      text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    return " or ".join([*(f"{v:g}" for v in self.also), text])

  def __call__(self, value) -> str | None:
    if value in self.also:
      return None
    above = value > self.low if self.low_open else value >= self.low
    below = self.high is None or (value < self.high if self.high_open else value <= self.high)
    return None if above and below else f"must be {self}, got {value!r}"


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: tuple

  def __call__(self, value) -> str | None:
    return None if value in self.choices else f"must be one of {', '.join(map(repr, self.choices))}; got {value!r}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
MESH_SIZE = Range(1, also=(-1,))  # -1: the devices left over
BETA = Range(0, 1, high_open=True)


def _strings(value) -> str | None:
  odd = [v for v in value if not isinstance(v, str)]
  return f"must hold strings, got {odd[0]!r}" if odd else None


def _regexes(value) -> str | None:
  for pattern in value:
    if not isinstance(pattern, str):
      return f"must hold regular expressions (strings), got {pattern!r}"
    try:
      re.compile(pattern)
    except re.error as err:
      return f"{pattern!r} is not a regular expression ({err})"
  return None


def _renames(value) -> str | None:
  odd = {k: v for k, v in value.items() if not isinstance(v, str)}
  return f"maps raw field names to field names (strings), got {odd}" if odd else None


def _ngram_fractions(value) -> str | None:
  """{"n": the largest fraction of characters in n-grams ...}: n a positive integer, fractions in [0, 1]."""
  for n, fraction in value.items():
    if not str(n).isdigit() or int(n) < 1:
      return f'keys are n-gram sizes ("2", "3", ...), got {n!r}'
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or FRACTION(fraction):
      return f"[{n!r}] must be a fraction in [0, 1], got {fraction!r}"
  return None


def _sharding_rules(value) -> str | None:
  for rule in value:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      return f"each rule is (logical axis name, mesh axes), got {rule!r}"
    axes = rule[1]
    if not (axes is None or isinstance(axes, str) or (isinstance(axes, (list, tuple)) and not _strings(axes))):
      return f"the mesh axes of {rule[0]!r} are None, a name or names, got {axes!r}"
  return None


# Dotted key -> constraint (a function of the value: the problem, or None), for every key whose type
# alone does not make it valid. The keys ModelConfig checks (model.d_model, model.num_heads, model.dtype,
# ...) are checked by constructing it; the build keys `params_of` checks (output.validation_fraction,
# output.num_shards, runner, clean.control_strings, clean.phone_leniency, decontaminate.exact_min_words,
# read_max_record_bytes, dedup bands x rows) by calling it. A build config's keys are the data.build ones.
CONSTRAINTS = {
    "job": OneOf(("train", "eval", "build")),
    "seed": AT_LEAST_0,
    "data.source": OneOf(("build", "dir")),
    "tokenizer.vocab_size": AT_LEAST_1,
    "model.rope_theta": POSITIVE,
    "model.rope_factor": POSITIVE,
    "model.rope_low_freq_factor": POSITIVE,
    "model.rope_high_freq_factor": POSITIVE,
    "model.rope_original_max_positions": AT_LEAST_1,
    "model.norm_eps": POSITIVE,
    "model.lora_targets": _strings,
    "train.seq_len": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum_steps": AT_LEAST_1,
    "train.parallelism": OneOf(("jit", "pmap")),
    "train.loss_chunk_size": AT_LEAST_0,
    "train.pretrain_steps": AT_LEAST_0,
    "train.sft_steps": AT_LEAST_0,
    "train.lr": POSITIVE,
    "train.warmup_steps": AT_LEAST_0,
    "train.final_lr_fraction": FRACTION,
    "train.b1": BETA,
    "train.b2": BETA,
    "train.eps": POSITIVE,
    "train.weight_decay": AT_LEAST_0,
    "train.grad_clip_norm": POSITIVE,
    "train.log_every": AT_LEAST_1,
    "train.on_nonfinite": OneOf(("stop", "skip")),
    "train.max_consecutive_skips": AT_LEAST_1,
    "eval.every_steps": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "eval.num_generations": Range(0, also=(-1,)),
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.num_samples_to_print": AT_LEAST_0,
    "eval.answer_normalization": OneOf(("squad", "whitespace")),  # sft.evaluator.metrics.NORMALIZATIONS
    "eval.prompt_overflow": OneOf(("truncate", "refuse")),
    "eval.bootstrap_samples": Range(100),
    "sample.temperature": AT_LEAST_0,
    "sample.top_k": AT_LEAST_0,
    "sample.top_p": Range(0, 1, low_open=True),
    "sample.max_new_tokens": AT_LEAST_1,
    "sample.seed": AT_LEAST_0,
    "sample.prompt_overflow": OneOf(("truncate", "refuse")),
    "checkpoint.every_steps": AT_LEAST_1,
    "checkpoint.max_to_keep": AT_LEAST_1,
    "mesh.data": MESH_SIZE,
    "mesh.fsdp": MESH_SIZE,
    "mesh.tensor": MESH_SIZE,
    "sharding_rules": _sharding_rules,
    BUILD + "job": OneOf(("build",)),
    BUILD + "field_map": _renames,
    BUILD + "clean.unicode_form": OneOf(("NFC", "NFD", "NFKC", "NFKD")),
    BUILD + "clean.pii": _strings,
    BUILD + "filter.length.min_characters": AT_LEAST_0,
    BUILD + "filter.length.max_characters": AT_LEAST_0,
    BUILD + "filter.length.min_words": AT_LEAST_0,
    BUILD + "filter.length.max_words": AT_LEAST_0,
    BUILD + "filter.length.min_tokens": AT_LEAST_0,
    BUILD + "filter.length.max_tokens": AT_LEAST_0,
    BUILD + "filter.gopher.min_words_to_apply": AT_LEAST_0,
    BUILD + "filter.gopher.min_mean_word_length": AT_LEAST_0,
    BUILD + "filter.gopher.max_mean_word_length": AT_LEAST_0,
    BUILD + "filter.gopher.max_symbol_word_ratio": AT_LEAST_0,
    BUILD + "filter.gopher.min_alpha_word_ratio": FRACTION,
    BUILD + "filter.gopher.min_stop_words": AT_LEAST_0,
    BUILD + "filter.gopher.max_duplicate_line_fraction": FRACTION,
    BUILD + "filter.gopher.max_duplicate_line_char_fraction": FRACTION,
    BUILD + "filter.gopher.max_duplicate_paragraph_fraction": FRACTION,
    BUILD + "filter.gopher.max_duplicate_paragraph_char_fraction": FRACTION,
    BUILD + "filter.gopher.max_top_ngram_char_fraction": _ngram_fractions,
    BUILD + "filter.gopher.max_duplicated_ngram_char_fraction": _ngram_fractions,
    BUILD + "filter.language.languages": _strings,
    BUILD + "filter.language.min_confidence": FRACTION,
    BUILD + "filter.language.min_chars": AT_LEAST_0,
    BUILD + "filter.sft.min_response_alnum_chars": AT_LEAST_0,
    BUILD + "filter.sft.refusal_patterns": _regexes,
    BUILD + "decontaminate.eval_files": _strings,
    BUILD + "decontaminate.ngram": AT_LEAST_1,
    BUILD + "decontaminate.min_words": AT_LEAST_1,
    BUILD + "dedup.num_perm": AT_LEAST_1,
    BUILD + "dedup.bands": AT_LEAST_1,
    BUILD + "dedup.rows": AT_LEAST_1,
    BUILD + "dedup.shingle_size": AT_LEAST_1,
    BUILD + "dedup.threshold": FRACTION,
    BUILD + "dedup.seed": AT_LEAST_0,
    BUILD + "annotate.batch_size": AT_LEAST_1,
    BUILD + "annotate.max_new_tokens": AT_LEAST_1,
    BUILD + "annotate.self_instruct.num_instructions": AT_LEAST_0,
    BUILD + "annotate.self_instruct.examples_per_prompt": AT_LEAST_1,
    BUILD + "annotate.self_instruct.seed": AT_LEAST_0,
    BUILD + "annotate.score.min_score": Range(1, 5),
    BUILD + "output.examples_per_reason": AT_LEAST_0,
    BUILD + "num_workers": AT_LEAST_0,
    BUILD + "beam_options": _strings,
}

# Sections of user data (raw field -> field, n-gram size -> fraction): their keys are values, not config keys.
OPEN_SECTIONS = (
    BUILD + "field_map",
    BUILD + "filter.gopher.max_top_ngram_char_fraction",
    BUILD + "filter.gopher.max_duplicated_ngram_char_fraction",
)


def _in_build(paths):
  """The data.build entries of a run-config table, keyed as in a build config."""
  if isinstance(paths, dict):
    return {k[len(BUILD):]: v for k, v in paths.items() if k.startswith(BUILD)}
  return tuple(p[len(BUILD):] for p in paths if p.startswith(BUILD))


def _is_section(value) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _defaults(base: ml_collections.ConfigDict, open_sections, prefix: str = "") -> dict[str, Any]:
  """Dotted path -> default of every leaf (placeholders stay FieldReferences; open sections are leaves)."""
  leaves = {}
  for key, value in base.items(preserve_field_references=True):
    path = prefix + key
    if _is_section(value) and path not in open_sections:
      leaves.update(_defaults(value, open_sections, path + "."))
    else:
      leaves[path] = value
  return leaves


def _values(config, sections: set[str], prefix: str = "") -> dict[str, Any]:
  """Dotted path -> value, descending only into the sections the defaults have (an unknown section is one key)."""
  leaves = {}
  for key, value in config.items():
    path = prefix + str(key)
    if _is_section(value) and path in sections:
      leaves.update(_values(value, sections, path + "."))
    else:
      leaves[path] = value
  return leaves


def _sections(paths) -> set[str]:
  return {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}


def _type_name(kind: type) -> str:
  names = {float: "a number", int: "an integer", bool: "True or False", str: "a string", list: "a list or tuple",
           tuple: "a list or tuple", ml_collections.ConfigDict: "a dict"}
  return names.get(kind, kind.__name__)


def _described(value) -> str:
  return "None" if value is None else f"{type(value).__name__} {value!r}"


def _type_problem(value, default) -> str | None:
  """As ml_collections types a field: by its default (int for float, list for tuple and back); but a
  bool is not an int, and None only fills a placeholder."""
  if isinstance(default, ml_collections.FieldReference):
    if value is None:
      return None
    kind = default.get_type()
  elif default is None:
    return None
  else:
    kind = type(default)
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif kind in (list, tuple):
    ok = isinstance(value, (list, tuple))
  elif issubclass(kind, ml_collections.ConfigDict):
    ok = _is_section(value)
  else:
    ok = isinstance(value, kind)
  return None if ok else f"expected {_type_name(kind)}, got {_described(value)}"


def _key_problems(defaults: dict[str, Any], values: dict[str, Any], sections: set[str]) -> list[str]:
  problems = []
  valid = sorted(set(defaults) | sections)
  for path in values:
    if path in sections:  # a value where a section belongs
      problems.append(f"{path}: expected a section, got {_described(values[path])}")
    elif path not in defaults:
      near = difflib.get_close_matches(path, valid, n=1)
      problems.append(f"{path}: no such key" + (f"; did you mean {near[0]}?" if near else ""))
  replaced = [p for p in values if p in sections]
  problems += [f"{p}: missing" for p in defaults if p not in values and not any(p.startswith(r + ".") for r in replaced)]
  return problems


def _some_steps(v: dict[str, Any]) -> str | None:
  if v["job"] == "eval" or v["train.pretrain_steps"] + v["train.sft_steps"] >= 1:
    return None
  return "train.pretrain_steps + train.sft_steps: at least one step to train, got 0"


def _one_mesh_remainder(v: dict[str, Any]) -> str | None:
  sizes = [v[f"mesh.{axis}"] for axis in ("data", "fsdp", "tensor")]
  if sizes.count(-1) > 1:
    return f"mesh: at most one size is -1 (the devices left over), got data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}"
  return None


def _data_dir_named(v: dict[str, Any]) -> str | None:
  if v["job"] == "eval" and v["eval.files"]:  # the eval job reads its files instead
    return None
  return "data.dir: the folder of a data build, needed with data.source 'dir'" if v["data.source"] == "dir" and not v["data.dir"] else None


def _data_dir_used(v: dict[str, Any]) -> str | None:
  # A folder named but not read would train on the rebuilt default data without a word.
  if v["data.source"] == "dir" or not v["data.dir"] or (v["job"] == "eval" and v["eval.files"]):
    return None
  return (f"data.dir={v['data.dir']!r} is only read with data.source 'dir', and data.source is {v['data.source']!r} "
          "(the data would be built from data.build instead): set data.source='dir', or leave data.dir empty")


def _eval_model_named(v: dict[str, Any]) -> str | None:
  if v["job"] != "eval" or v["eval.model_workdir"] or v["model.checkpoint"]:
    return None
  return "the eval job needs a model: eval.model_workdir (a training workdir) or model.checkpoint (a Hugging Face folder)"


def _llama3_factors(v: dict[str, Any]) -> str | None:
  # Llama 3 frequency scaling divides by their difference.
  if v["model.rope_type"] == "llama3" and v["model.rope_high_freq_factor"] <= v["model.rope_low_freq_factor"]:
    return "model.rope_high_freq_factor must be greater than model.rope_low_freq_factor with rope_type 'llama3'"
  return None


def _micro_batches_divide(v: dict[str, Any]) -> str | None:
  if v["train.batch_size"] % v["train.grad_accum_steps"]:
    return f"train.grad_accum_steps ({v['train.grad_accum_steps']}) must divide train.batch_size ({v['train.batch_size']})"
  return None


def _pmap_data_parallel(v: dict[str, Any]) -> str | None:
  if v["train.parallelism"] != "pmap" or (v["mesh.fsdp"], v["mesh.tensor"]) == (1, 1):
    return None
  return (f"train.parallelism 'pmap' is data parallel only (a whole copy of the state on every device): it needs "
          f"mesh.fsdp = mesh.tensor = 1, got fsdp={v['mesh.fsdp']}, tensor={v['mesh.tensor']} (use 'jit' to shard the model)")


def _splash_blocks(v: dict[str, Any]) -> str | None:
  if v["model.attention"] == "splash" and v["train.seq_len"] % 128:
    return f"model.attention 'splash' runs in blocks of 128 tokens: train.seq_len must be a multiple of 128, got {v['train.seq_len']}"
  return None


# Values that are each valid but cannot work together: (the keys read, the check), run only when those keys are valid.
CROSS_CHECKS = (
    (("job", "train.pretrain_steps", "train.sft_steps"), _some_steps),
    (("mesh.data", "mesh.fsdp", "mesh.tensor"), _one_mesh_remainder),
    (("train.batch_size", "train.grad_accum_steps"), _micro_batches_divide),
    (("train.parallelism", "mesh.fsdp", "mesh.tensor"), _pmap_data_parallel),
    (("job", "eval.files", "data.source", "data.dir"), _data_dir_named),
    (("job", "eval.files", "data.source", "data.dir"), _data_dir_used),
    (("job", "eval.model_workdir", "model.checkpoint"), _eval_model_named),
    (("model.rope_type", "model.rope_low_freq_factor", "model.rope_high_freq_factor"), _llama3_factors),
    (("model.attention", "train.seq_len"), _splash_blocks),
)


def _under(path: str, section: str) -> bool:
  return path == section or path.startswith(section + ".")


def _model_problem(model: ml_collections.ConfigDict) -> str | None:
  """ModelConfig's own checks (vocab_size is tokenizer.vocab_size, checked apart)."""
  fields = {k: v for k, v in model.items() if k != "checkpoint"}
  try:
    ModelConfig(**fields)
  except ConfigError as err:
    return str(err)
  return None


def _build_problem(build: ml_collections.ConfigDict, prefix: str, known: set[str]) -> str | None:
  """The data builder's own checks (`params_of`); a message that starts with a key gets the key's full
  path (`prefix`: where the build config sits), any other one the section's name."""
  try:
    params_of(build)
  except ConfigError as err:
    message = str(err)
    head = re.match(r"[\w.]+", message)
    if not prefix or (head and prefix + head.group() in known):
      return prefix + message
    return f"{prefix[:-1]}: {message}"
  return None


def config_problems(config) -> list[str]:
  """Every problem `check_config` would report, in order: keys, then each value, then values together."""
  build_job = config.get("job") == "build"
  base = build_config() if build_job else base_config()
  constraints = _in_build(CONSTRAINTS) if build_job else CONSTRAINTS
  defaults = _defaults(base, _in_build(OPEN_SECTIONS) if build_job else OPEN_SECTIONS)
  sections = _sections(defaults)
  values = _values(config, sections)
  problems = _key_problems(defaults, values, sections)
  bad = {p for p in values if p not in defaults}
  for path in (p for p in defaults if p in values):
    problem = _type_problem(values[path], defaults[path])
    if problem is None and path in constraints and values[path] is not None:
      problem = constraints[path](values[path])
    if problem is not None:
      problems.append(f"{path}: {problem}")
      bad.add(path)
  bad |= {p for p in defaults if p not in values}
  if build_job:
    if not bad:
      problems.append(_build_problem(config, "", set()))
    return [p for p in problems if p]
  problems += [check(values) for keys, check in CROSS_CHECKS if not bad & set(keys)]
  if not any(_under(p, "model") for p in bad):
    problems.append(_model_problem(config.model))
  if values.get("data.source") == "build" and not any(_under(p, BUILD[:-1]) for p in bad):
    problems.append(_build_problem(config.data.build, BUILD, set(defaults) | sections))
  return [p for p in problems if p]


def check_config(config) -> None:
  """Raises ConfigError listing every problem of a run config (job "train", against base_config()) or a
  build config (job "build", against build_config()): keys the defaults lack (with the nearest valid key)
  or have and the config lacks, values of another type than the default's, values outside CONSTRAINTS,
  and values that cannot work together. Cheap and touches no data: the launcher and the jobs call it first."""
  problems = config_problems(config)
  if len(problems) == 1:
    raise ConfigError(problems[0])
  if problems:
    raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))
