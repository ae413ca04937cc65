"""The `sft` command (and launch.py): a config, a workdir, and overrides on the command line.

  sft --config=quickstart --workdir=/tmp/sft-quickstart --config.train.sft_steps=50
  sft --config=finetune:lora --workdir=/tmp/sft-lora --config.model.checkpoint=/path/to/hf_model
  python launch.py --config=configs/quickstart.py --workdir=/tmp/sft-quickstart
  sft inspect --config=quickstart --workdir=/tmp/sft-quickstart --rows=4   # the first packed rows, trained tokens marked
  sft serve --config=serve --workdir=/tmp/sft-quickstart                   # OpenAI's API on http://127.0.0.1:8000/v1

--config is a config file given as a path (it holds a separator or ends in .py; `path[:argument]`) or the
name of one in the project's `configs` package (never a file of the current directory).
Only flags are defined at import; JAX and the trainer load when a job runs, so --helpfull is quick.
"""

import ast
import os
import pathlib
import re
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
_ROWS = flags.DEFINE_integer("rows", 8, "sft inspect: how many packed training rows to render.")
_OUT = flags.DEFINE_string("out", None, "sft inspect: write the rows as an HTML page to this file.")
_TAKEOVER_LOCK = flags.DEFINE_bool(
    "takeover_lock", False,
    "Take over the workdir's run.lock even though another host wrote it (a preempted run requeued under a new "
    "hostname). Only when that host's run is gone: two runs in one workdir corrupt it.",
)
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the config as the file and the overrides resolve it (no --workdir needed), and exit."
)
flags.mark_flags_as_required(["config"])
_HELP = ("--help", "-help", "-h", "--helpshort", "-helpshort")
_OWN_FLAGS = ("config", "workdir", "generate", "rows", "out", "takeover_lock", "print_config", "distributed")


def _configs_dir() -> pathlib.Path:
  # The configs package installed beside this `sft` (the checkout's, or site-packages'), never one that
  # the current directory happens to hold: a name must not run whatever file sits where the user stands.
  return pathlib.Path(__file__).resolve().parent.parent / "configs"


def _is_path(value: str) -> bool:
  return os.sep in value or (os.altsep is not None and os.altsep in value) or value.endswith(".py")


def _summary(path: pathlib.Path) -> str:
  """A config file's one-line description: the first line after its docstring's command."""
  try:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  except (OSError, SyntaxError, ValueError):
    return ""
  paragraphs = [p for p in doc.split("\n\n") if p.strip()]
  text = paragraphs[1] if len(paragraphs) > 1 else (paragraphs[0] if paragraphs else "")
  sentence = " ".join(text.split()).split(". ")[0].rstrip(".")
  return sentence if len(sentence) <= 100 else sentence[:99] + "…"


def usage() -> str:
  """What `sft --help` prints: how to run, the configs, how to see one, the flags."""
  folder = _configs_dir()
  configs = sorted(f for f in folder.glob("*.py") if not f.name.startswith("_")) if folder.is_dir() else []
  lines = [__doc__.strip(), "", f"Configs ({folder}):"]
  lines += [f"  {f.stem:<12} {_summary(f)}" for f in configs]
  lines += [
      "",
      "A config's keys and values, as the file and any overrides resolve them:",
      "  sft --config=quickstart --print_config [--config.train.lr=1e-3 ...]",
      "",
      "Flags:",
      *[f"  --{name}: {flags.FLAGS[name].help}" for name in _OWN_FLAGS],
      "  --helpfull: every flag, absl's and JAX's included",
  ]
  return "\n".join(lines)


