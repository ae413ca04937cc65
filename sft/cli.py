"""The `sft` command (and launch.py): a config, a workdir, and overrides on the command line.

  sft --config=quickstart --workdir=/tmp/sft-quickstart --config.train.sft_steps=50
  sft --config=finetune:lora --workdir=/tmp/sft-lora --config.model.checkpoint=/path/to/hf_model
  sft --config=eval --workdir=/tmp/sft-eval --config.eval.model_workdir=/tmp/sft-quickstart --config.data.dir=/tmp/sft-quickstart/data
  python launch.py --config=configs/quickstart.py --workdir=/tmp/sft-quickstart

--config is a config file (path[:argument]) or the name of one in the `configs` package.
Only flags are defined at import; JAX and the trainer load when a job runs, so --helpfull is quick.
"""

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a file (configs/*.py[:arg]) or a name in configs/ (quickstart, finetune:lora).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where data, tokenizer, checkpoints and metrics go (a build config: the dataset)."
)
_GENERATE = flags.DEFINE_multi_string(
    "generate", [], "Answer these prompts with the workdir's latest checkpoint (config.sample) instead of training."
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
flags.mark_flags_as_required(["config", "workdir"])


def _configs_dir():
  # find_spec reads where the package lives without executing it: the checkout's configs/ beside launch.py,
  # or the installed one.
  spec = importlib.util.find_spec("configs")
  return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def resolve_config(value):
  """`quickstart` or `finetune:lora` -> the file in the configs package; an existing path stays as it is."""
  path, sep, arg = value.partition(":")
  if os.path.isfile(path):
    return value
  if os.sep in path or path.endswith(".py"):  # config_flags would defer this error to a traceback on first use
    sys.exit(f"FATAL --config={value}: no such file")
  folder = _configs_dir()
  candidate = os.path.join(folder, f"{path}.py") if folder else None
  if candidate and os.path.isfile(candidate):
    return candidate + sep + arg
  names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py") if folder else []
  sys.exit(f"FATAL --config={value}: no such file, and no config named {path!r} in configs/ ({', '.join(names)})")


def _resolve_config_args(argv):
  argv = list(argv)
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      flag, _, value = a.partition("=")
      argv[i] = f"{flag}={resolve_config(value)}"
    elif a in ("--config", "-config") and i + 1 < len(argv):
      argv[i + 1] = resolve_config(argv[i + 1])
  return argv


def parse_flags(argv):
  argv = _resolve_config_args(argv)
  try:
    remaining = flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:  # the locked config has no such key
    overrides = [a for a in argv if a.startswith("--config.")]
    key = str(err).strip("\"'")
    sys.exit(
        f"FATAL unknown config key '{key}' in {' '.join(overrides)}; the keys and their meaning are in sft/config.py (model keys: sft/model/config.py)"
    )
  except flags.Error as err:
    from sft.errors import ConfigError  # noqa: PLC0415

    cause = _innermost(err, ConfigError)  # get_config refused its argument: its message, not the loader's traceback
    if cause is not None:
      sys.exit(f"FATAL {cause}")
    sys.exit(f"FATAL flags: {err}\nPass --helpfull to see the flags.")
  _check(_CONFIG.value)
  return remaining


def _check(config):
  """Every key of the config, as the file and the overrides left it, before any job starts."""
  from sft.config_check import check_config  # noqa: PLC0415  (loads JAX: not needed for --help)
  from sft.errors import ConfigError  # noqa: PLC0415

  try:
    check_config(config)
  except ConfigError as err:
    sys.exit(f"FATAL {err}")


def _innermost(err, kind):
  found = None
  while err is not None:
    found = err if isinstance(err, kind) else found
    err = err.__cause__ or err.__context__
  return found


def run(argv):
  """The absl main: build, generate or train with the parsed flags."""
  from sft import jobs  # noqa: PLC0415  (JAX comes with it: not needed for --help)
  from sft.errors import ConfigError, RunStopped  # noqa: PLC0415

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (checkpoint I/O) off; --verbosity=0 brings it back
  if _DISTRIBUTED.value:
    import jax  # noqa: PLC0415

    jax.distributed.initialize()
  try:
    if _CONFIG.value.get("job") == "build":
      jobs.build_dataset(_CONFIG.value, _WORKDIR.value)
    elif _CONFIG.value.get("job") == "eval":
      jobs.evaluate_model(_CONFIG.value, _WORKDIR.value)
    elif _GENERATE.value:
      for prompt, answer in zip(_GENERATE.value, jobs.respond(_CONFIG.value, _WORKDIR.value, _GENERATE.value)):
        print(f"> {prompt}\n{answer}\n")
    else:
      jobs.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as err:
    sys.exit(f"FATAL {err}")
  except RunStopped as stopped:  # a checkpoint was saved and the log says so; the exit code names the signal
    sys.exit(stopped.exit_code)


def main():
  """Console entry point `sft`."""
  app.run(run, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
