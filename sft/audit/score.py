"""The figures of an audit, from filled reviews (and, without any review, from gold answers in the build).

A record reviewed by several reviewers counts once: by the people's verdict when any person reviewed it
(the majority; an even split leaves it out, counted), else by the machine's; its right label, for label
accuracy, likewise. Then, with N_s the records of stratum s in the build, n_s those reviewed and k_s those
judged "drop":

  precision of a drop reason r   p_r = k_r / n_r                       (a dropped record judged "drop" was bad)
  error rate of a kept stratum h e_h = k_h / n_h                       (a kept record judged "drop" is bad)
  kept error rate                E = sum_h N_h e_h / sum_h N_h          over the kept strata with reviews
  recall of the filters          R = B_removed / (B_removed + B_kept)   the share of bad records the build removed,
                                 B_removed = sum_r N_r p_r, B_kept = sum_h N_h e_h

Proportions get Wilson's 95% interval (sft.evaluator.stats). E and R combine strata: their interval is a seeded
stratified parametric bootstrap, each stratum's rate drawn from Beta(k + 1/2, n - k + 1/2) (Jeffreys), the
figure recomputed per draw, the 2.5th and 97.5th percentiles taken (widened to hold the estimate). Strata
without reviews are left out of E and R; `coverage` says what share of the records the reviewed strata hold.
A build with no dropped record has B_removed = 0 exactly (R = 0 when any kept record is bad), one with no
kept record B_kept = 0 (R = 1 when any dropped record was bad); R is unknown when a side the build has was
not reviewed, or when no record is bad.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
from typing import Any, Sequence

import numpy as np

from sft.audit import data
from sft.audit.judge import MACHINE  # the reviewer name of the judge's rows
from sft.audit.review import Review, Reviews, label_matches

ANNOTATION_KINDS = ("response", "label", "self-instruct")


@dataclasses.dataclass
class Index:
  """What scoring needs of the build, read in one pass."""

  sizes: dict[str, int]  # stratum -> records
  known: dict[str, dict[str, Any]]  # record id -> facts, for the reviewed records
  gold: list[dict[str, Any]]  # facts of every kept annotated record that carries `gold`


def facts_of(record: dict[str, Any]) -> dict[str, Any]:
  turns = [m for m in record.get("messages") or () if isinstance(m, dict) and m.get("role") == "assistant"]
  response = turns[-1].get("content") if turns else None
  return {
      "id": record["id"], "stratum": data.stratum(record), "kept": not data.is_dropped(record),
      "annotated": data.annotation(record), "label": data.label(record), "labels": data.labels(record),
      "response": response if isinstance(response, str) else None, "gold": record.get("gold"),
  }


def index(build: data.Build, wanted: set[str]) -> Index:
  sizes: collections.Counter = collections.Counter()
  known, gold = {}, []
  for record in data.records(build):
    sizes[data.stratum(record)] += 1
    if record["id"] in wanted:
      known[record["id"]] = facts_of(record)
    if "gold" in record and not data.is_dropped(record) and data.annotation(record):
      gold.append(facts_of(record))
  return Index(dict(sorted(sizes.items())), known, gold)


# --- figures --------------------------------------------------------------------------------------


def proportion(k: int, n: int) -> dict[str, Any]:
  """k of n with Wilson's 95% interval (value and bounds None when n is 0)."""
  from sft.evaluator.stats import wilson_interval  # noqa: PLC0415

  if n == 0:
    return {"k": 0, "n": 0, "value": None, "low": None, "high": None}
  low, high = wilson_interval(k, n)
  return {"k": k, "n": n, "value": k / n, "low": low, "high": high}


def _chosen(reviews: Sequence[Review], field: str) -> tuple[dict[str, str], int]:
  """record id -> the answer (`field`: verdict or right_label) it counts with: the people's majority when any
  person gave one (an even split leaves the record out, counted), else the machine's."""
  people, machine = collections.defaultdict(list), {}
  for r in reviews:
    answer = getattr(r, field)
    if answer and r.reviewer == MACHINE:
      machine[r.record_id] = answer
    elif answer:
      people[r.record_id].append(answer)
  out, split = dict(machine), 0
  for record_id, given in people.items():
    counts = collections.Counter(given).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
      out.pop(record_id, None)
      split += 1
    else:
      out[record_id] = counts[0][0]
  return out, split