def resolve_config(value):
  """`quickstart` or `finetune:lora` -> that file of the project's configs package; a path (it holds a
  separator or ends in .py: `./mine.py`, `configs/quickstart.py:arg`) stays as it is and must exist."""
  path, sep, arg = value.partition(":")
  if _is_path(path):
    if not os.path.isfile(path):  # config_flags would defer this error to a traceback on first use
      sys.exit(f"FATAL --config={value}: no such file")
    return value
  folder = _configs_dir()
  candidate = folder / f"{path}.py"
  if path and not path.startswith("_") and candidate.is_file():
    return f"{candidate}{sep}{arg}"
  names = sorted(f.stem for f in folder.glob("*.py") if not f.name.startswith("_")) if folder.is_dir() else []
  sys.exit(
      f"FATAL --config={value}: no config named {path!r} in {folder} ({', '.join(names)}); "
      f"a file of your own is given as a path (./{path}.py)"
  )


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
  if any(a in _HELP for a in argv[1:]):
    print(usage())
    sys.exit(0)
  if any(a in ("--helpfull", "-helpfull") for a in argv[1:]):
    print(flags.FLAGS.get_help())
    sys.exit(0)
  argv = _resolve_config_args(argv)
  try:
    remaining = flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:
    sys.exit(f"FATAL {_load_error(err, argv)}")
  except flags.Error as err:
    from sft.errors import ConfigError  # noqa: PLC0415

    cause = _innermost(err, ConfigError)  # get_config refused its argument: its message, not the loader's traceback
    if cause is not None:
      sys.exit(f"FATAL {cause}")
    sys.exit(f"FATAL flags: {err}\nPass --helpfull to see the flags.")
  if _PRINT_CONFIG.value:  # a job checks its config itself, before any work
    _check(_CONFIG.value)
    print(_CONFIG.value.to_yaml() if hasattr(_CONFIG.value, "to_yaml") else _CONFIG.value, end="")
    sys.exit(0)
  if not _WORKDIR.value:
    sys.exit("FATAL --workdir is required: where the data, tokenizer, checkpoints and metrics go (a build: the dataset)")
  return remaining


def _overrides(argv) -> list[tuple[str, str]]:
  """(dotted key, argument) of each config key set on the command line: `--config.train.lr=1e-4` -> "train.lr"."""
  found = []
  for arg in argv:
    match = re.match(r"--?config\.([\w.]+)(=|$)", arg)
    if match:
      found.append((match.group(1), arg))
  return found


def override_keys(argv) -> list[str]:
  return [key for key, _ in _overrides(argv)]


def _load_error(err, argv) -> str:
  """One line for what ml_collections raises while loading: a config file without get_config, or an
  override naming no key of the locked config (its KeyError text holds the key and a suggestion)."""
  raised = err
  while err.args and isinstance(err.args[0], BaseException):  # AttributeError(KeyError(text))
    err = err.args[0]
  text = str(err.args[0]) if err.args else str(err)
  config_arg = next((a.partition("=")[2] for a in argv if a.startswith(("--config=", "-config="))), "")
  if not config_arg:  # the two-word form, `--config path.py`
    config_arg = next((b for a, b in zip(argv, argv[1:]) if a in ("--config", "-config")), "")
  if "has no attribute 'get_config'" in text:
    return f"--config={config_arg}: the file defines no get_config() (a config file returns its ConfigDict from get_config)"
  key = text.splitlines()[0].strip("\"' ") if text else "?"
  near = re.search(r'Did you mean "([^"]+)"', text)
  locked = re.match(r'Key "(\w+)" does not exist and cannot be added since the config is locked', key)
  where = _config_file_line(raised, config_arg.partition(":")[0]) if locked else None
  if where:  # a config file set a key the defaults lack: that line, the key's full path, the one meant
    line_no, source = where
    assigned = re.search(r"\w+((?:\.\w+)+)\s*=", source)
    dotted = assigned.group(1)[1:] if assigned and assigned.group(1).endswith("." + locked.group(1)) else locked.group(1)
    parent = dotted.rpartition(".")[0]
    hint = f"; did you mean {parent + '.' if parent else ''}{near.group(1)}?" if near else ""
    return f"{config_arg.partition(':')[0]}:{line_no}: {dotted}: no such key{hint} ({source.strip()})"
  for dotted, arg in _overrides(argv):
    parts = dotted.split(".")
    if key in parts:
      parent = ".".join(parts[: parts.index(key)])
      full = f"{parent}.{key}" if parent else key
      hint = f"; did you mean {parent + '.' if parent else ''}{near.group(1)}?" if near else ""
      return f"{full}: no such key{hint} (in {arg}; the keys are in sft/config.py, model keys in sft/model/config.py)"
  return f"the config could not be loaded: {key}"


