"""Two models compared on the same items with the same decoding: `eval/compare.md` for people and
`eval/compare.json` for programs. The eval job writes them when `eval.compare_to` names a second model.

    comparison = compare(result_a, result_b, normalization="squad", samples=1000, seed=0)
    write_comparison(comparison, workdir / "eval", about={"A": ..., "B": ...})

Per task and over all tasks, for every metric: model A's value, model B's, the difference B - A with
its paired-bootstrap interval and p-value (stats.paired_bootstrap: the same draws of items score both
models, so what the items share cancels out), and where an item is simply right or wrong (exact match,
accuracy, choice accuracy) McNemar's exact test of the discordant items. A mean over items (exact match,
token F1, ROUGE, choice accuracy, gold rank) resamples the per-item values; a corpus figure (BLEU, chrF,
macro and micro F1) is recomputed on each draw. Loss and perplexity are sums over packed token batches
that keep no per-item value: their difference comes without an interval.

Answers pair by position: both evaluations answer the same records in the same order (EvalResult.samples),
and a pair that does not align is an error, never a silent mismatch. Ranked candidates pair by record
(EvalResult.choices): an item only one model ranked (too long for the context in its tokenizer) is left out,
and its row says on how many items both ranked the figures rest.

Worked example: of 10 items A gets 4 right; B the same 4 and 3 more (b = 0 discordant items only A got
right, c = 3 only B): exact match 0.4 -> 0.7, difference +0.3, McNemar p = 2 * 0.5**3 = 0.25.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from sft.databuilder.write import atomic_write_text
from sft.evaluator import metrics as M
from sft.evaluator import stats
from sft.evaluator.evaluate import EvalResult, Sample
from sft.evaluator.report import EXAMPLES, cell, cut, fence, number

COMPARE_MD, COMPARE_JSON = "compare.md", "compare.json"
ALL = "all tasks"
CONFIDENCE = 0.95
# Item-level right or wrong: McNemar's exact test applies.
BINARY = ("exact_match", "accuracy", "choice_accuracy", "choice_accuracy_norm")
CORPUS = ("bleu", "chrf", "macro_f1", "micro_f1")  # recomputed on each draw of the items
NO_ITEMS = ("loss", "perplexity", "token_accuracy")  # summed over token batches: no per-item value
CHOICE_METRICS = ("choice_accuracy", "choice_accuracy_norm", "gold_rank")
_SKIP = ("choice_items", "loss_tokens")  # counts, shown as the number of items


def item_values(
    metric: str, predictions: Sequence[str], references: Sequence[str], normalization: str
) -> np.ndarray | None:
  """Each answer's score under `metric` when the metric is their mean (None: it is not)."""
  if metric in ("exact_match", "accuracy"):  # a classification answer is right when it is the reference label
    return M.exact_match_per_item(predictions, references, normalization)
  if metric == "token_f1":
    return M.token_f1_per_item(predictions, references, normalization)
  if metric in M.ROUGE_TYPES:
    return M.rouge_per_item(predictions, references)[metric]
  return None


def corpus_statistic(
    metric: str, predictions: Sequence[str], references: Sequence[str], normalization: str, labels: Sequence[str] = ()
) -> Callable[[np.ndarray], float] | None:
  """indices_n -> `metric` of those items (repeats counted), for a corpus figure (None: not one): BLEU and chrF
  from each sentence's sacrebleu statistics, macro and micro F1 from the answers' label codes over the task's
  label set. On every item, the evaluation's own figure."""
  if metric == "bleu":
    return M.bleu_statistic(predictions, references)
  if metric == "chrf":
    return M.chrf_statistic(predictions, references)
  if metric in ("macro_f1", "micro_f1"):
    reference_n, answer_n, k = M.classification_codes(predictions, references, list(labels) or None, normalization)
    which = 0 if metric == "macro_f1" else 1
    return lambda idx_n: M.f1_of_codes(reference_n[idx_n], answer_n[idx_n], k)[which]
  return None


def _compare_values(a_n: np.ndarray, b_n: np.ndarray, binary: bool, samples: int, seed: int) -> dict[str, Any]:
  out = stats.paired_bootstrap(a_n, b_n, samples=samples, seed=seed, confidence=CONFIDENCE)
  if binary:
    only_a, only_b = int(np.sum((a_n == 1) & (b_n == 0))), int(np.sum((a_n == 0) & (b_n == 1)))
    out.update(mcnemar_p=stats.mcnemar_exact(only_a, only_b), only_a=only_a, only_b=only_b)
  return out


