"""The statistics of sft/evaluator/stats.py checked against scipy: Wilson's interval and McNemar's exact
test to the last digits, the bootstrap by its properties and against scipy.stats.bootstrap on many items
(the two draw different resamples, so they agree only within the Monte Carlo error)."""

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.evaluator import stats


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), share=st.floats(0, 1), confidence=st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_wilson_interval_is_scipys(n, share, confidence):
  k = round(share * n)
  want = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
  low, high = stats.wilson_interval(k, n, confidence)
  assert low == pytest.approx(want.low, abs=1e-9) and high == pytest.approx(want.high, abs=1e-9)
  assert 0.0 <= low <= k / n <= high <= 1.0


def test_worked_examples():
  assert stats.wilson_interval(12, 16) == pytest.approx((0.505, 0.898), abs=5e-4)
  assert stats.wilson_interval(16, 16) == pytest.approx((0.806, 1.0), abs=5e-4)
  assert stats.bootstrap_interval(np.array([0.0, 1.0, 1.0, 1.0])) == (0.25, 1.0)
  paired = stats.paired_bootstrap(np.array([0.0, 0, 1, 1]), np.array([1.0, 1, 1, 1]))
  assert paired["difference"] == 0.5 and paired["p_value"] == pytest.approx(2 / 16, abs=0.03)
  assert stats.mcnemar_exact(9, 2) == 2 * (1 + 11 + 55) / 2**11 == pytest.approx(0.0654, abs=1e-4)


@settings(max_examples=300, deadline=None)
@given(b=st.integers(0, 400), c=st.integers(0, 400))
def test_mcnemar_exact_is_scipys_binomial_test(b, c):
  p = stats.mcnemar_exact(b, c)
  if b + c == 0:
    assert p == 1.0
  else:
    assert p == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)
  assert p == stats.mcnemar_exact(c, b)


def test_mcnemar_exact_on_many_items_stays_finite():
  assert 0.0 <= stats.mcnemar_exact(30_000, 20_000) < 1e-100 and stats.mcnemar_exact(25_000, 25_000) == 1.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.integers(0, 2**32))
def test_a_bootstrap_interval_holds_its_estimate_and_is_reproducible(values, seed):
  values_n = np.asarray(values)
  low, high = stats.bootstrap_interval(values_n, samples=200, seed=seed)
  mean = float(values_n.mean())
  assert low <= mean <= high and low >= values_n.min() - 1e-6 * abs(values_n.min()) - 1e-9
  assert (low, high) == stats.bootstrap_interval(values_n, samples=200, seed=seed)


def test_a_statistic_of_indices_sees_the_same_draws_as_the_values():
  values_n = np.random.default_rng(1).normal(size=50)
  by_values = stats.bootstrap_interval(values_n, seed=3)
  by_statistic = stats.bootstrap_interval(n=50, statistic=lambda idx_n: values_n[idx_n].mean(), seed=3)
  assert by_values == pytest.approx(by_statistic, abs=1e-12)
  assert by_values != stats.bootstrap_interval(values_n, seed=4)


def test_the_draws_do_not_depend_on_how_they_are_chunked(monkeypatch):
  values_n = np.random.default_rng(2).uniform(size=40)
  whole = stats.bootstrap_interval(values_n, samples=300)
  monkeypatch.setattr(stats, "_DRAWS_PER_CHUNK", 7 * 40)
  assert stats.bootstrap_interval(values_n, samples=300) == whole


def test_symmetric_data_is_centred_and_more_items_narrow_the_interval():
  widths = []
  for n in (20, 80, 320, 1280):
    values_n = np.tile([-1.0, 1.0], n // 2)
    low, high = stats.bootstrap_interval(values_n, samples=2000)
    assert low < 0.0 < high and abs(low + high) < 0.1 * (high - low)
    widths.append(high - low)
  assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 6


def test_the_bootstrap_agrees_with_scipys_on_many_items():
  values_n = np.random.default_rng(0).exponential(size=3000)
  ours = stats.bootstrap_interval(values_n, samples=4000, seed=0)
  rng = np.random.default_rng(5)
  want = scipy.stats.bootstrap((values_n,), np.mean, n_resamples=4000, method="percentile", rng=rng)
  sd = values_n.std() / np.sqrt(len(values_n))  # about 0.018: the Monte Carlo error is a small share of it
  assert ours == pytest.approx((want.confidence_interval.low, want.confidence_interval.high), abs=0.15 * sd)


def test_a_paired_bootstrap_cancels_what_the_items_share():
  rng = np.random.default_rng(0)
  hardness_n = rng.normal(size=200)
  a_n, b_n = hardness_n, hardness_n + 0.1 + rng.normal(scale=0.05, size=200)  # B better by 0.1 on every item
  out = stats.paired_bootstrap(a_n, b_n)
  assert set(out) == {"difference", "low", "high", "p_value"}
  assert out["low"] <= out["difference"] <= out["high"] and 0.08 < out["low"] and out["high"] < 0.12
  assert out["p_value"] == 0.0  # unpaired, the item spread (sd 1, so +-0.2) would swamp 0.1
  assert stats.paired_bootstrap(a_n, a_n) == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
  by_statistic = stats.paired_bootstrap(n=200, statistic=lambda idx_n: b_n[idx_n].mean() - a_n[idx_n].mean())
  assert by_statistic == pytest.approx(out, abs=1e-12)
  flipped = stats.paired_bootstrap(b_n, a_n)
  assert flipped["difference"] == pytest.approx(-out["difference"]) and flipped["p_value"] == out["p_value"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40), st.integers(0, 100))
def test_a_paired_p_value_is_a_probability_on_the_side_of_the_difference(pairs, seed):
  a_n, b_n = (np.asarray(column, np.float64) for column in zip(*pairs))
  out = stats.paired_bootstrap(a_n, b_n, samples=200, seed=seed)
  assert 0.0 <= out["p_value"] <= 1.0 and out["low"] <= out["difference"] <= out["high"]
  assert out["difference"] == pytest.approx(b_n.mean() - a_n.mean())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: stats.wilson_interval(3, 2), "successes <= n"),
        (lambda: stats.wilson_interval(0, 0), "n >= 1"),
        (lambda: stats.wilson_interval(1, 2, confidence=1.0), "confidence"),
        (lambda: stats.bootstrap_interval(np.array([])), "at least one item"),
        (lambda: stats.bootstrap_interval(np.array([1.0, np.nan])), "finite"),
        (lambda: stats.bootstrap_interval(np.array([1.0]), samples=0), "samples >= 1"),
        (lambda: stats.bootstrap_interval(n=3), "either per-item values"),
        (lambda: stats.bootstrap_interval(np.ones(3), n=4), "n=4 but 3 values"),
        (lambda: stats.paired_bootstrap(np.ones(3), np.ones(4)), "differ in length"),
        (lambda: stats.paired_bootstrap(np.ones(3)), "either per-item values"),
        (lambda: stats.mcnemar_exact(-1, 2), ">= 0"),
        (lambda: stats.bootstrap_interval(n=3, statistic=lambda idx_n: float("nan")), "not finite on the items"),
        (lambda: stats.paired_bootstrap(n=3, statistic=lambda idx_n: 1.0 if len(set(idx_n)) == 3 else math.inf),
         "on a resample"),
    ],
)
def test_bad_input_is_a_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
