"""How sure a figure is: confidence intervals over the evaluated items, and paired tests of two models.

Every figure of an evaluation rests on a sample of items; these say how far it could move on another
sample of the same size. Proportions (exact match, accuracy) get Wilson's score interval; any other
figure a percentile bootstrap over items: the items are drawn with replacement `samples` times (a seeded
generator, so a report is reproducible) and the figure recomputed on each draw.

    wilson_interval(12, 16)                       -> (0.505, 0.898)     12 of 16 right: 0.75, give or take
    bootstrap_interval(np.array([0., 1., 1., 1.]))  the mean 0.75's interval, (0.25, 1.0)
    bootstrap_interval(n=16, statistic=lambda idx_n: corpus_bleu(hyps[idx_n], refs[idx_n]))
    paired_bootstrap(a_n, b_n)                    -> {"difference": mean(b - a), "low", "high", "p_value"}
    mcnemar_exact(b=9, c=2)                       -> 0.065              9 items only A got right, 2 only B

A figure from fewer than FEW_ITEMS items is marked as such wherever it is shown.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import numpy as np

FEW_ITEMS = 30  # a figure from fewer items is marked as such
_DRAWS_PER_CHUNK = 1 << 22  # item indices drawn at once: bounds the memory of a bootstrap over many items


def _check_confidence(confidence: float) -> None:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson's score interval of the proportion successes / n (no continuity correction), as
  scipy.stats.binomtest(successes, n).proportion_ci(method="wilson"): 0 successes give low 0.0, n give high 1.0.

  Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or n successes:
  wilson_interval(16, 16) == (0.806, 1.0), so even a perfect score on 16 items could be 81% on others."""
  _check_confidence(confidence)
  if n < 1 or not 0 <= successes <= n:
    raise ValueError(f"a proportion needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  p = successes / n
  denom = 2 * (n + z * z)
  center = (2 * n * p + z * z) / denom
  delta = z / denom * math.sqrt(4 * n * p * (1 - p) + z * z)
  low = 0.0 if successes == 0 else center - delta
  high = 1.0 if successes == n else center + delta
  return low, high


def _resample_means(n: int, samples: int, seed: int, columns_nk: np.ndarray | None, statistic) -> np.ndarray:
  """(samples, k) figures of `samples` draws of n item indices with replacement: the means of `columns_nk`
  (vectorised, in chunks) or `statistic(indices_n)` per draw. The draws depend only on (n, samples, seed)."""
  rng = np.random.default_rng(seed)
  chunk = max(1, _DRAWS_PER_CHUNK // n)
  out = []
  for start in range(0, samples, chunk):
    idx_sn = rng.integers(0, n, size=(min(chunk, samples - start), n))
    if statistic is None:
      out.append(columns_nk[idx_sn].mean(axis=1))
    else:
      out.append(np.asarray([[float(statistic(idx_n))] for idx_n in idx_sn], np.float64))
  figures_sk = np.concatenate(out)
  if not np.isfinite(figures_sk).all():
    raise ValueError("the statistic is not finite on a resample of the items")
  return figures_sk


def _setup(values: list[np.ndarray | None], n: int | None, statistic, samples: int, confidence: float):
  """(n, columns (n, k) or None) of a bootstrap given per-item values or n and a statistic."""
  _check_confidence(confidence)
  if samples < 1:
    raise ValueError(f"a bootstrap needs samples >= 1, got {samples}")
  if statistic is not None:
    if any(v is not None for v in values) or n is None:
      raise ValueError("pass either per-item values, or n and a statistic of item indices")
    if n < 1:
      raise ValueError(f"a bootstrap needs at least one item, got n={n}")
    return int(n), None
  if any(v is None for v in values):
    raise ValueError("pass either per-item values, or n and a statistic of item indices")
  columns = [np.asarray(v, np.float64).reshape(-1) for v in values]
  if len({len(c) for c in columns}) != 1:
    raise ValueError(f"paired values differ in length: {[len(c) for c in columns]}")
  if not len(columns[0]):
    raise ValueError("a bootstrap needs at least one item, got none")
  if n is not None and n != len(columns[0]):
    raise ValueError(f"n={n} but {len(columns[0])} values")
  if not all(np.isfinite(c).all() for c in columns):
    raise ValueError("per-item values must be finite")
  return len(columns[0]), np.stack(columns, axis=1)


def _finite(estimate: float) -> float:
  if not math.isfinite(estimate):
    raise ValueError(f"the statistic is not finite on the items: {estimate}")
  return estimate


def _percentiles(figures_s: np.ndarray, estimate: float, confidence: float) -> tuple[float, float]:
  """The percentile interval (numpy's linear interpolation, as scipy.stats.bootstrap), widened to hold the
  estimate itself where it falls outside: a skewed or biased figure (corpus BLEU on a few items) can."""
  tail = (1 - confidence) / 2
  low, high = np.percentile(figures_s, [100 * tail, 100 * (1 - tail)])
  return min(float(low), estimate), max(float(high), estimate)


def bootstrap_interval(
    values_n: np.ndarray | None = None,
    *,
    n: int | None = None,
    statistic: Callable[[np.ndarray], float] | None = None,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
  """Percentile bootstrap interval over items: of the mean of the per-item values `values_n`, or of
  `statistic(indices_n)` recomputed on each draw of n item indices (a corpus-level figure: BLEU, chrF,
  macro-F1). The interval always holds the figure on every item (the mean, or statistic(arange(n))).

  Worked example: bootstrap_interval(np.array([0., 1., 1., 1.])) == (0.25, 1.0): a draw of four items
  holds 0 to 4 ones."""
  n, columns_nk = _setup([values_n] if statistic is None else [None], n, statistic, samples, confidence)
  if statistic is None:
    estimate = float(columns_nk[:, 0].mean())
  else:
    estimate = _finite(float(statistic(np.arange(n))))
  figures_s = _resample_means(n, samples, seed, columns_nk, statistic)[:, 0]
  return _percentiles(figures_s, estimate, confidence)


def paired_bootstrap(
    a_n: np.ndarray | None = None,
    b_n: np.ndarray | None = None,
    *,
    n: int | None = None,
    statistic: Callable[[np.ndarray], float] | None = None,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
  """B minus A on the same items: {"difference", "low", "high", "p_value"}. The same draws of item indices
  score both, so what the items share (hard ones, easy ones) cancels out. With per-item values the
  difference is mean(b_n) - mean(a_n); with `statistic(indices_n)` it is whatever that returns (B's corpus
  figure minus A's on those items).

  p_value is two-sided: twice the share of draws whose difference lies on the other side of 0 from the
  observed one (0 itself included), at most 1; a difference of exactly 0 has p_value 1.0. 0.0 means no draw
  of `samples` crossed 0: p < 2 / samples, not p = 0.

  Worked example: a_n = [0, 0, 1, 1], b_n = [1, 1, 1, 1]: difference 0.5; a draw holding none of the first
  two items (1 in 16) differs by 0, so p_value is about 2 / 16."""
  n, columns_nk = _setup([a_n, b_n] if statistic is None else [None, None], n, statistic, samples, confidence)
  if statistic is None:
    difference = float(columns_nk[:, 1].mean() - columns_nk[:, 0].mean())
    figures_sk = _resample_means(n, samples, seed, columns_nk, None)
    figures_s = figures_sk[:, 1] - figures_sk[:, 0]
  else:
    difference = _finite(float(statistic(np.arange(n))))
    figures_s = _resample_means(n, samples, seed, None, statistic)[:, 0]
  low, high = _percentiles(figures_s, difference, confidence)
  if difference == 0:
    p_value = 1.0
  else:
    crossed = figures_s <= 0 if difference > 0 else figures_s >= 0
    p_value = min(1.0, 2 * float(np.mean(crossed)))
  return {"difference": difference, "low": low, "high": high, "p_value": p_value}


def mcnemar_exact(b: int, c: int) -> float:
  """McNemar's exact test of two models on the same items: b items only the first got right, c only the
  second. Two-sided p-value of b under Binomial(b + c, 1/2), as scipy.stats.binomtest(b, b + c).pvalue;
  1.0 when there is no discordant item. Computed in exact integers.

  Worked example: mcnemar_exact(9, 2) == 2 * (1 + 11 + 55) / 2**11 == 0.0654."""
  if b < 0 or c < 0:
    raise ValueError(f"discordant counts are >= 0, got b={b}, c={c}")
  b, c = int(b), int(c)
  total, k = b + c, min(b, c)
  if k * 2 == total:
    return 1.0
  term, tail = 1, 1  # comb(total, 0), and the running sum of comb(total, i) for i <= k
  for i in range(k):
    term = term * (total - i) // (i + 1)
    tail += term
  return min(1.0, 2 * tail / 2**total)