def _by_stratum(verdict: dict[str, str], known: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int]]:
  """stratum -> (judged drop, reviewed)."""
  counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for record_id, v in verdict.items():
    c = counts[known[record_id]["stratum"]]
    c[0] += v == "drop"
    c[1] += 1
  return {s: (k, n) for s, (k, n) in sorted(counts.items())}


def _beta_draws(strata: Sequence[tuple[int, int]], samples: int, rng: np.random.Generator) -> np.ndarray:
  """(samples, strata) rates, each stratum's from Beta(k + 1/2, n - k + 1/2)."""
  k = np.asarray([s[0] for s in strata], np.float64)
  n = np.asarray([s[1] for s in strata], np.float64)
  return rng.beta(k + 0.5, n - k + 0.5, size=(samples, len(strata)))


def _interval(figures: np.ndarray, estimate: float) -> tuple[float, float]:
  low, high = np.nanpercentile(figures, [2.5, 97.5])
  return min(float(low), estimate), max(float(high), estimate)


def stratified(sizes: dict[str, int], reasons: dict[str, tuple[int, int]], kept: dict[str, tuple[int, int]], samples: int, seed: int) -> dict[str, Any]:
  """The kept error rate E and the filters' recall R (see the module docstring), with their intervals."""
  dropped_total = sum(n for s, n in sizes.items() if s.startswith("dropped: "))
  kept_total = sum(n for s, n in sizes.items() if not s.startswith("dropped: "))
  r_names, h_names = list(reasons), list(kept)
  reviewed_r, reviewed_h = sum(n for _, n in reasons.values()), sum(n for _, n in kept.values())
  n_r = np.asarray([sizes[s] for s in r_names], np.float64)
  n_h = np.asarray([sizes[s] for s in h_names], np.float64)
  p_r = np.asarray([k / n for k, n in reasons.values()], np.float64)
  e_h = np.asarray([k / n for k, n in kept.values()], np.float64)
  out: dict[str, Any] = {
      # n: the reviewed records the figure rests on, for the report's "few items" mark.
      "kept_error": {"value": None, "low": None, "high": None, "n": reviewed_h, "records": int(n_h.sum()), "coverage": _share(n_h.sum(), kept_total)},
      "recall": {"value": None, "low": None, "high": None, "n": reviewed_r + reviewed_h, "removed_bad": None, "kept_bad": None,
                 "coverage_dropped": _share(n_r.sum(), dropped_total), "coverage_kept": _share(n_h.sum(), kept_total)},
  }
  rng = np.random.default_rng(seed)
  draws = _beta_draws([*reasons.values(), *kept.values()], samples, rng)
  draw_r, draw_h = draws[:, : len(r_names)], draws[:, len(r_names) :]
  if h_names:
    estimate = float(n_h @ e_h / n_h.sum())
    low, high = _interval(draw_h @ n_h / n_h.sum(), estimate)
    out["kept_error"].update(value=estimate, low=low, high=high)
  # A side the build lacks holds no bad record, exactly (its sums are 0, its draws all 0); a side it has
  # but nobody reviewed leaves the recall unknown.
  if (r_names or not dropped_total) and (h_names or not kept_total):
    removed, left = float(n_r @ p_r), float(n_h @ e_h)
    out["recall"].update(removed_bad=removed, kept_bad=left)
    if removed + left > 0:
      estimate = removed / (removed + left)
      removed_s, left_s = draw_r @ n_r, draw_h @ n_h
      low, high = _interval(removed_s / (removed_s + left_s), estimate)
      out["recall"].update(value=estimate, low=low, high=high)
  return out


def _share(part: float, whole: float) -> float | None:
  return float(part / whole) if whole else None


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
  """Cohen's kappa of two raters on the same items; None when it is undefined (both gave one and the same
  answer throughout: chance agreement is 1)."""
  cats = sorted(set(a) | set(b))
  code = {c: i for i, c in enumerate(cats)}
  return _kappa_of_codes(np.asarray([code[x] for x in a]), np.asarray([code[x] for x in b]), len(cats))


