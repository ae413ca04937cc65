"""Every experiment config loads, starts its docstring with the command that runs it, and is valid; and
check_config finds every mistyped key, wrong type and impossible value before any work is done."""

import difflib
import importlib
import json
import math
import pathlib

import ml_collections
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sft.config import base_config
from sft.config_check import BUILD, CONSTRAINTS, OPEN_SECTIONS, check_config
from sft.config_keys import OneOf, Range
from sft.databuilder import build_config
from sft.errors import ConfigError
from sft.model import ModelConfig

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_documents_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  assert module.__doc__.startswith(f"python launch.py --config=configs/{name}.py"), module.__doc__[:80]
  if name in ("build", "audit", "serve"):  # your own folder, named on the command line (tests/test_build_config.py builds one)
    return
  if name.startswith("build_"):  # a worked example: the files it reads are in the repository
    from sft.databuilder.build import list_inputs, params_of

    assert list_inputs(params_of(module.get_config()))
    return
  args = ["full", "lora"] if name == "finetune" else [None]
  for arg in args:
    config = module.get_config() if arg is None else module.get_config(arg)
    model = config.model.to_dict()
    model.pop("checkpoint")
    ModelConfig(vocab_size=config.tokenizer.vocab_size, **model)  # raises on an impossible value


def test_unknown_config_argument_is_an_error():
  from configs import finetune

  with pytest.raises(ConfigError, match="'full' or 'lora'"):
    finetune.get_config("qlora")


def test_the_model_section_is_made_from_model_config():
  # One source of truth: every ModelConfig field but vocab_size (tokenizer.vocab_size) at its default, and
  # the checkpoint path; a field added to ModelConfig becomes a config key with nothing else to edit.
  import dataclasses

  from sft.config import base_config
  from sft.trainer.setup import model_config

  config = base_config()
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  assert set(config.model) == (set(fields) - {"vocab_size"}) | {"checkpoint"}
  for name, default in fields.items():
    if name != "vocab_size":
      assert config.model[name] == default, name
  assert config.tokenizer.vocab_size == fields["vocab_size"]
  assert model_config(config) == ModelConfig()
  config.model.num_layers = 3
  assert model_config(config) == ModelConfig(num_layers=3)


# --- check_config ---------------------------------------------------------------------------------


def every_config():
  """(name, config) of every experiment config, each argument of those that take one."""
  for name in CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    if name == "finetune":
      yield from ((f"finetune:{mode}", module.get_config(mode)) for mode in ("full", "lora"))
    else:
      yield name, module.get_config()


@pytest.mark.parametrize("name", [name for name, _ in every_config()])
def test_every_experiment_config_passes_the_check(name):
  config = dict(every_config())[name]
  if name == "eval":  # the model and the records are named on the command line
    with pytest.raises(ConfigError, match="needs a model"):
      check_config(config)
    config.eval.model_workdir, config.data.dir = "/a/run", "/a/run/data"
  if name == "build":  # your folder, named on the command line
    with pytest.raises(ConfigError, match="nothing to read"):
      check_config(config)
    config.input_dir = "/my/raw"
  if name == "audit":  # the build it audits, named on the command line; checked by the audit's own keys
    from sft.audit.config import check_audit_config

    with pytest.raises(ConfigError, match="build_dir is not set"):
      check_audit_config(config)
    config.build_dir = "/my/build"
    check_audit_config(config)
    return
  if name == "serve":  # the model is --workdir; checked by the server's own keys
    from sft.serve.config import check_serve_config

    check_serve_config(config)
    config.default_max_tokens = config.max_tokens + 1
    with pytest.raises(ConfigError, match="more than max_tokens"):
      check_serve_config(config)
    return
  check_config(config)
  check_config(ml_collections.ConfigDict(json.loads(config.to_json())))  # as serving reads config.json back: tuples are lists


def test_the_defaults_pass_the_check():
  check_config(base_config())
  assert problems_of(build_config()).startswith("nothing to read")  # a build config names what to read
  check_config(fresh("build"))


def leaf_paths(config, open_sections, prefix=""):
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ml_collections.ConfigDict) and path not in open_sections:
      yield from leaf_paths(value, open_sections, path + ".")
    else:
      yield path


RUN_LEAVES = sorted(leaf_paths(base_config(), OPEN_SECTIONS))
BUILD_OPEN = tuple(p[len(BUILD):] for p in OPEN_SECTIONS)
BUILD_LEAVES = sorted(leaf_paths(build_config(), BUILD_OPEN))
# (kind of config, path): a run config's every key, and a build config's.
LEAVES = [("run", p) for p in RUN_LEAVES] + [("build", p) for p in BUILD_LEAVES]


