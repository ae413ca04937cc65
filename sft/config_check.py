"""`check_config(config)`: every key of a run or build config checked before any work is done.

A config file's get_config() may build its ConfigDict by hand, and a notebook may hand over any dict:
check_config compares a config with the defaults it was made from (keys and types, from the sections of
sft/config.py and sft/databuilder/config.py), checks each value with its field's check and the keys that
only work together with the RULES there, and reports every problem at once, each naming its key.
"""

from __future__ import annotations

import ml_collections

from sft import config as run_keys
from sft.config import base_config
from sft.config_keys import open_sections, problems_against, raise_problems, rule_problems
from sft.databuilder import config as build_keys
from sft.errors import ConfigError
from sft.model.config import ModelConfig

BUILD = "data.build."  # where a run config holds the config of its data build

# Dotted key -> its check, as its field declares it (the model section is ModelConfig's to check).
CONSTRAINTS = run_keys.CHECKS
# Sections of user data (raw field -> field, n-gram size -> fraction): their keys are values, not config keys.
OPEN_SECTIONS = open_sections(run_keys.Run)


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


def config_problems(config) -> list[str]:
  """Every problem `check_config` would report, in order: keys, then each value, then values together."""
  if config.get("job") == "build":
    return build_keys.build_problems(config)
  problems, values, bad = problems_against(config, base_config(), run_keys.Run)
  problems += rule_problems(run_keys.RULES, values, bad)
  if not any(_under(p, "model") for p in bad):
    problems.append(_model_problem(config.model))
  if values.get("data.source") == "build":
    problems += rule_problems(build_keys.RULES, values, bad, BUILD)
  return [p for p in problems if p]


def check_config(config) -> None:
  """Raises ConfigError listing every problem of a run config (job "train", against base_config()) or a
  build config (job "build", against build_config()): keys the defaults lack (with the nearest valid key)
  or have and the config lacks, values of another type than the default's, values their field's check
  refuses, and values that cannot work together. Cheap and touches no data: each job calls it first."""
  raise_problems(config_problems(config))
