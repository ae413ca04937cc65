"""Runs one experiment: a config file, a workdir, and overrides on the command line.

  python launch.py --config=configs/quickstart.py --workdir=/tmp/sft-quickstart --config.train.sft_steps=50
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import sft

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where data, tokenizer, checkpoints and metrics go (a build config: the dataset).")
_GENERATE = flags.DEFINE_multi_string(
    "generate", [], "Answer these prompts with the workdir's latest checkpoint (config.sample) instead of training."
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:  # the locked config has no such key
    overrides = [a for a in argv if a.startswith("--config.")]
    key = str(err).strip("\"'")
    sys.exit(f"FATAL unknown config key '{key}' in {' '.join(overrides)}; the keys and their meaning are in sft/config.py")
  except flags.Error as err:
    sys.exit(f"FATAL flags: {err}\nPass --helpfull to see the flags.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (checkpoint I/O) off; --verbosity=0 brings it back
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    if _CONFIG.value.get("job") == "build":
      sft.build_dataset(_CONFIG.value, _WORKDIR.value)
    elif _GENERATE.value:
      for prompt, answer in zip(_GENERATE.value, sft.respond(_CONFIG.value, _WORKDIR.value, _GENERATE.value)):
        print(f"> {prompt}\n{answer}\n")
    else:
      sft.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except sft.ConfigError as err:
    sys.exit(f"FATAL {err}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