def fresh(kind):
  if kind == "run":
    return base_config()
  config = build_config()
  config.stdlib = True
  return config


def get(config, path):
  for part in path.split("."):
    config = config[part]
  return config


def with_value(config, path, value):
  """A copy with `path` set to `value`, whatever its type (as a dict-built or notebook config can be)."""
  tree = config.to_dict()
  *parents, name = path.split(".")
  node = tree
  for part in parents:
    node = node[part]
  node[name] = value
  return ml_collections.ConfigDict(tree)


def problems_of(config):
  with pytest.raises(ConfigError) as err:
    check_config(config)
  return str(err.value)


def wrong_types(default):
  """Values that ml_collections might let through but that are not of the default's type."""
  anything = st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
  if isinstance(default, bool):
    return st.one_of(st.integers(), st.floats(), anything)
  if isinstance(default, int):
    return st.one_of(st.booleans(), st.floats(), anything)
  if isinstance(default, float):
    return st.one_of(st.booleans(), anything)
  if isinstance(default, str):
    return st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=2))
  if isinstance(default, (list, tuple)):
    return st.one_of(st.integers(), st.booleans(), st.none(), st.text(max_size=5))
  assert isinstance(default, ml_collections.ConfigDict), default  # an open section
  return st.one_of(st.integers(), st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), leaf=st.sampled_from(LEAVES))
def test_a_value_of_the_wrong_type_is_named(data, leaf):
  kind, path = leaf
  config = fresh(kind)
  value = data.draw(wrong_types(get(config, path)), label="value")
  assert f"{path}: expected " in problems_of(with_value(config, path, value))


def out_of_range(constraint, default):
  """Values of the default's type that `constraint` refuses."""
  if isinstance(constraint, OneOf):
    return st.text(max_size=8).filter(lambda v: v not in constraint.choices)
  assert isinstance(constraint, Range)
  if isinstance(default, int):
    lowest = math.floor(constraint.low) if constraint.low_open else math.ceil(constraint.low) - 1
    sides = [st.integers(max_value=lowest)]
    if constraint.high is not None:
      sides.append(st.integers(min_value=math.ceil(constraint.high) if constraint.high_open else math.floor(constraint.high) + 1))
    return st.one_of(sides).filter(lambda v: v not in constraint.also)
  sides = [st.floats(max_value=constraint.low, exclude_max=not constraint.low_open), st.just(math.nan)]
  if constraint.high is not None:
    sides.append(st.floats(min_value=constraint.high, exclude_min=not constraint.high_open, allow_nan=False))
  return st.one_of(sides).filter(lambda v: v not in constraint.also)


RANGED = [
    (kind, path[len(BUILD):] if kind == "build" else path)
    for path, constraint in CONSTRAINTS.items()
    if isinstance(constraint, (Range, OneOf))
    for kind in (("run", "build") if path.startswith(BUILD) else ("run",))
    if not (kind == "build" and path == BUILD + "job")  # job picks the kind: a build config with another job is a run config
]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), leaf=st.sampled_from(RANGED))
def test_a_value_out_of_range_is_named(data, leaf):
  kind, path = leaf
  config = fresh(kind)
  constraint = CONSTRAINTS[path if kind == "run" else BUILD + path]
  value = data.draw(out_of_range(constraint, get(config, path)), label="value")
  assert f"{path}: must be " in problems_of(with_value(config, path, value))


def test_the_constraints_name_real_keys():
  run_keys = set(RUN_LEAVES)
  assert set(CONSTRAINTS) <= run_keys, set(CONSTRAINTS) - run_keys
  assert set(OPEN_SECTIONS) <= run_keys


def test_every_numeric_key_outside_the_model_section_has_a_constraint():
  # The model section is ModelConfig's to check; the builder's own checks (params_of) cover these keys.
  by_params_of = {"output.validation_fraction", "output.num_shards", "decontaminate.exact_min_words", "read_max_record_bytes"}
  numeric = {
      path for path in RUN_LEAVES
      if isinstance(get(base_config(), path), (int, float)) and not isinstance(get(base_config(), path), bool)
      and not path.startswith("model.") and path[len(BUILD):] not in by_params_of
  }
  assert numeric <= set(CONSTRAINTS), sorted(numeric - set(CONSTRAINTS))


def test_the_choices_match_what_the_code_accepts():
  from sft.evaluator.metrics import NORMALIZATIONS
  from sft.trainer.sharding import MESH_AXES

  assert CONSTRAINTS["eval.answer_normalization"].choices == NORMALIZATIONS
  assert set(base_config().mesh) == set(MESH_AXES)


