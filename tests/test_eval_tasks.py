"""Evaluation per task: which answers are generated, which metrics score them, candidates ranked by
log-likelihood (checked against the model's own log-probabilities), and the written report."""

import importlib
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft.errors import ConfigError
from sft.evaluator import EvalResult, Evaluator, Sample, intervals_of, metrics, write_report
from sft.evaluator import choices as choices_lib
from sft.evaluator import report as report_lib
from sft.evaluator import tasks as tasks_lib
from sft.evaluator.report import fence
from sft.model import Transformer
from sft.trainer import sharding
from sft.trainer import step as step_lib


def _chat(user, answer, **extra):
  return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=7), num=st.integers(-1, 60))
def test_generation_prompts_are_shared_evenly_between_tasks(sizes, num):
  records = [{"task": task, "i": i} for task, n in zip(tasks_lib.TASKS, sizes) for i in range(n)]
  picked = tasks_lib.pick_for_generation(records, num)
  assert picked == sorted(set(picked)) and all(0 <= i < len(records) for i in picked)
  assert len(picked) == (len(records) if num < 0 else min(num, len(records)))
  counts = {t: sum(records[i]["task"] == t for i in picked) for t in tasks_lib.TASKS}
  available = {t: sizes[k] if k < len(sizes) else 0 for k, t in enumerate(tasks_lib.TASKS)}
  for a in counts:  # a task with fewer answers than another, by two or more, has none left to give
    for b in counts:
      assert counts[a] >= counts[b] - 1 or counts[a] == available[a]


def test_each_task_is_scored_by_its_metrics():
  assert tasks_lib.task_of({"task": "summarisation"}) == "summarisation"
  assert tasks_lib.task_of({}) == tasks_lib.task_of({"task": "poetry"}) == "chat"
  preds, refs = ["positive", "negative", "maybe"], ["positive", "positive", "negative"]
  scores, details = tasks_lib.score("classification", preds, refs, labels=["negative", "positive"])
  report = metrics.classification_report(preds, refs, labels=["negative", "positive"])
  assert scores["accuracy"] == report["accuracy"] == pytest.approx(1 / 3)
  assert scores["macro_f1"] == report["macro"]["f1"] and details["classification_report"] == report
  assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(tasks_lib.score("summarisation", ["a b"], ["a c"])[0])
  assert set(tasks_lib.score("translation", ["a b"], ["a b"])[0]) == {"exact_match", "token_f1", "bleu", "chrf"}
  assert set(tasks_lib.score("qa", ["a"], ["a"])[0]) == {"exact_match", "token_f1"}
  assert tasks_lib.score("chat", ["the cat"], ["the cat sat"])[0]["rougeL"] == pytest.approx(0.8)
  scores, details = tasks_lib.score("classification", ["x"], ["the"])  # a label that normalises to nothing
  assert "accuracy" not in scores and "empty after" in details["error"]
  assert tasks_lib.score("qa", [], []) == ({}, {})


def test_choice_ranking_worked_example():
  rows = choices_lib.ChoiceRows({}, np.asarray([0, 0, 0, 1, 1]), [
      {"record": 0, "choices": ["Rome", "Paris", "Oslo"], "gold": 1},
      {"record": 1, "choices": ["a", "bbbb"], "gold": 1},
  ], {})
  summary, items = choices_lib.choice_metrics(np.asarray([-3.0, -1.2, -1.2, -1.0, -2.0]), rows)
  assert [i["gold_rank"] for i in items] == [2, 2] and [i["pick"] for i in items] == [1, 0]
  assert items[1]["pick_norm"] == 1  # -2.0 over 4 bytes beats -1.0 over 1
  assert summary == {"choice_accuracy": 0.5, "choice_accuracy_norm": 1.0, "gold_rank": 2.0, "choice_items": 2.0}