def _row(metric: str, value_a: Any, value_b: Any, n: int, compared: dict[str, Any] | None) -> dict[str, Any]:
  """One metric's line: A, B, the items, and (with per-item or corpus figures) the paired statistics."""
  row = {"a": value_a, "b": value_b, "items": n}
  if compared is None:
    row["difference"] = value_b - value_a if value_a is not None and value_b is not None else None
    row["note"] = "no per-item values: no interval" if metric in NO_ITEMS else "no item measured for both models"
  else:
    row.update(compared)
  return row


def _check_samples(a: list[Sample], b: list[Sample]) -> None:
  if len(a) != len(b):
    raise ValueError(f"the two evaluations answered {len(a)} and {len(b)} items: they must answer the same records")
  for i, (x, y) in enumerate(zip(a, b)):
    if x.task != y.task or x.reference != y.reference:
      raise ValueError(
          f"answered item {i} does not pair: task {x.task!r} / {y.task!r}, "
          f"reference {x.reference[:60]!r} / {y.reference[:60]!r}"
      )


def _paired_choices(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """The items both evaluations ranked, by record: with two tokenizers an item can fit the context in only one."""
  by_record = {c["record"]: c for c in b}
  pairs = [(c, by_record[c["record"]]) for c in a if c["record"] in by_record]
  for x, y in pairs:
    if x["choices"] != y["choices"] or x["gold"] != y["gold"]:
      raise ValueError(f"record {x['record']} has other candidates in the two evaluations")
  return pairs


def _choice_values(metric: str, items: list[dict[str, Any]]) -> np.ndarray:
  if metric == "gold_rank":
    return np.asarray([c["gold_rank"] for c in items], np.float64)
  pick = "pick_norm" if metric == "choice_accuracy_norm" else "pick"
  return np.asarray([c[pick] == c["gold"] for c in items], np.float64)


def _item_scorer(
    answers: Sequence[str], references: Sequence[str], normalization: str
) -> Callable[[str], np.ndarray | None]:
  """metric -> per-item values of these answers (ROUGE scored once for its four figures)."""
  rouge: dict[str, np.ndarray] = {}

  def values(metric: str) -> np.ndarray | None:
    if metric in M.ROUGE_TYPES:
      rouge.update(rouge or M.rouge_per_item(answers, references))
      return rouge[metric]
    return item_values(metric, answers, references, normalization)

  return values


def _check_figure(metric: str, reported: float, recomputed: float) -> None:
  """The items must give back the evaluation's own figure: else they were paired or scored otherwise."""
  if not math.isclose(reported, recomputed, rel_tol=1e-9, abs_tol=1e-9):
    raise ValueError(f"{metric}: the evaluation reports {reported}, its items give {recomputed}")


def _scope(
    metrics_a: dict[str, Any], metrics_b: dict[str, Any], pairs: list[tuple[Sample, Sample]],
    choice_pairs: list[tuple[dict, dict]], ranked: tuple[int, int], *, normalization: str, labels: Sequence[str],
    samples: int, seed: int,
) -> dict[str, dict[str, Any]]:
  """metric -> row, for one task (or all of them) and its paired answers and the ranked items both models
  ranked (of `ranked` = (A's, B's) items: where they differ, the choice figures are those of the common ones)."""
  references = [a.reference for a, _ in pairs]
  answers_a, answers_b = [a.prediction for a, _ in pairs], [b.prediction for _, b in pairs]
  items_a, items_b = (_item_scorer(answers, references, normalization) for answers in (answers_a, answers_b))
  rows = {}
  for metric in [m for m in dict.fromkeys([*metrics_a, *metrics_b]) if m not in _SKIP]:
    value_a, value_b = metrics_a.get(metric), metrics_b.get(metric)
    compared, n = None, 0
    if value_a is None or value_b is None or metric in NO_ITEMS:
      pass
    elif metric in CHOICE_METRICS and choice_pairs:
      n = len(choice_pairs)
      a_n, b_n = (_choice_values(metric, [p[k] for p in choice_pairs]) for k in (0, 1))
      compared = _compare_values(a_n, b_n, metric in BINARY, samples, seed)
      if ranked != (n, n):
        value_a, value_b = float(a_n.mean()), float(b_n.mean())
        compared["note"] = f"on the {n} items both ranked (A ranked {ranked[0]}, B {ranked[1]})"
    elif pairs and metric in CORPUS:
      n = len(pairs)
      score_a = corpus_statistic(metric, answers_a, references, normalization, labels)
      score_b = corpus_statistic(metric, answers_b, references, normalization, labels)
      every = np.arange(n)
      _check_figure(metric, value_a, score_a(every))
      _check_figure(metric, value_b, score_b(every))
      difference = lambda idx_n, a=score_a, b=score_b: b(idx_n) - a(idx_n)  # noqa: E731
      compared = stats.paired_bootstrap(n=n, statistic=difference, samples=samples, seed=seed, confidence=CONFIDENCE)
    elif pairs and (a_n := items_a(metric)) is not None:
      n, b_n = len(pairs), items_b(metric)
      compared = _compare_values(a_n, b_n, metric in BINARY, samples, seed)
    if compared is not None and metric not in CORPUS:
      _check_figure(metric, value_a, float(a_n.mean()))
      _check_figure(metric, value_b, float(b_n.mean()))
    rows[metric] = _row(metric, value_a, value_b, n, compared)
  return rows


def _disagreements(
    pairs: list[tuple[int, Sample, Sample]], normalization: str, limit: int = EXAMPLES
) -> list[dict[str, Any]]:
  """The items whose answers differ most (token F1 of B minus A's, by size), side by side."""
  differ = [
      (i, a, b) for i, a, b in pairs
      if M.normalize_answer(a.prediction, normalization) != M.normalize_answer(b.prediction, normalization)
  ]
  differ.sort(key=lambda t: (-abs(t[2].score - t[1].score), t[0]))
  return [
      {"item": i, "prompt": a.prompt, "prompt_b": b.prompt if b.prompt != a.prompt else None, "reference": a.reference,
       "answer_a": a.prediction, "answer_b": b.prediction, "token_f1_a": a.score, "token_f1_b": b.score}
      for i, a, b in differ[:limit]
  ]


def _picks(item: dict[str, Any], model: str) -> dict[str, Any]:
  return {f"{key}_{model}": item[key] for key in ("pick", "pick_norm", "gold_rank")}


def _overall(metrics: dict[str, float]) -> dict[str, float]:
  """The over-all-tasks figures of one evaluation (eval/accuracy there is next-token accuracy)."""
  top = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.count("/") == 1}
  if "accuracy" in top:
    top["token_accuracy"] = top.pop("accuracy")
  return top


