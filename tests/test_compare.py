"""Two models compared on the same items: each metric's difference with its paired-bootstrap interval and
p-value, McNemar's exact test for right-or-wrong metrics, the answers side by side; the eval job's
`eval.compare_to` runs it end to end, and refuses a second model it cannot load before any work."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.config import base_config
from sft.errors import ConfigError
from sft.evaluator import choices as choices_lib
from sft.evaluator import compare as compare_lib
from sft.evaluator import stats
from sft.evaluator import tasks as tasks_lib
from sft.evaluator.evaluate import EvalResult, Sample
from sft.trainer import rundir, setup
from sft.trainer.checkpoint import Checkpointer

TINY = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
SAMPLES = 200  # bootstrap draws: enough to check, cheap to run


# --- compare() on results built by hand ------------------------------------------------------------------


def _result(items: list[tuple[str, str, str]], choice_items: list[dict] = (), labels=("no", "yes")) -> EvalResult:
  """An EvalResult as the Evaluator builds it from (task, reference, prediction) and ranked items."""
  samples = [Sample(f"prompt {i}", ref, pred, task, tasks_lib.sample_score(pred, ref))
             for i, (task, ref, pred) in enumerate(items)]
  choice_items = [dict(c) for c in choice_items]
  tasks = {}
  for task in dict.fromkeys([s.task for s in samples] + [c["task"] for c in choice_items]):
    mine = [s for s in samples if s.task == task]
    labelled = labels if task == "classification" else ()
    scores, details = tasks_lib.score(task, [s.prediction for s in mine], [s.reference for s in mine], labels=labelled)
    scores.update(choices_lib.summary([c for c in choice_items if c["task"] == task]))
    tasks[task] = {"records": len(mine), "generated": len(mine), "metrics": {"loss": 2.0, **scores}, "details": details}
  metrics = {"eval/loss": 2.0, "eval/perplexity": 7.39, "eval/accuracy": 0.3}
  if samples:
    overall, _ = tasks_lib.score("qa", [s.prediction for s in samples], [s.reference for s in samples])
    metrics.update({f"eval/{k}": v for k, v in overall.items()})
  metrics.update({f"eval/{k}": v for k, v in choices_lib.summary(choice_items).items()})
  return EvalResult(metrics, tasks, samples, choice_items)


def _choice(record: int, gold: int, pick: int, task: str = "cloze") -> dict:
  return {"record": record, "task": task, "choices": ["x", "y", "z"], "gold": gold, "pick": pick, "pick_norm": pick,
          "gold_rank": 1 + (pick != gold), "loglik": [0.0, 0.0, 0.0]}


def test_the_worked_example_and_a_model_against_itself():
  refs = [f"answer {i}" for i in range(10)]
  a = _result([("qa", r, r if i < 4 else "no idea") for i, r in enumerate(refs)])
  b = _result([("qa", r, r if i < 7 else "no idea") for i, r in enumerate(refs)])
  row = compare_lib.compare(a, b, normalization="squad", samples=SAMPLES)["tasks"]["qa"]["metrics"]["exact_match"]
  assert (row["a"], row["b"], row["only_a"], row["only_b"]) == (0.4, 0.7, 0, 3)
  assert row["difference"] == pytest.approx(0.3) and row["mcnemar_p"] == pytest.approx(0.25)

  items = [("qa", "paris", "paris"), ("qa", "rome", "oslo"), ("classification", "yes", "no"),
           ("classification", "no", "no"), ("translation", "le chat noir", "le chat"),
           ("translation", "un chien", "un chien")]
  same = _result(items, [_choice(0, 1, 1), _choice(1, 0, 2)])
  comparison = compare_lib.compare(same, same, normalization="squad", samples=SAMPLES)
  rows = [row for info in comparison["tasks"].values() for row in info["metrics"].values()]
  rows += comparison["all"].values()
  assert {"bleu", "chrf", "macro_f1", "micro_f1", "accuracy", "choice_accuracy", "gold_rank"} <= {
      m for info in comparison["tasks"].values() for m in info["metrics"]}
  for row in rows:
    assert row["difference"] == 0
    if "low" in row:
      assert (row["low"], row["high"], row["p_value"]) == (0, 0, 1.0)
    if "mcnemar_p" in row:
      assert (row["mcnemar_p"], row["only_a"], row["only_b"]) == (1.0, 0, 0)
  assert all(not info["disagreements"] for info in comparison["tasks"].values())


_ANSWERS = st.sampled_from(["yes", "no", "The cat", "cat!", "a dog", "", "le chat noir", "`|` pipe"])
_ITEMS = st.sampled_from([("qa", "the cat sat"), ("qa", "yes"), ("translation", "le chat noir"),
                          ("classification", "yes"), ("classification", "no"),
                          ("summarisation", "the cat sat on the mat"), ("chat", "hello")])


def _item_figures(metric: str, pairs: list[tuple[Sample, Sample]], labels) -> tuple:
  """(per-item values of A, of B) of a mean-of-items metric, or the corpus statistics of A and B."""
  references = [a.reference for a, _ in pairs]
  answers = [[p[k].prediction for p in pairs] for k in (0, 1)]
  if metric in compare_lib.CORPUS:
    return tuple(compare_lib.corpus_statistic(metric, mine, references, "squad", labels) for mine in answers)
  return tuple(compare_lib.item_values(metric, mine, references, "squad") for mine in answers)


@settings(max_examples=25, deadline=None)  # two results and their tables per example (~70 ms)
@given(
    items=st.lists(st.tuples(_ITEMS, _ANSWERS, _ANSWERS), min_size=1, max_size=12),
    picks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)), max_size=8),
)
def test_every_figure_is_stats_applied_to_the_items(items, picks):
  """Whatever the answers, each row's numbers are the shared statistics applied to the per-item scores,
  and McNemar's p is scipy's two-sided binomial test of the discordant items."""
  a = _result([(t, r, pa) for (t, r), pa, _ in items], [_choice(i, g, pa) for i, (g, pa, _) in enumerate(picks)])
  b = _result([(t, r, pb) for (t, r), _, pb in items], [_choice(i, g, pb) for i, (g, _, pb) in enumerate(picks)])
  comparison = compare_lib.compare(a, b, normalization="squad", samples=SAMPLES, seed=3)
  for task, info in comparison["tasks"].items():
    pairs = [(x, y) for x, y in zip(a.samples, b.samples) if x.task == task]
    labels = a.tasks[task]["details"].get("classification_report", {}).get("labels", ())
    for metric, row in info["metrics"].items():
      if metric == "loss":
        assert row["difference"] == 0 and "low" not in row
        continue
      if metric in compare_lib.CHOICE_METRICS:
        mine = [(x, y) for x, y in zip(a.choices, b.choices) if x["task"] == task]
        a_n, b_n = (compare_lib._choice_values(metric, [p[k] for p in mine]) for k in (0, 1))
      else:
        a_n, b_n = _item_figures(metric, pairs, labels)
      if metric in compare_lib.CORPUS:
        difference = lambda i, a=a_n, b=b_n: b(i) - a(i)  # noqa: E731
        want = stats.paired_bootstrap(n=len(pairs), statistic=difference, samples=SAMPLES, seed=3)
        figures = a_n(np.arange(len(pairs))), b_n(np.arange(len(pairs)))
      else:
        want = stats.paired_bootstrap(a_n, b_n, samples=SAMPLES, seed=3)
        figures = a_n.mean(), b_n.mean()
      assert {k: row[k] for k in want} == pytest.approx(want) and (row["a"], row["b"]) == pytest.approx(figures)
      assert row["items"] == len(pairs) if metric not in compare_lib.CHOICE_METRICS else len(a_n)
      if metric in compare_lib.BINARY:
        only_a, only_b = int(np.sum(a_n > b_n)), int(np.sum(b_n > a_n))
        assert (row["only_a"], row["only_b"]) == (only_a, only_b)
        want_p = scipy.stats.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        assert row["mcnemar_p"] == pytest.approx(want_p)
      else:
        assert "mcnemar_p" not in row


def test_items_that_do_not_pair_are_an_error_not_a_silent_mismatch():
  """Answers pair by position, or the comparison stops; ranked items pair by record, and an item only one
  model ranked (its candidates past the context in one tokenizer) is left out, and said so."""
  a = _result([("qa", "paris", "paris"), ("qa", "rome", "rome")])
  with pytest.raises(ValueError, match="answered 2 and 1 items"):
    compare_lib.compare(a, _result([("qa", "paris", "paris")]), normalization="squad")
  with pytest.raises(ValueError, match="item 1 does not pair"):
    compare_lib.compare(a, _result([("qa", "paris", "paris"), ("qa", "oslo", "rome")]), normalization="squad")
  with pytest.raises(ValueError, match="other candidates"):
    compare_lib.compare(_result([], [_choice(0, 1, 1)]), _result([], [_choice(0, 2, 1)]), normalization="squad")
  a = _result([], [_choice(0, 1, 1), _choice(1, 1, 0), _choice(2, 0, 0)])
  b = _result([], [_choice(2, 0, 1), _choice(0, 1, 1)])
  comparison = compare_lib.compare(a, b, normalization="squad", samples=SAMPLES)
  row = comparison["tasks"]["cloze"]["metrics"]["choice_accuracy"]
  assert (row["items"], row["a"], row["b"], row["only_a"], row["only_b"]) == (2, 1.0, 0.5, 1, 0)
  assert row["note"] == "on the 2 items both ranked (A ranked 3, B 2)"
  assert comparison["all"]["choice_accuracy"]["a"] == 1.0
  assert [c["record"] for c in comparison["choices"]] == [0, 2]


# --- the eval job ------------------------------------------------------------------------------------------


def _workdir(path, tokenizer, seed: int):
  """A workdir as a training run leaves it (tokenizer, config.json, a checkpoint of random parameters)."""
  path.mkdir()
  (path / setup.TOKENIZER_FILE).write_bytes(tokenizer.model_proto)
  config = base_config()
  config.tokenizer.vocab_size = 512
  config.model.update(TINY)
  config.train.seq_len = 128
  rundir.write_run_config(path, config, 0)
  run = setup.setup_run(config)
  params = nn.unbox(run.model.init(jax.random.key(seed), *run.dummy_inputs)["params"])
  checkpointer = Checkpointer(path / setup.CHECKPOINTS, max_to_keep=1, save_interval_steps=1)
  checkpointer.save(1, {"params": params}, {}, force=True)
  checkpointer.close()
  return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, chat_records):
  """Model A, and model B of other weights and another tokenizer (trained on the chats alone)."""
  from sft.tokenizer import train_tokenizer

  other = train_tokenizer([m["content"] for r in chat_records for m in r["messages"]], vocab_size=512)
  root = tmp_path_factory.mktemp("models")
  return _workdir(root / "a", tokenizer, 1), _workdir(root / "b", other, 2)


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
  """Two records of every task the templates give, two plain chats, and eight more cloze items whose
  candidates the two models rank differently."""
  rows = []
  for i in range(2):
    rows += [
        {"text": f"Serialize obj {i} to JSON.", "label": ["json", "shlex"][i], "labels": ["json", "shlex"]},
        {"document": f"The json module {i} reads and writes JSON text.", "summary": "json reads JSON"},
        {"source_lang": "English", "target_lang": "French", "source_text": f"the cat {i}", "target_text": "le chat"},
        {"context": "shlex splits shell lines.", "question": f"What splits {i}?", "answer": "shlex"},
        {"text": f"Call json.dumps({i}).", "field": "function", "value": "json.dumps"},
        {"text": f"Return a ____ of the string {i}.", "answer": "copy", "choices": ["copy", "json", "split"]},
        {"prompt": f"Hi {i}?", "completion": "Hello."},
    ]
  words = ["copy", "json", "split", "quote", "dumps", "loads", "lexer", "token"]
  for i in range(8):  # the answer first, second or third among its candidates
    choices = [words[(i + k) % 8] for k in range(-(i % 3), 3 - i % 3)]
    rows.append({"text": f"The ____ of item {i}.", "answer": words[i], "choices": choices})
  path = tmp_path_factory.mktemp("evalset") / "evalset.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _config(model, evalset, compare_to):
  from configs import eval as eval_configs

  config = eval_configs.get_config()
  config.eval.model_workdir, config.eval.files, config.eval.compare_to = str(model), (str(evalset),), str(compare_to)
  config.eval.update(batch_size=2, max_new_tokens=4, bootstrap_samples=SAMPLES)
  return config


@pytest.mark.slow
def test_the_eval_job_compares_two_models_on_every_task_and_metric(models, evalset, tmp_path):
  from sft import eval_job

  a, b = models
  metrics = eval_job.evaluate_model(_config(a, evalset, b), tmp_path / "ev")
  folder = tmp_path / "ev" / "eval"
  results = json.loads((folder / "results.json").read_text())
  assert results["metrics"] == pytest.approx(metrics)  # model A's report, as without a comparison
  saved = json.loads((folder / "compare.json").read_text())
  assert str(a) in saved["about"]["A"] and str(b) in saved["about"]["B"]
  assert "rendered per model: the two tokenizers differ" in saved["about"]["prompts"]
  assert set(saved["tasks"]) == set(results["tasks"]) == set(tasks_lib.TASKS)
  for task, info in results["tasks"].items():
    assert set(saved["tasks"][task]["metrics"]) == set(info["metrics"]) - {"choice_items"}
    for metric, row in saved["tasks"][task]["metrics"].items():
      assert row["a"] == pytest.approx(info["metrics"][metric]) and row["b"] is not None
      assert ("low" in row) == (metric not in compare_lib.NO_ITEMS)
  # The per-item answers of both models give back every exact-match row: stats applied to them.
  answers = saved["answers"]
  assert [(x["reference"], x["a"]) for x in answers] == [(s["reference"], s["prediction"]) for s in results["samples"]]
  for task in tasks_lib.TASKS:
    mine = [x for x in answers if x["task"] == task]
    references = [x["reference"] for x in mine]
    a_n, b_n = (compare_lib.item_values("exact_match", [x[k] for x in mine], references, "squad") for k in "ab")
    row = saved["tasks"][task]["metrics"]["exact_match"]
    assert {k: row[k] for k in ("difference", "low", "high", "p_value")} == pytest.approx(
        stats.paired_bootstrap(a_n, b_n, samples=SAMPLES, seed=0))
    assert row["mcnemar_p"] == stats.mcnemar_exact(int(np.sum(a_n > b_n)), int(np.sum(b_n > a_n)))
  picks = saved["choices"]
  a_n, b_n = (np.asarray([c[f"pick_{k}"] == c["gold"] for c in picks], float) for k in "ab")
  only_a, only_b = int(np.sum(a_n > b_n)), int(np.sum(b_n > a_n))
  assert only_a + only_b > 0  # the two models rank some items differently: the test compares something
  row = saved["tasks"]["cloze"]["metrics"]["choice_accuracy"]
  assert (row["items"], row["only_a"], row["only_b"]) == (len(picks), only_a, only_b) > (2,)
  assert row["mcnemar_p"] == stats.mcnemar_exact(only_a, only_b)
  assert {k: row[k] for k in ("difference", "low", "high", "p_value")} == pytest.approx(
      stats.paired_bootstrap(a_n, b_n, samples=SAMPLES, seed=0))
  text = (folder / "compare.md").read_text()
  for heading in ["# Comparison: B - A", "## all tasks", *(f"## {t}" for t in tasks_lib.TASKS), "| bleu | 2 (few) |"]:
    assert heading in text, heading


@pytest.mark.slow
def test_a_model_compared_with_itself_differs_by_nothing(models, evalset, tmp_path):
  from sft import eval_job

  a, _ = models
  eval_job.evaluate_model(_config(a, evalset, a), tmp_path / "ev")
  saved = json.loads((tmp_path / "ev" / "eval" / "compare.json").read_text())
  rows = [row for info in saved["tasks"].values() for row in info["metrics"].values()] + list(saved["all"].values())
  assert len(rows) > 30
  for row in rows:
    assert row["difference"] == 0 and row["a"] == row["b"]
    assert ("low" not in row) or (row["low"], row["high"], row["p_value"]) == (0, 0, 1.0)
    assert row.get("mcnemar_p", 1.0) == 1.0
  assert not any(info["disagreements"] for info in saved["tasks"].values())
  assert "the same tokens for both models" in saved["about"]["prompts"]


@pytest.mark.slow
def test_a_second_model_that_cannot_be_loaded_is_one_line_before_any_work(models, evalset, tmp_path, tokenizer):
  from sft import eval_job

  a, _ = models
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  rundir.write_run_config(untrained, base_config(), 0)
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [(tmp_path / "nowhere", "is not a folder"), (untrained, "has no checkpoint: train there first"),
           (empty, "holds no checkpoint: give a training workdir with a checkpoint, or a Hugging Face folder")]
  for compare_to, message in cases:
    with pytest.raises(ConfigError, match=message) as err:
      eval_job.evaluate_model(_config(a, evalset, compare_to), tmp_path / "ev")
    assert "\n" not in str(err.value) and f"eval.compare_to='{compare_to}'" in str(err.value)
    assert not (tmp_path / "ev").exists()  # refused before the job's workdir, lock or any model


def test_a_hugging_face_folder_is_built_as_model_checkpoint_is(evalset, tmp_path):
  from sft import eval_job

  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
  (folder / "model.safetensors").write_bytes(b"")
  config = _config(tmp_path, evalset, folder)
  run_config, workdir = eval_job.compare_run_config(config)
  assert workdir is None and run_config.model.checkpoint == str(folder) and config.model.checkpoint == ""
  config.eval.compare_to = ""
  assert eval_job.compare_run_config(config) is None
