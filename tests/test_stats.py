"""Wilson intervals and the exact McNemar test against hand-computed and published values."""

import math

import pytest

from robustkd.errors import InputError
from robustkd.stats import (accuracy_record, discordant_pairs, mcnemar_exact, mcnemar_exact_counts, mean_std,
                            percent, wilson_interval)


@pytest.mark.parametrize("k,n,low,high", [
    (50, 100, 40.38, 59.62),   # p = 1/2: centre 0.5, half-width 1.96/1.0384 * sqrt(0.0025 + 0.000096)
    (0, 10, 0.0, 27.75),       # z^2 / (n + z^2) = 3.8415 / 13.8415
    (10, 10, 72.25, 100.0),    # the mirror image
    (81, 263, 25.53, 36.62),   # Newcombe (1998), Table II, method 3, 81/263: 0.2553-0.3662
])
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (pytest.approx(low, abs=0.01), pytest.approx(high, abs=0.01))


def test_wilson_interval_edges_and_bad_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(3, 7)
    assert 0 < lo < 3 / 7 < hi < 1
    for k, n in ((5, 4), (-1, 4), (0, -1)):
        with pytest.raises(InputError):
            wilson_interval(k, n)


def test_percent_is_rounded_from_integers():
    assert percent(23, 100) == 23.0 and percent(1, 3) == 33.33
    assert math.isnan(percent(0, 0))
    rec = accuracy_record(50, 100)
    assert rec == {"correct": 50, "total": 100, "percent": 50.0, "ci95_low": 40.38, "ci95_high": 59.62}


@pytest.mark.parametrize("b,c,p", [
    (1, 6, 0.125),          # 2 * (1 + 7) / 2^7
    (0, 5, 0.0625),         # 2 / 2^5
    (3, 3, 1.0),            # capped at 1
    (0, 0, 1.0),            # no discordant pair: no evidence
    (2, 12, 0.012939453125),  # 2 * (1 + 14 + 91) / 2^14
])
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact_counts(b, c) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact_counts(c, b) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_mcnemar_from_paired_vectors():
    a = [1, 1, 1, 0, 0, 1, 1, 1]
    b = [1, 0, 0, 0, 1, 0, 0, 0]
    assert discordant_pairs(a, b) == (5, 1)
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 6) / 64)
    assert mcnemar_exact(a, a) == 1.0
    with pytest.raises(InputError):
        mcnemar_exact([1, 0], [1])


def test_mcnemar_large_counts_stay_finite():
    p = mcnemar_exact_counts(4000, 4300)
    assert 0 < p < 0.05


def test_mean_std_over_seeds():
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([50.0, 52.0, 54.0])
    assert mean == 52.0 and std == pytest.approx(2.0)
    with pytest.raises(InputError):
        mean_std([])
