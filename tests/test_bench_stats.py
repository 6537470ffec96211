"""The benchmarks' verdicts: the sign-test interval of a median, and what the rounds of bench/serving.py show."""

from __future__ import annotations

import math
import random

import pytest

from bench.common import median_interval
from bench.serving import round_verdict


def binomial_miss(n: int, k: int) -> float:
    """P(the true median is outside [x(k), x(n-k+1)]) for n draws of a continuous distribution."""
    return 2 * sum(math.comb(n, i) for i in range(k)) / (1 << n)


@pytest.mark.parametrize(("n", "k"), [(5, 1), (6, 1), (8, 2), (10, 2), (12, 3), (16, 5), (20, 6)])
def test_the_interval_is_the_narrowest_order_statistics_with_90_percent(n: int, k: int) -> None:
    values = [float(v) for v in range(100, 100 + n)]
    random.Random(n).shuffle(values)
    got = median_interval(values)
    assert got is not None
    assert (got.low, got.high) == (100 + k - 1, 100 + n - k)
    assert got.coverage == round(1 - binomial_miss(n, k), 3)
    assert got.coverage >= 0.9 > 1 - binomial_miss(n, k + 1)


def test_too_few_values_give_the_whole_range_and_its_lower_coverage() -> None:
    got = median_interval([3.0, 1.0, 2.0])
    assert got is not None
    assert (got.low, got.median, got.high, got.coverage) == (1.0, 2.0, 3.0, 0.75)
    assert median_interval([]) is None
    even = median_interval([4.0, 1.0])
    assert even is not None and even.median == 2.5


def test_the_interval_holds_the_median_as_often_as_it_says() -> None:
    # Skewed draws (an exponential, true median ln 2): the coverage claimed holds without a shape assumption.
    rng = random.Random(7)
    hits = 0
    trials = 4000
    for _ in range(trials):
        got = median_interval([rng.expovariate(1.0) for _ in range(12)])
        assert got is not None
        hits += got.low <= math.log(2) <= got.high
    assert hits / trials == pytest.approx(1 - binomial_miss(12, 3), abs=0.015)


def test_rounds_inside_both_targets_meet_them() -> None:
    v = round_verdict([0.97, 0.99, 1.01, 0.98, 1.0, 0.96], [2.0, -3.0, 4.5, 1.0, 8.0, -1.0])
    assert v["verdict"] == "met"
    assert v["round_added_interval_ms"] == [-3.0, 8.0]
    assert v["round_ratio_interval"] == [0.96, 1.01]


@pytest.mark.parametrize(("ratios", "added"), [
    ([0.97, 0.99, 1.01, 0.98, 1.0, 0.96], [12.0, 10.0, 30.0, 11.0, 15.0, 10.5]),  # every round adds >= 10 ms
    ([0.90, 0.93, 0.94, 0.91, 0.92, 0.89], [2.0, -3.0, 4.5, 1.0, 8.0, -1.0]),  # every round below 0.95
])
def test_rounds_wholly_outside_a_target_miss_it(ratios: list[float], added: list[float]) -> None:
    assert round_verdict(ratios, added)["verdict"] == "missed"


def test_rounds_that_straddle_a_target_are_undecided() -> None:
    # The seventh session's one-stream rounds, pooled from its three runs (bench/RESULTS.md).
    ratios = [0.925, 0.929, 0.954, 0.909, 0.984, 1.016, 0.985, 1.016, 1.008, 1.024, 1.101, 1.008]
    added = [20.3, 15.2, 13.6, 30.8, 7.3, -3.5, 6.5, 2.9, 1.4, -2.8, -15.3, -1.6]
    v = round_verdict(ratios, added)
    assert v["verdict"] == "undecided"
    assert v["round_added_median_ms"] == 4.7
    assert v["round_added_interval_ms"] == [-2.8, 15.2]
    assert round_verdict([], []) == {}


def test_fewer_than_five_rounds_give_no_verdict() -> None:
    # Four rounds well inside both targets: the widest interval (the whole range) covers 87.5% only.
    v = round_verdict([0.99, 1.0, 0.98, 1.01], [1.0, 2.0, -1.0, 0.5])
    assert v["verdict"] == "too few rounds"
    assert v["interval_coverage"] == 0.875
    assert round_verdict([0.99, 1.0, 0.98, 1.01, 0.97], [1.0, 2.0, -1.0, 0.5, 0.0])["verdict"] == "met"
