"""configs/build.py builds the user's own folder: its command line builds a few raw records into a dataset
that accounts for each of them, it names no file of the repository (no example's evaluation set to
decontaminate against), and without input_dir the command stops before any work with one line naming the key."""

import json
import pathlib
import shlex
import subprocess
import sys

from configs import build, build_mix
from sft.databuilder import load_manifest

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHATS = [
    ("What does the shutil module provide for copying files?",
     "It offers functions such as copyfile and copytree that copy files and whole folders."),
    ("How do I read a CSV file with the standard library?",
     "Open the file and pass it to csv.reader, which yields each row as a list of strings."),
    ("What is a dictionary in Python used for?",
     "A dictionary maps keys to values, so you can look a value up quickly by its key."),
    ("Why would I use a tuple instead of a list?",
     "A tuple cannot be changed after it is made, which makes it safe to use as a dictionary key."),
]


def documented_command(workdir, input_dir=None) -> list[str]:
  """The docstring's command line, run by this interpreter with these folders (no input_dir: the flag left out)."""
  args = shlex.split(build.__doc__.splitlines()[0])
  assert args[:3] == ["python", "launch.py", "--config=configs/build.py"], args
  values = {"--workdir": workdir, "--config.input_dir": input_dir}
  out = [sys.executable, *args[1:3]]
  for arg in args[3:]:
    flag = arg.partition("=")[0]
    assert flag in values, f"the docstring's command has {arg}, which this test does not know"
    if values[flag] is not None:
      out.append(f"{flag}={values[flag]}")
  return out


def strings_of(config):
  for value in config.values():
    if hasattr(value, "values"):
      yield from strings_of(value)
    elif isinstance(value, str):
      yield value
    elif isinstance(value, (tuple, list)):
      yield from (v for v in value if isinstance(v, str))


def test_the_generic_build_names_no_file_of_the_repository():
  config = build.get_config()
  assert config.input_dir == "" and tuple(config.decontaminate.eval_files) == ()
  assert not [s for s in strings_of(config) if str(ROOT) in s or "experiments" in s]
  # The example does decontaminate against its own benchmark: that is why it is not the generic config.
  assert [f for f in build_mix.get_config().decontaminate.eval_files if "experiments" in f]


def test_the_documented_command_builds_a_folder_of_raw_records(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) for q, a in CHATS]
  (raw / "chats.jsonl").write_text("\n".join([*lines, '{"messages": [cut off']) + "\n")
  out = tmp_path / "data"
  result = subprocess.run(documented_command(out, raw), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "read 5, kept 4, dropped 1" in result.stdout, result.stdout[-2000:]
  source = load_manifest(out)["accounting"]["by_source"]["chats.jsonl"]
  assert sum(source["kept_by_split"].values()) == 4 and source["dropped_by_reason"] == {"read: bad json": 1}
  kept = [json.loads(line) for p in out.glob("*.jsonl") if not p.name.startswith("rejected") for line in p.read_text().splitlines()]
  assert sorted(r["messages"][-1]["content"] for r in kept) == sorted(a for _, a in CHATS)


def test_without_input_dir_the_build_stops_with_one_line_naming_the_key(tmp_path):
  out = tmp_path / "data"
  result = subprocess.run(documented_command(out), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("FATAL ") and "input_dir" in lines[0], result.stderr[-2000:]
  assert not out.exists()  # refused before any work


def test_a_seed_too_large_for_jax_is_a_config_error_in_every_config():
  import pytest

  from sft.audit.config import audit_config, check_audit_config
  from sft.config import base_config
  from sft.config_check import check_config
  from sft.databuilder.config import build_config, check_build_config
  from sft.errors import ConfigError

  run = base_config()
  run.seed = 2**64  # jax.random.key would raise OverflowError
  with pytest.raises(ConfigError, match=r"^seed: "):
    check_config(run)
  data = build_config()
  data.input_dir, data.annotate.seed = "/raw", 2**63
  with pytest.raises(ConfigError, match=r"annotate\.seed"):
    check_build_config(data)
  audit = audit_config()
  audit.build_dir, audit.seed = "/build", -1
  with pytest.raises(ConfigError, match=r"seed"):
    check_audit_config(audit)