def compare(
    result_a: EvalResult, result_b: EvalResult, *, normalization: str, samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
  """Model B against model A on the same items: {"tasks": {task: {"metrics": {metric: row}, "disagreements"}},
  "all": the same over every task}. A row: a, b, items, difference (B - A), low, high, p_value, and for
  right-or-wrong metrics mcnemar_p with the discordant counts only_a, only_b. "answers" and "choices" pair
  every item's answers and picks, for programs that look further."""
  _check_samples(result_a.samples, result_b.samples)
  choice_pairs = _paired_choices(result_a.choices, result_b.choices)
  indexed = [(i, a, b) for i, (a, b) in enumerate(zip(result_a.samples, result_b.samples))]
  settings = dict(normalization=normalization, samples=samples, seed=seed)
  tasks = {}
  for task, info in result_a.tasks.items():
    mine = [(a, b) for _, a, b in indexed if a.task == task]
    report = info["details"].get("classification_report") or {}
    tasks[task] = {
        "metrics": _scope(
            info["metrics"], result_b.tasks.get(task, {}).get("metrics", {}), mine,
            [p for p in choice_pairs if p[0]["task"] == task],
            tuple(sum(c["task"] == task for c in r.choices) for r in (result_a, result_b)),
            labels=report.get("labels", ()), **settings,
        ),
        "disagreements": _disagreements([t for t in indexed if t[1].task == task], normalization),
    }
  overall = _scope(
      _overall(result_a.metrics), _overall(result_b.metrics), [(a, b) for _, a, b in indexed], choice_pairs,
      (len(result_a.choices), len(result_b.choices)), labels=(), **settings,
  )
  answers = [
      {"item": i, "task": a.task, "reference": a.reference, "a": a.prediction, "b": b.prediction} for i, a, b in indexed
  ]
  ranked = [
      {"record": a["record"], "task": a["task"], "gold": a["gold"], **_picks(a, "a"), **_picks(b, "b")}
      for a, b in choice_pairs
  ]
  return {"bootstrap_samples": samples, "seed": seed, "confidence": CONFIDENCE, "all": overall, "tasks": tasks,
          "answers": answers, "choices": ranked}


# --- written down ------------------------------------------------------------------------------------


def _p(value: float | None, floor: float = 0.001) -> str:
  """A p-value; below `floor` (a bootstrap's 2 / draws: no draw crossed 0) only its bound."""
  return "" if value is None else f"< {floor:.3g}" if value < floor else f"{value:.3f}"


def _signed(value: float | None) -> str:
  return "" if value is None else ("+" if value > 0 else "") + number(value)


def _table(rows: dict[str, dict[str, Any]], samples: int) -> list[str]:
  lines = ["| metric | items | A | B | B - A | 95% interval | p (bootstrap) | p (McNemar: only A / only B right) |",
           "|---|---|---|---|---|---|---|---|"]
  for metric, row in rows.items():
    items = f"{row['items']:,}" + (" (few)" if 0 < row["items"] < stats.FEW_ITEMS else "") if row["items"] else "-"
    interval = " ".join(filter(None, [f"[{_signed(row['low'])}, {_signed(row['high'])}]" if "low" in row else "",
                                      row.get("note", "")]))
    mcnemar = f"{_p(row['mcnemar_p'])} ({row['only_a']} / {row['only_b']})" if "mcnemar_p" in row else ""
    cells = [*("-" if row[k] is None else number(row[k]) for k in ("a", "b")), _signed(row["difference"]), interval,
             _p(row.get("p_value"), 2 / samples), mcnemar]
    lines += [f"| {metric} | {items} | " + " | ".join(cells) + " |"]
  return lines + [""]


def _side_by_side(item: dict[str, Any]) -> list[str]:
  lines = [f"item {item['item']}: token F1 A {item['token_f1_a']:.3f}, B {item['token_f1_b']:.3f}", ""]
  if item["prompt_b"] is None:
    lines += ["prompt:", fence(cut(item["prompt"]))]
  else:
    lines += ["prompt (A's tokenizer):", fence(cut(item["prompt"]))]
    lines += ["prompt (B's tokenizer):", fence(cut(item["prompt_b"]))]
  lines += ["reference:", fence(cut(item["reference"])), "A's answer:", fence(cut(item["answer_a"])),
            "B's answer:", fence(cut(item["answer_b"])), ""]
  return lines


def write_comparison(comparison: dict[str, Any], folder: str | pathlib.Path, *, about: dict[str, Any]) -> pathlib.Path:
  """Writes compare.md and compare.json into `folder`; returns compare.md's path."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  text = json.dumps({"about": about, **comparison}, indent=1, ensure_ascii=False, allow_nan=True)
  atomic_write_text(folder / COMPARE_JSON, text + "\n")
  lines = ["# Comparison: B - A", ""] + [f"- {k}: {cell(v)}" for k, v in about.items()]
  lines += [
      f"- B - A with its paired-bootstrap {comparison['confidence']:.0%} interval ({comparison['bootstrap_samples']:,} "
      f"draws of the items, seed {comparison['seed']}) and two-sided p-value; McNemar's exact test where an item is "
      "right or wrong",
      f"- (few): fewer than {stats.FEW_ITEMS} items, a figure to read with care", "",
      f"## {ALL}", "",
  ]
  lines += _table(comparison["all"], comparison["bootstrap_samples"])
  for task, info in comparison["tasks"].items():
    lines += [f"## {task}", ""] + _table(info["metrics"], comparison["bootstrap_samples"])
    if info["disagreements"]:
      lines += ["### Where they disagree most", ""]
      for item in info["disagreements"]:
        lines += _side_by_side(item)
  path = folder / COMPARE_MD
  atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
  return path
