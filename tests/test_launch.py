"""launch.py and the `sft` command end to end on a shrunken quickstart: runs, resumes, rejects bad keys."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.tokenizer.vocab_size=512",
    "--config.model.d_model=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16",
    "--config.model.mlp_dim=64",
    "--config.train.seq_len=64",
    "--config.train.batch_size=4",
    "--config.train.pretrain_steps=2",
    "--config.train.log_every=2",
    "--config.eval.every_steps=4",
    "--config.eval.batch_size=8",
    "--config.eval.num_generations=4",
    "--config.eval.max_new_tokens=4",
    "--config.checkpoint.every_steps=2",
    "--config.data.build.output.validation_fraction=0.01",
]


def launch(workdir, *overrides):
  cmd = [sys.executable, "launch.py", "--config=configs/quickstart.py", f"--workdir={workdir}", *TINY, *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quickstart_runs_then_resumes(tmp_path):
  first = launch(tmp_path, "--config.train.sft_steps=4")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "parameters" in first.stdout and "mesh" in first.stdout and "done in" in first.stdout
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 2, 4, 6]
  assert rows[1]["phase"] == "pretrain" and rows[2]["phase"] == "sft"
  assert all(k in rows[-1] for k in ("train/loss", "train/tokens_per_s", "train/tflops_per_device", "eval/loss", "eval/exact_match"))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
  for name in ("tokenizer.model", "config.json", "data/manifest.json", "data/report.md", "data/train-00000-of-00001.array_record", "data/validation-00000-of-00001.array_record"):
    assert (tmp_path / name).exists(), name
  assert "data builder: read" in first.stdout
  assert (tmp_path / "curves.png").exists() and any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert "## Per task" in (tmp_path / "eval" / "report.md").read_text() and (tmp_path / "eval" / "results.json").exists()
  compared = (tmp_path / "eval" / "compare.md").read_text()  # eval.compare_pretrained: the run against its step 2
  assert "at step 2 (the end of pretraining)" in compared and "/checkpoints/6 (after SFT)" in compared
  study = tmp_path / "study"  # a study's results.md, as experiments/ records them
  wrote = subprocess.run(
      [sys.executable, "experiments/write_results.py", f"--workdir={tmp_path}", f"--study={study}", "--title=T", "--command=c"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert wrote.returncode == 0, wrote.stderr[-3000:]
  assert "## Per task at the end" in (study / "results.md").read_text() and (study / "curves.png").exists()

  second = launch(tmp_path, "--config.train.sft_steps=6")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed" in second.stdout and "at step 6" in second.stdout
  assert "tokenizer: loaded" in second.stdout
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
  assert not (tmp_path / "eval" / "compare.md").exists()  # of the first run's final model: removed, not left stale

  answered = launch(tmp_path, "--generate=What does `json.dumps` do?", "--generate=Hi", "--config.sample.max_new_tokens=5")
  assert answered.returncode == 0, answered.stderr[-3000:]
  assert answered.stdout.count("> ") == 2 and "> What does `json.dumps` do?" in answered.stdout
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "8"]  # untouched

  # `inspect`: the first packed rows of the same workdir, the trained tokens marked; nothing trained or written there.
  page = tmp_path.parent / "rows.html"
  inspected = subprocess.run(
      [sys.executable, "launch.py", "inspect", "--config=configs/quickstart.py", f"--workdir={tmp_path}", *TINY, "--rows=2", f"--out={page}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert inspected.returncode == 0, inspected.stderr[-3000:]
  assert "tokens trained" in inspected.stdout and "<span" in page.read_text()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "8"]
  unknown = subprocess.run([sys.executable, "launch.py", "inspekt", "--config=configs/quickstart.py", f"--workdir={tmp_path}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert unknown.returncode != 0 and "the commands are `sft inspect` and `sft serve`" in unknown.stderr


  # The eval job on the trained workdir: eval files of two tasks, one line that is no record.
  evalset = tmp_path / "evalset.jsonl"
  evalset.write_text(
      json.dumps({"text": "Serialize obj to JSON.", "label": "json", "labels": ["json", "shlex"]}) + "\n"
      + json.dumps({"text": "Return a ____ of the string.", "answer": "copy", "choices": ["copy", "json"]}) + "\n"
      + "{not json\n"
  )
  cmd = [sys.executable, "launch.py", "--config=configs/eval.py", f"--workdir={tmp_path / 'ev'}", f"--config.eval.model_workdir={tmp_path}"]
  evaluated = subprocess.run([*cmd, f"--config.eval.files=('{evalset}',)"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "2 chats; 1 rejected" in evaluated.stdout and "eval: report in" in evaluated.stdout
  results = json.loads((tmp_path / "ev" / "eval" / "results.json").read_text())
  assert set(results["tasks"]) == {"classification", "cloze"} and results["metrics"]["eval/cloze/choice_items"] == 1
  assert (tmp_path / "ev" / "eval" / "confusion-classification.png").exists()
  on_split = subprocess.run([*cmd, f"--config.data.dir={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert on_split.returncode == 0, on_split.stderr[-3000:]
  assert "the validation split of" in (tmp_path / "ev" / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_an_eval_job_without_a_model_or_checkpoint_fails_clearly(tmp_path):
  cmd = [sys.executable, "launch.py", "--config=configs/eval.py", f"--workdir={tmp_path}", "--config.data.dir=/nowhere"]
  no_model = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert no_model.returncode != 0 and "the eval job needs a model" in no_model.stderr
  untrained = subprocess.run([*cmd, f"--config.eval.model_workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert untrained.returncode != 0 and "has no config.json" in untrained.stderr


def test_generate_without_a_checkpoint_is_a_clear_error(tmp_path):
  result = launch(tmp_path, "--generate=Hi")
  assert result.returncode != 0
  assert "no tokenizer.model" in result.stderr and "Traceback" not in result.stderr


def test_mistyped_config_key_fails_clearly(tmp_path):
  result = launch(tmp_path, "--config.train.stpes=5")
  assert result.returncode != 0
  assert "stpes" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_config_file_and_value_problems_fail_before_any_work(tmp_path):
  # A typo in a config file fails on its line: the defaults are locked, and the key meant is named.
  config_file = tmp_path / "typo.py"
  config_file.write_text("from configs import quickstart\n\n\ndef get_config():\n  c = quickstart.get_config()\n  c.train.sft_stpes = 5\n  return c\n")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "launch.py", f"--workdir={workdir}"]
  typo = subprocess.run([*cmd, f"--config={config_file}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert typo.returncode != 0
  assert f"FATAL {config_file}:6: train.sft_stpes: no such key; did you mean train.sft_steps?" in typo.stderr, typo.stderr[-2000:]
  assert "Traceback" not in typo.stderr
  # A zero interval divided by zero only after the data build: now every such value fails at once, in seconds.
  zero = [*cmd, "--config=configs/quickstart.py", "--config.train.log_every=0", "--config.eval.every_steps=0"]
  result = subprocess.run(zero, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode != 0
  assert "FATAL 2 problems in the config:" in result.stderr, result.stderr[-2000:]
  assert "train.log_every: must be >= 1, got 0" in result.stderr and "eval.every_steps: must be >= 1, got 0" in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()  # no data built, nothing written


@pytest.mark.slow
def test_build_config_runs_the_data_builder(tmp_path):
  cmd = [sys.executable, "launch.py", "--config=configs/build_mix.py", f"--workdir={tmp_path}"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "read 38, kept 20, dropped 18" in result.stdout
  bad = subprocess.run([*cmd, "--config.input_dir=/no/such/folder"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "is not a folder" in bad.stderr and "Traceback" not in bad.stderr


def test_wrong_type_fails_clearly(tmp_path):
  result = launch(tmp_path, "--config.train.batch_size=four")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "FATAL flags: flag --config.train.batch_size=four: invalid literal for int()" in result.stderr, result.stderr[-2000:]
  assert not tmp_path.exists() or not any(tmp_path.iterdir())


def sft_command():
  """The `sft` console script of this venv (pip install -e .), else the same main as a module."""
  script = os.path.join(os.path.dirname(sys.executable), "sft")
  return [script] if os.path.exists(script) else [sys.executable, "-m", "sft.cli"]


@pytest.mark.slow
def test_sft_command_resolves_configs_by_name(tmp_path):
  # Run outside the checkout, so the name can only resolve through the configs package; PYTHONPATH puts this
  # checkout ahead of whichever one the script was installed from.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  workdir = tmp_path / "run"

  def sft(*args):
    cmd = [*sft_command(), f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

  for config in ("quickstart", "finetune:lora"):  # a mistyped key fails after the config loaded, before any work
    result = sft(f"--config={config}", "--config.train.stpes=5")
    assert result.returncode != 0
    assert "FATAL train.stpes: no such key (in --config.train.stpes=5;" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
  unknown = sft("--config=quickstrat")
  assert unknown.returncode != 0 and "no config named 'quickstrat'" in unknown.stderr and "quickstart" in unknown.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_config_names_resolve_only_in_the_projects_configs(tmp_path):
  # A folder holding its own `configs/quickstart.py` and a file named `eval`: names still mean the project's
  # configs; only a path (a separator, or .py) reads a file of the current directory.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "__init__.py").write_text("")
  (tmp_path / "configs" / "quickstart.py").write_text("raise SystemExit('FATAL the local file ran')\n")
  (tmp_path / "eval").write_text("raise SystemExit('FATAL the local file ran')\n")
  env = {**os.environ, "PYTHONPATH": ROOT}

  def sft(*args):
    cmd = [sys.executable, "-m", "sft", f"--workdir={tmp_path / 'run'}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

  for name in ("quickstart", "eval"):
    result = sft(f"--config={name}", "--config.train.stpes=5")
    assert "the local file ran" not in result.stderr, (name, result.stderr[-2000:])
    assert "FATAL train.stpes: no such key (in --config.train.stpes=5;" in result.stderr, result.stderr[-2000:]
  local = sft("--config=./configs/quickstart.py")
  assert local.returncode != 0 and "the local file ran" in local.stderr
  missing = sft("--config=./nowhere.py")
  assert missing.returncode != 0 and "FATAL --config=./nowhere.py: no such file" in missing.stderr


@pytest.mark.slow
def test_load_errors_are_one_line(tmp_path):
  no_get_config = tmp_path / "noget.py"
  no_get_config.write_text("def other():\n  return 1\n")
  result = subprocess.run(
      [sys.executable, "launch.py", f"--config={no_get_config}", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert f"FATAL --config={no_get_config}: the file defines no get_config()" in result.stderr, result.stderr[-2000:]
  for override, line in (
      ("--config.train.sft_step=3", "FATAL train.sft_step: no such key; did you mean train.sft_steps?"),
      ("--config.trian.sft_steps=3", "FATAL trian: no such key; did you mean train?"),
  ):
    result = launch(tmp_path / "run", override)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    fatal = [x for x in result.stderr.splitlines() if x.startswith("FATAL")]
    assert len(fatal) == 1 and fatal[0].startswith(line), result.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_data_dir_without_source_dir_is_refused(tmp_path):
  result = launch(tmp_path / "run", f"--config.data.dir={tmp_path}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "data.dir=" in result.stderr and "data.source 'dir'" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_help_lists_the_configs_and_exits_0(tmp_path):
  for flag in ("--help", "-h"):
    result = subprocess.run([*sft_command(), flag], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("quickstart", "eval", "finetune", "build_mix", "--print_config", "--takeover_lock", "sft inspect"):
      assert name in result.stdout, (flag, name)


@pytest.mark.slow
def test_print_config_shows_the_resolved_config_and_does_nothing_else(tmp_path):
  cmd = [sys.executable, "launch.py", "--config=configs/quickstart.py", "--print_config", "--config.train.lr=0.0123"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "lr: 0.0123" in result.stdout and "sft_steps: 900" in result.stdout
  bad = subprocess.run([*cmd, "--config.train.log_every=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "train.log_every: must be >= 1, got 0" in bad.stderr  # checked before it is shown
  no_workdir = subprocess.run(cmd[:3], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert no_workdir.returncode != 0 and "FATAL --workdir is required" in no_workdir.stderr