@pytest.mark.slow
def test_candidate_log_likelihoods_equal_the_models_own(tokenizer, tiny_model_config):
  """Each row's score is the sum of log p(token) over the candidate's turn, computed from an unpadded
  forward pass of that sequence alone; items whose answer is no candidate are counted, not scored."""
  records = [
      _chat("The capital of France is ____.", "Paris", task="cloze", choices=["Rome", "Paris", "a much longer answer"]),
      _chat("Pick one.", "z", task="cloze", choices=["x", "y"]),
      _chat("No candidates.", "q", task="cloze"),
  ]
  rows = choices_lib.choice_rows(records, range(3), tokenizer, seq_len=48)
  assert len(rows) == 3 and rows.skipped == {choices_lib.SKIP_NOT_AMONG: 1} and rows.items[0]["gold"] == 1
  model = Transformer(tiny_model_config)
  params = model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
  out = step_lib.score_step(params, {k: jnp.asarray(v) for k, v in rows.batch.items()}, apply_fn=model.apply)
  for r, choice in enumerate(records[0]["choices"]):
    tokens, mask = tokenizer.tokenize_chat([records[0]["messages"][0], {"role": "assistant", "content": choice}])
    ids = jnp.asarray(tokens)[None]
    logits = model.apply({"params": params}, ids[:, :-1], jnp.arange(len(tokens) - 1)[None], jnp.ones_like(ids[:, :-1]))
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))[jnp.arange(len(tokens) - 1), tokens[1:]]
    assert float(out["loglik_b"][r]) == pytest.approx(float(jnp.sum(logp * mask[1:])), rel=1e-5, abs=1e-4)
    assert float(out["tokens_b"][r]) == mask[1:].sum() > 0
  too_long = choices_lib.choice_rows(records, [0], tokenizer, seq_len=4)
  assert len(too_long) == 0 and too_long.skipped == {choices_lib.SKIP_TOO_LONG: 1}


@settings(max_examples=100, deadline=None)
@given(st.text(st.sampled_from("`a\n|#"), max_size=30))
def test_quoted_examples_cannot_close_their_fence(text):
  fenced = fence(text)
  marks = fenced.split("text\n", 1)[0]
  assert fenced.endswith("\n" + marks) and marks not in text and set(marks) == {"`"}


def _outside_fences(markdown: str) -> str:
  """The lines of a Markdown text that no fenced block holds (CommonMark: a fence closes on a line of at
  least as many backticks)."""
  out, fence = [], 0
  for line in markdown.split("\n"):
    ticks = len(line) - len(line.lstrip("`"))
    if not fence and ticks >= 3:
      fence = ticks
    elif fence and ticks >= fence and not line.strip("`").strip():
      fence = 0
    elif not fence:
      out.append(line)
  return "\n".join(out)


def _evaluator(records, tokenizer, model, params_shardings, mesh, **kwargs):
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  return Evaluator(
      records, tokenizer=tokenizer, model=model,
      eval_step=step_lib.jit_eval_step(model.apply, params_shardings, batch_sharding, replicated),
      place_batch=lambda batch: sharding.global_batch(batch, batch_sharding), seq_len=64, batch_size=4,
      max_new_tokens=6, out_sharding=replicated,
      score_step=step_lib.jit_score_step(model.apply, params_shardings, batch_sharding, replicated), **kwargs,
  )  # fmt: skip


@pytest.mark.slow
def test_an_evaluation_reports_every_task_and_writes_its_report(tmp_path, tokenizer, tiny_model_config):
  records = [
      *[_chat(f"Classify: text {i} |", ["yes", "no"][i % 2], task="classification", labels=["yes", "no", "maybe"]) for i in range(5)],
      *[_chat(f"Summarize: long text number {i}", f"text {i}", task="summarisation") for i in range(3)],
      *[_chat(f"The ____ sat, {i}.", "cat", task="cloze", choices=["cat", "dog"]) for i in range(3)],
      _chat("```\n# A heading and a fence\n```", "hello"),
  ]
  model = Transformer(tiny_model_config)
  params = model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  params_shardings = jax.tree.map(lambda _: replicated, params)
  with jax.set_mesh(mesh):
    result = _evaluator(records, tokenizer, model, params_shardings, mesh, num_generations=-1).evaluate(params)
  m = result.metrics
  assert [t for t in result.tasks] == ["classification", "summarisation", "cloze", "chat"]
  assert sum(m[f"eval/{t}/loss_tokens"] for t in result.tasks) == m["eval/loss_tokens"] > 0
  for key in ("classification/accuracy", "classification/macro_f1", "summarisation/rougeL", "cloze/choice_accuracy", "chat/rougeL"):
    assert 0.0 <= m[f"eval/{key}"] <= 1.0, key
  assert m["eval/cloze/choice_items"] == 3 and len(result.samples) == len(records)
  assert result.tasks["classification"]["details"]["classification_report"]["labels"] == ["maybe", "no", "yes"]
  report = write_report(result, tmp_path / "eval", about={"model": "random | init"})
  text = report.read_text()
  for heading in ("## All tasks", "## Per task", "## classification", "## cloze", "### Worst answers", "confusion-classification.png"):
    assert heading in text, heading
  assert "# A heading and a fence" in text and "# A heading and a fence" not in _outside_fences(text)
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert saved["metrics"] == pytest.approx(m) and set(saved["tasks"]) == set(result.tasks)
  assert (tmp_path / "eval" / "confusion-classification.png").read_bytes()[:4] == b"\x89PNG"
  generated = {"classification": 5, "summarisation": 3, "cloze": 3, "chat": 1}
  _every_figure_has_its_interval(saved, text, generated)