def misspell(word, data):
  """One edit of `word`: a letter dropped, doubled, swapped with the next, or replaced."""
  i = data.draw(st.integers(0, len(word) - 1), label="at")
  letter = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"), label="letter")
  edit = data.draw(st.sampled_from(["drop", "double", "swap", "replace"]), label="edit")
  if edit == "drop":
    return word[:i] + word[i + 1:]
  if edit == "double":
    return word[:i] + word[i] + word[i:]
  if edit == "swap":
    return word[:i] + word[i + 1:i + 2] + word[i] + word[i + 2:]
  return word[:i] + letter + word[i + 1:]


ALL_PATHS = {
    kind: {".".join(p.split(".")[:i]) for p in (RUN_LEAVES if kind == "run" else BUILD_LEAVES) for i in range(1, p.count(".") + 2)}
    for kind in ("run", "build")
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), leaf=st.sampled_from(LEAVES))
def test_a_misspelled_key_is_named_with_the_nearest_valid_key(data, leaf):
  # As `c.train.sft_stpes = 5` in a config file: a new key beside the one meant, which keeps its default.
  kind, path = leaf
  parent, _, name = path.rpartition(".")
  typo = misspell(name, data)
  typo_path = f"{parent}.{typo}" if parent else typo
  assume(typo and typo_path not in ALL_PATHS[kind])
  config = fresh(kind)
  with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
    setattr(get(config, parent) if parent else config, typo, 1)  # a config file's typo fails on its line
  config.unlock()  # as a dict-built or notebook config, which check_config sees whole
  (get(config, parent) if parent else config)[typo] = 1
  message = problems_of(config)
  head = f"{typo_path}: no such key; did you mean "
  assert head in message, message
  suggested = message.split(head, 1)[1].split("?", 1)[0]
  assert suggested in ALL_PATHS[kind]

  def closeness(key):
    return difflib.SequenceMatcher(None, key, typo_path).ratio()

  assert closeness(suggested) >= closeness(path)  # the meant key, or one as near


def test_a_typo_in_a_config_file_is_named_with_the_key_meant():
  config = base_config()
  with pytest.raises(AttributeError, match='Did you mean "sft_steps" instead of "sft_stpes"'):
    config.train.sft_stpes = 5  # the line of the config file that has the typo
  config.unlock()  # a config built by hand: the typo is a key nobody reads
  config.train.sft_stpes = 5
  assert problems_of(config) == "train.sft_stpes: no such key; did you mean train.sft_steps?"


@pytest.mark.parametrize(
    "path, value",
    [
        ("train.log_every", 0), ("eval.every_steps", 0), ("checkpoint.every_steps", 0),
        ("train.pretrain_steps", -1), ("train.sft_steps", -5), ("train.seq_len", -1), ("train.seq_len", 0),
        ("train.batch_size", 0), ("eval.batch_size", 0), ("mesh.fsdp", 0), ("mesh.data", -2), ("seed", -1),
        ("tokenizer.vocab_size", 0), ("sample.top_p", 0.0), ("train.lr", 0.0),
    ],
)
def test_values_that_fail_late_are_refused_up_front(path, value):
  config = base_config()
  *parents, name = path.split(".")
  (get(config, ".".join(parents)) if parents else config)[name] = value
  assert problems_of(config).startswith(f"{path}: must be ")


def test_values_that_cannot_work_together():
  config = base_config()
  config.train.pretrain_steps, config.train.sft_steps = 0, 0
  assert "at least one step to train" in problems_of(config)
  config = base_config()
  config.mesh.data, config.mesh.fsdp = -1, -1
  assert "mesh: sizes are positive, with at most one -1" in problems_of(config)
  config = base_config()
  config.data.source = "dir"
  assert problems_of(config).startswith("data.dir: ")
  config = base_config()
  config.data.dir = "/my/build"  # named but not read: the run would rebuild the default data
  assert problems_of(config).startswith("data.dir='/my/build' is only read with data.source 'dir'")
  config = base_config()
  config.model.rope_type, config.model.rope_low_freq_factor, config.model.rope_high_freq_factor = "llama3", 4.0, 4.0
  assert "model.rope_high_freq_factor must be greater" in problems_of(config)


@pytest.mark.parametrize(
    "name, value",
    [
        ("d_model", 0), ("num_layers", 0), ("num_heads", 0), ("num_kv_heads", 3), ("head_dim", 63), ("mlp_dim", -1),
        ("dtype", "fp8"), ("param_dtype", "int8"), ("rope_type", "yarn"), ("mlp_activation", "relu"), ("lora_rank", -1),
        ("lora_dropout", 1.0), ("lora_targets", ("q", "qkv")), ("sliding_window", -1), ("attn_logit_softcap", -1.0),
    ],
)
def test_model_keys_are_checked_by_model_config(name, value):
  config = base_config()
  config.model[name] = value
  message = problems_of(config)
  assert message.startswith("model.") and name in message, message