def _config_file_line(err: BaseException, path: str) -> tuple[int, str] | None:
  """(line number, source) of the last frame in the config file `path` where `err` (or its causes) passed."""
  import linecache  # noqa: PLC0415
  import traceback  # noqa: PLC0415

  target = os.path.realpath(path) if path else None
  while err is not None and target:
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
      if os.path.realpath(frame.filename) == target:
        return frame.lineno, frame.line or linecache.getline(frame.filename, frame.lineno)
    err = err.__cause__ or err.__context__
  return None


def _check(config):
  """Every key of the config, as the file and the overrides left it, before any job starts."""
  from sft.config_check import check_config  # noqa: PLC0415  (loads JAX: not needed for --help)
  from sft.errors import ConfigError  # noqa: PLC0415

  try:
    if config.get("job") == "audit":  # an audit's keys are its own (sft/audit/config.py)
      from sft.audit.config import check_audit_config  # noqa: PLC0415

      check_audit_config(config)
    elif config.get("job") == "serve":  # so are a server's (sft/serve/config.py)
      from sft.serve.config import check_serve_config  # noqa: PLC0415

      check_serve_config(config)
    else:
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
  """The absl main: build, audit, evaluate, serve, generate or train with the parsed flags."""
  from sft import audit, jobs  # noqa: PLC0415  (JAX comes with it: not needed for --help)
  from sft.errors import ConfigError, RunStopped  # noqa: PLC0415

  command = argv[1:]
  if command not in ([], ["inspect"], ["serve"]):
    raise app.UsageError(f"unexpected arguments: {command} (the commands are `sft inspect` and `sft serve`)")
  serving = _CONFIG.value.get("job") == "serve"
  if command == ["serve"] and not serving:
    sys.exit(f"FATAL `sft serve` takes a serve config (--config=serve), not one with job={_CONFIG.value.get('job')!r}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (checkpoint I/O) off; --verbosity=0 brings it back
  if _DISTRIBUTED.value:
    import jax  # noqa: PLC0415

    jax.distributed.initialize()
  try:
    if command == ["inspect"]:  # what the train job's first rows look like, the trained tokens marked
      print(jobs.inspect_training_rows(_CONFIG.value, _WORKDIR.value, rows=_ROWS.value, out=_OUT.value).text)
    elif _CONFIG.value.get("job") == "build":
      jobs.build_dataset(_CONFIG.value, _WORKDIR.value)
    elif _CONFIG.value.get("job") == "eval":
      jobs.evaluate_model(_CONFIG.value, _WORKDIR.value, takeover_lock=_TAKEOVER_LOCK.value)
    elif _CONFIG.value.get("job") == "audit":
      audit.run(_CONFIG.value, _WORKDIR.value)
    elif serving:
      from sft import serve  # noqa: PLC0415

      serve.run(_CONFIG.value, _WORKDIR.value)
    elif _GENERATE.value:
      # The model is built from the workdir's config.json; keys given here that would change it are refused.
      answers = jobs.respond(_CONFIG.value, _WORKDIR.value, _GENERATE.value, given_keys=set(override_keys(sys.argv)))
      for prompt, answer in zip(_GENERATE.value, answers):
        print(f"> {prompt}\n{answer}\n")
    else:
      jobs.train_and_evaluate(_CONFIG.value, _WORKDIR.value, takeover_lock=_TAKEOVER_LOCK.value)
  except ConfigError as err:
    sys.exit(f"FATAL {err}")
  except RunStopped as stopped:  # a checkpoint was saved and the log says so; the exit code names the signal
    sys.exit(stopped.exit_code)


def main():
  """Console entry point `sft`."""
  app.run(run, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