# Figures over tokens or counts, not over items: no interval. (eval/accuracy is the next-token accuracy.)
_NO_INTERVAL = {"loss", "perplexity", "loss_tokens", "token_accuracy", "choice_items"}


def _every_figure_has_its_interval(saved, text, generated):
  """results.json: every generation and choice figure's interval holds it and counts its items; report.md
  shows each with its interval and n, marked as resting on few items."""
  m, intervals = saved["metrics"], saved["intervals"]
  assert set(intervals) == {k for k in m if k.rsplit("/", 1)[1] not in _NO_INTERVAL and k != "eval/accuracy"}
  for key, span in intervals.items():
    assert span["low"] <= m[key] <= span["high"] and span["method"] in ("wilson", "bootstrap"), key
  assert intervals["eval/exact_match"]["n"] == intervals["eval/token_f1"]["n"] == sum(generated.values())
  assert saved["interval_method"] == {"confidence": 0.95, "bootstrap_samples": 1000, "seed": 0, "few_items": 30}
  for task, info in saved["tasks"].items():
    assert set(info["intervals"]) == set(info["metrics"]) - _NO_INTERVAL, task
    for key, span in info["intervals"].items():
      assert span == intervals[f"eval/{task}/{key}"]
      of_choices = key in ("choice_accuracy", "choice_accuracy_norm", "gold_rank")
      assert span["n"] == (info["metrics"]["choice_items"] if of_choices else generated[task])
      value, low, high = (report_lib.number(x) for x in (info["metrics"][key], span["low"], span["high"]))
      assert f"| {key} | {value} | [{low}, {high}] | {span['n']}, few items |" in text
  row = next(line for line in text.splitlines() if line.startswith("| classification |"))
  assert "(n=5, few items)" in row and row.count("[") == len(saved["tasks"]["classification"]["intervals"])
  assert "| exact_match |" in text.split("## Per task")[0] and "few items\" under 30" in text
  studies = _write_results_module()  # a study's results.md shows the same intervals
  info = saved["tasks"]["classification"]
  span, table = info["intervals"]["accuracy"], studies._metric_table(info["metrics"], info["intervals"], 30)
  value, low, high = (f"{x:.3f}" for x in (info["metrics"]["accuracy"], span["low"], span["high"]))
  assert f"| accuracy | {value} | [{low}, {high}] | 5, few items |" in table