def test_every_problem_is_listed():
  config = base_config()
  config.unlock()
  config.train.sft_stpes = 5
  config.train.log_every = 0
  config.eval.every_steps = 0
  config.model.num_layers = True
  config.data.build.dedup.threshold = 2.0
  del config.sample.top_k
  message = problems_of(config)
  assert message.startswith("6 problems in the config:\n")
  for line in (
      "train.sft_stpes: no such key; did you mean train.sft_steps?", "train.log_every: must be >= 1, got 0",
      "eval.every_steps: must be >= 1, got 0", "model.num_layers: expected an integer, got bool True",
      "data.build.dedup.threshold: must be in [0, 1], got 2.0", "sample.top_k: missing",
  ):
    assert f"\n  {line}" in message, line


def test_a_section_replaced_by_a_value_is_one_problem():
  config = with_value(base_config(), "train", 5)
  assert problems_of(config) == "train: expected a section, got int 5"


def test_open_sections_take_user_keys_and_check_their_values():
  config = build_config()
  config.input_dir = "/raw"
  config.field_map = {"question": "prompt", "answer": "response"}
  config.filter.gopher.max_top_ngram_char_fraction["5"] = 0.1
  check_config(config)
  config.filter.gopher.max_top_ngram_char_fraction["five"] = 0.1
  assert "filter.gopher.max_top_ngram_char_fraction: keys are n-gram sizes" in problems_of(config)
  config = fresh("build")
  config.field_map = {"question": 1}
  assert problems_of(config).startswith("field_map: ")
  config = fresh("build")
  config.filter.sft.refusal_patterns = ("(unclosed",)
  assert "filter.sft.refusal_patterns: '(unclosed' is not a regular expression" in problems_of(config)


def test_sharding_rules_are_a_list_of_rules():
  config = base_config()
  config.sharding_rules = [("batch", "data"), ("embed", None), ("mlp", ["fsdp", "tensor"])]
  check_config(config)
  config.sharding_rules = [("batch", "data", "extra")]
  assert problems_of(config).startswith("sharding_rules: each rule is (logical axis name, mesh axes)")


def test_the_builders_own_checks_run_with_the_section_named():
  config = base_config()
  config.data.build.dedup.bands = 3
  assert problems_of(config).startswith("data.build.dedup.bands x dedup.rows (3 x 4) must equal dedup.num_perm")
  config = base_config()
  config.data.build.stdlib = False
  assert problems_of(config) == "data.build: nothing to read: set input_dir (a folder of raw files) and/or stdlib=True"
  config.data.source, config.data.dir = "dir", "/data"  # a build that does not run is not checked as one
  check_config(config)
  config = fresh("build")
  config.output.num_shards = 0
  assert problems_of(config) == "output.num_shards: must be >= 1, got 0"


def test_the_job_picks_the_defaults_to_compare_with():
  config = fresh("build")
  config.unlock()
  config.train = ml_collections.ConfigDict({"sft_steps": 1})  # a run key in a build config
  assert problems_of(config).startswith("train: no such key")
  config = base_config()
  config.job = "evaluate"
  assert problems_of(config) == "job: must be one of 'train', 'eval', 'build'; got 'evaluate'"


def test_a_placeholder_takes_none_or_its_type(monkeypatch):
  from sft import config_check as config_lib

  def with_placeholder():
    c = base_config()
    c.unlock()
    c.train.max_steps = ml_collections.config_dict.placeholder(int)
    return c

  monkeypatch.setattr(config_lib, "base_config", with_placeholder)
  config = with_placeholder()
  check_config(config)
  config.train.max_steps = 5
  check_config(config)
  assert problems_of(with_value(config, "train.max_steps", "5")) == "train.max_steps: expected an integer, got str '5'"


def test_none_is_not_a_value_where_the_default_has_one():
  config = base_config()
  config.train.sft_steps = None  # ml_collections lets None replace any value
  assert problems_of(config) == "train.sft_steps: expected an integer, got None"


def test_the_jobs_check_before_any_work(tmp_path):
  import sft

  config = fresh("build")
  config.unlock()
  config.dedup.treshold = 0.5
  with pytest.raises(ConfigError, match="dedup.treshold: no such key; did you mean dedup.threshold?"):
    sft.build_dataset(config, tmp_path / "data")
  assert not (tmp_path / "data").exists()
  config = base_config()
  config.train.log_every = 0
  with pytest.raises(ConfigError, match="train.log_every: must be >= 1"):
    sft.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