def _kappa_of_codes(a: np.ndarray, b: np.ndarray, k: int) -> float | None:
  n = len(a)
  observed = float(np.mean(a == b))
  expected = float(np.bincount(a, minlength=k) @ np.bincount(b, minlength=k)) / (n * n)
  return None if expected >= 1.0 else (observed - expected) / (1.0 - expected)


def _kappa_interval(a: Sequence[str], b: Sequence[str], estimate: float, samples: int, seed: int) -> tuple[float, float]:
  cats = sorted(set(a) | set(b))
  code = {c: i for i, c in enumerate(cats)}
  ca, cb = np.asarray([code[x] for x in a]), np.asarray([code[x] for x in b])
  rng = np.random.default_rng(seed)
  figures = []
  for idx in rng.integers(0, len(ca), size=(samples, len(ca))):
    value = _kappa_of_codes(ca[idx], cb[idx], len(cats))
    figures.append(np.nan if value is None else value)
  return _interval(np.asarray(figures), estimate)


def agreement(reviews: Sequence[Review], samples: int, seed: int) -> list[dict[str, Any]]:
  """Per pair of reviewers and per answer (verdict, right_label) they both gave on shared records: raw
  agreement (Wilson) and Cohen's kappa (bootstrap over the shared records)."""
  given: dict[str, dict[str, dict[str, str]]] = {"verdict": collections.defaultdict(dict), "right_label": collections.defaultdict(dict)}
  for r in reviews:
    for what in given:
      if getattr(r, what):
        given[what][r.reviewer][r.record_id] = getattr(r, what)
  rows = []
  for what, by_reviewer in given.items():
    for first, second in itertools.combinations(sorted(by_reviewer), 2):
      shared = sorted(set(by_reviewer[first]) & set(by_reviewer[second]))
      if not shared:
        continue
      a, b = [by_reviewer[first][i] for i in shared], [by_reviewer[second][i] for i in shared]
      kappa = cohen_kappa(a, b)
      low, high = (None, None) if kappa is None else _kappa_interval(a, b, kappa, samples, seed)
      rows.append({
          "what": what, "a": first, "b": second, "machine": MACHINE in (first, second),
          "agreement": proportion(sum(x == y for x, y in zip(a, b)), len(shared)),
          "kappa": {"value": kappa, "low": low, "high": high, "n": len(shared)},
      })
  return rows


def _label_report(predictions: list[str], references: list[str], label_sets: list[list[str] | None]) -> dict[str, Any] | None:
  from sft.evaluator.metrics import classification_report  # noqa: PLC0415

  labels = sorted({x for s in label_sets if s for x in s} | set(references))
  try:
    return classification_report(predictions, references, labels=labels)
  except ValueError as err:  # labels that collide once normalised: the figures would mislead
    return {"error": str(err)}


def _same_label(answer: str, reference: str, labels: Sequence[str] | None) -> bool:
  """`answer` and `reference` name one and the same label of `labels` (review.label_matches), or, when
  `reference` names none of them (no set, a gold answer outside it), `answer` names `reference`. "+" is never
  "-", though SQuAD normalisation makes both ""."""
  choices = labels if labels and label_matches(reference, labels) else [reference]
  named = label_matches(answer, choices)
  return len(named) == 1 and named == label_matches(reference, choices)


def annotation_accuracy(verdict: dict[str, str], labels_given: dict[str, str], known: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """Per annotation kind, of the kept records a model annotated: a response or self-instruct record is right
  when judged "keep"; a label when the right label reviewers gave is the record's label (with the full
  classification report). Labelled records no model annotated are scored too, as "source label"."""
  rows = []
  for kind in ANNOTATION_KINDS:
    if kind == "label":
      continue
    judged = [v for i, v in verdict.items() if known[i]["kept"] and known[i]["annotated"] == kind]
    if judged:
      rows.append({"kind": kind, "judged_by": "verdict keep", **proportion(judged.count("keep"), len(judged))})
  for kind, name in (("label", "label"), (None, "source label")):
    ids = [i for i in sorted(labels_given) if known[i]["kept"] and known[i]["annotated"] == kind and known[i]["label"] is not None]
    if ids:
      predictions, references = [known[i]["label"] for i in ids], [labels_given[i] for i in ids]
      right = sum(_same_label(p, r, known[i]["labels"]) for p, r, i in zip(predictions, references, ids))
      rows.append({
          "kind": name, "judged_by": "right_label", **proportion(right, len(ids)),
          "classification": _label_report(predictions, references, [known[i]["labels"] for i in ids]),
      })
  return rows


def _gold_answers(gold: Any) -> list[str] | None:
  """The acceptable answers a gold value gives (a text, a number, or a list of them), None for another value."""
  items = gold if isinstance(gold, list) else [gold]
  if not items or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in items):
    return None
  return [str(x) for x in items]