def _write_results_module():
  path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "write_results.py"
  spec = importlib.util.spec_from_file_location("write_results", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_study_table_from_results_without_intervals_still_reads():
  studies = _write_results_module()
  rows = studies._metric_table({"loss": 1.5, "exact_match": 0.25}, {}, 30)
  assert rows[2:] == ["| loss | 1.500 |", "| exact_match | 0.250 |"]
  rows = studies._metric_table({"loss": 1.5, "bleu": 23.0}, {"bleu": {"low": 20.0, "high": 26.5, "n": 40}}, 30)
  assert rows[2:] == ["| loss | 1.500 |  |  |", "| bleu | 23.000 | [20.000, 26.500] | 40 |"]


def test_a_figure_from_few_items_is_marked():
  span = {"low": 0.25, "high": 0.75, "n": 29, "method": "wilson"}
  assert report_lib._figure(0.5, span) == "0.500 [0.250, 0.750] (n=29, few items)"
  assert report_lib._figure(0.5, {**span, "n": 30}) == "0.500 [0.250, 0.750] (n=30)"
  bleu = {**span, "low": 12.5, "high": 31.25, "n": 1200}
  assert report_lib._figure(23.456, bleu, items=False) == "23.46 [12.5, 31.25]"
  assert report_lib._figure(1.5, None) == "1.500"


_TASK_ANSWERS = {
    "classification": (["yes", "no", "maybe", "Yes", "no"] * 3, ["yes", "yes", "no", "yes", "no"] * 3),
    "summarisation": (["the cat sat", "a dog ran far", ""], ["the cat sat down", "the dog ran", "birds"]),
    "translation": (["the cat sat on the mat", "a dog ran", "hello"], ["the cat sat on a mat", "the dog ran", "hi"]),
    "qa": (["Paris", "in 1889", "Eiffel"], ["paris", "1889", "Gustave Eiffel"]),
    "chat": (["hello there", "bye"], ["hello there friend", "goodbye"]),
}


@pytest.mark.parametrize("task", list(_TASK_ANSWERS))
def test_every_figure_of_a_task_has_an_interval_that_holds_it(task):
  predictions, references = _TASK_ANSWERS[task]
  labels = ["yes", "no"] if task == "classification" else ()
  scores, _ = tasks_lib.score(task, predictions, references, labels=labels)
  how = tasks_lib.Resampling(samples=300, seed=1)
  spans = tasks_lib.intervals(task, predictions, references, labels=labels, how=how)
  assert set(spans) == set(scores)
  for key, span in spans.items():
    assert span["low"] - 1e-12 <= scores[key] <= span["high"] + 1e-12 and span["n"] == len(predictions), key
  assert spans == tasks_lib.intervals(task, predictions, references, labels=labels, how=how)  # seeded
  assert tasks_lib.intervals(task, [], []) == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdx"), st.sampled_from("abc")), min_size=1, max_size=40))
def test_classification_intervals_hold_the_figures_on_any_answers(pairs):
  predictions, references = (list(column) for column in zip(*pairs))
  scores, _ = tasks_lib.score("classification", predictions, references, labels=["a", "b", "c"])
  how = tasks_lib.Resampling(100)
  spans = tasks_lib.intervals("classification", predictions, references, labels=["a", "b", "c"], how=how)
  assert set(spans) == set(scores)
  for key, span in spans.items():
    assert 0.0 <= span["low"] <= scores[key] + 1e-12 and scores[key] <= span["high"] + 1e-12 <= 1.0 + 1e-12, key
    assert span["n"] == len(pairs)


def test_the_intervals_of_an_evaluation_hold_its_figures_as_reported(tmp_path):
  """Keyed as the metrics; a figure summed in another order than its resamples is still inside; 40 items are
  not few."""
  samples = [Sample("p", "a b c", "a b", "qa", 0.8)] * 40  # every resample's token F1 is 0.8
  scores, _ = tasks_lib.score("qa", [s.prediction for s in samples], [s.reference for s in samples])
  scores["token_f1"] = math.nextafter(scores["token_f1"], 2.0)
  metrics = {"eval/loss": 1.0, **{f"eval/{prefix}{k}": v for prefix in ("", "qa/") for k, v in scores.items()}}
  tasks = {"qa": {"records": 40, "generated": 40, "metrics": {"loss": 1.0, **scores}, "details": {}}}
  result = EvalResult(metrics, tasks, samples, [], resampling=tasks_lib.Resampling(200, 7))
  spans = intervals_of(result)
  assert set(spans) == set(metrics) - {"eval/loss"}
  assert all(span["low"] <= metrics[key] <= span["high"] and span["n"] == 40 for key, span in spans.items())
  text = write_report(result, tmp_path, about={}).read_text()
  assert "(n=40)" in text and "few items |" not in text and "200 resamples, seed 7" in text


def test_choice_figures_have_intervals():
  items = [{"pick": p, "pick_norm": 1, "gold": 0, "gold_rank": 1 + p} for p in (0, 1)]
  summary, spans = choices_lib.summary(items), tasks_lib.choice_intervals(items)
  assert set(spans) == set(summary) - {"choice_items"}
  for key, span in spans.items():
    assert span["low"] <= summary[key] <= span["high"] and span["n"] == 2, key
  assert spans["choice_accuracy"]["method"] == "wilson" and tasks_lib.choice_intervals([]) == {}


def test_eval_files_count_what_cannot_be_evaluated(tmp_path):
  """Lines that are no record, documents and prompts without an answer are counted; the rest evaluate."""
  from sft.eval_job import read_eval_files

  path = tmp_path / "e.jsonl"
  path.write_text("\n".join([
      json.dumps({"prompt": "Hi?", "completion": "Hello."}),
      json.dumps({"prompt": "No answer here?"}),
      json.dumps({"text": "a document"}),
      "{broken",
  ]) + "\n")
  records, counts = read_eval_files([str(path)])
  assert [r["messages"][-1]["content"] for r in records] == ["Hello."]
  assert counts == {"files": 1, "chats": 1, "documents": 1, "rejected": 2}
  with pytest.raises(ConfigError, match="no chat records"):
    read_eval_files([str(_only(tmp_path, json.dumps({"prompt": "x"})))])
  with pytest.raises(ConfigError, match="is not a file"):
    read_eval_files([str(tmp_path / "missing.jsonl")])


def _only(tmp_path, line):
  path = tmp_path / "only.jsonl"
  path.write_text(line + "\n")
  return path


def _tiny_params(tiny_model_config):
  model = Transformer(tiny_model_config)
  params = model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  return model, params, mesh, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)