def gold_accuracy(gold: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per annotation kind, of every kept annotated record with a gold answer: the label (or the response,
  for the other kinds) equal to one of the gold answers, as `_same_label` compares them (a label within its
  record's label set, a response as text: equal ignoring case, or after SQuAD normalisation)."""
  by_kind: dict[str, list[tuple[str, list[str], dict]]] = collections.defaultdict(list)  # kind -> (answer, gold answers, facts)
  unusable = collections.Counter()
  for f in gold:
    answers = _gold_answers(f["gold"])
    answer = f["label"] if f["annotated"] == "label" else f["response"]
    if answers is None or answer is None:
      unusable["gold is no text, number or list of them" if answers is None else "no answer to compare"] += 1
      continue
    by_kind[f["annotated"]].append((answer, answers, f))
  rows = []
  for kind, items in sorted(by_kind.items()):
    # A label is compared within its record's label set, a response as text.
    matched = [next((g for g in answers if _same_label(a, g, f["labels"] if kind == "label" else None)), None) for a, answers, f in items]
    row = {"kind": kind, **proportion(sum(g is not None for g in matched), len(items))}
    if kind == "label":
      references = [answers[0] if g is None else g for g, (_, answers, _) in zip(matched, items)]
      row["classification"] = _label_report([a for a, _, _ in items], references, [f["labels"] for _, _, f in items])
    rows.append(row)
  return {"kinds": rows, "unusable": dict(unusable)}


def score(idx: Index, reviews: Reviews, samples: int, seed: int) -> dict[str, Any]:
  """Every figure of the audit, JSON-ready."""
  verdict, split = _chosen(reviews.reviews, "verdict")
  labels_given, label_split = _chosen(reviews.reviews, "right_label")
  counts = _by_stratum(verdict, idx.known)
  reasons = {s: c for s, c in counts.items() if s.startswith("dropped: ")}
  kept = {s: c for s, c in counts.items() if not s.startswith("dropped: ")}
  combined = stratified(idx.sizes, reasons, kept, samples, seed)
  return {
      "reviews": {
          "files": reviews.files, "used": len(reviews.reviews), "unfilled": reviews.unfilled, "records": len(verdict),
          "split_evenly": split, "label_split_evenly": label_split, "rejected": reviews.rejected,
          "rejected_by_reason": dict(collections.Counter(_reason_kind(r["reason"]) for r in reviews.rejected).most_common()),
          "reviewers": sorted({r.reviewer for r in reviews.reviews}),
      },
      "strata": idx.sizes,
      "drop_precision": [
          {"stratum": s, "size": idx.sizes[s], **proportion(k, n)} for s, (k, n) in reasons.items()
      ],
      "kept_error": {
          "strata": [{"stratum": s, "size": idx.sizes[s], **proportion(k, n)} for s, (k, n) in kept.items()],
          "overall": combined["kept_error"],
      },
      "recall": combined["recall"],
      "annotation_accuracy": annotation_accuracy(verdict, labels_given, idx.known),
      "agreement": agreement(reviews.reviews, samples, seed),
      "gold": gold_accuracy(idx.gold),
  }


def _reason_kind(reason: str) -> str:
  """A rejection's reason without its particulars: "verdict 'maybe' is not keep or drop" -> "verdict ... is not keep or drop"."""
  return re.sub(r"'[^']*'|\"[^\"]*\"|\b\d+\b|\(first at [^)]*\)|R[0-9a-f]{12}", "…", reason)[:80]