LONG = "Summarize: " + "shlex split quote " * 40  # far more than the 64 tokens of the context


@pytest.mark.slow
def test_an_evaluation_with_no_answer_token_in_the_context_is_an_error(tokenizer, tiny_model_config):
  """Every answer past seq_len: a loss over nothing would read 0.000, perplexity 1.0."""
  model, params, mesh, shardings = _tiny_params(tiny_model_config)
  records = [_chat(LONG + str(i), "short answer") for i in range(2)]
  with pytest.raises(ConfigError, match="none of the 2 eval records has an answer token within train.seq_len=64.*raise train.seq_len"):
    _evaluator(records, tokenizer, model, shardings, mesh, num_generations=0)


@pytest.mark.slow
def test_a_task_without_answer_tokens_has_no_perplexity_and_long_prompts_are_cut(tmp_path, tokenizer, tiny_model_config, monkeypatch):
  """The qa records' answers are all past the context: "no tokens" for that task, not perplexity 1.0;
  their generation prompts keep their last tokens (counted, reported) and the cache stays in the context."""
  generate_module = importlib.import_module("sft.evaluator.generate")  # the package's `generate` is the function
  lengths = []
  init_cache = generate_module.init_cache
  monkeypatch.setattr(generate_module, "init_cache", lambda cfg, batch, n: lengths.append(n) or init_cache(cfg, batch, n))
  model, params, mesh, shardings = _tiny_params(tiny_model_config)
  records = [_chat(LONG + str(i), "it quotes", task="qa") for i in range(2)] + [_chat("Hi?", "hello")]
  with jax.set_mesh(mesh):
    result = _evaluator(records, tokenizer, model, shardings, mesh, num_generations=-1).evaluate(params)
  m = result.metrics
  assert m["eval/qa/loss_tokens"] == 0 and m["eval/chat/loss_tokens"] == m["eval/loss_tokens"] > 0
  assert "eval/qa/perplexity" not in m and "eval/qa/loss" not in m and m["eval/chat/perplexity"] > 1
  assert "perplexity" not in result.tasks["qa"]["metrics"] and "no tokens" in result.tasks["qa"]["details"]["loss"]
  assert result.prompts_truncated == 2 and lengths and max(lengths) <= 64
  cut = result.samples[0].prompt  # its end kept: the question's last words, then the assistant header
  assert cut.endswith("quote 0<|end|><|assistant|>") and "Summarize" not in cut
  text = write_report(result, tmp_path / "eval", about={}).read_text()
  qa_row = next(line for line in text.splitlines() if line.startswith("| qa |"))
  assert "no tokens" in qa_row and "1.000" not in qa_row
  assert "generation prompts cut to the context: 2 of 3" in text
  assert json.loads((tmp_path / "eval" / "results.json").read_text())["prompts_truncated"] == 2
  with pytest.raises(ConfigError, match=r"record #0 has a generation prompt of \d+ tokens, more than the 58 that fit"):
    _evaluator(records, tokenizer, model, shardings, mesh, num_generations=-1, prompt_overflow="refuse")
