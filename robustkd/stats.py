"""Statistics of the evaluation protocol (docs/methods.md, "Attacks and evaluation"): every
accuracy is a count of correct images out of a total, shown as a percentage with a 95% Wilson
interval; two models evaluated on the same images are compared with an exact McNemar test on
their per-image outcomes.

Plain Python (``math`` only): the figures are small sums, and the exact binomial tail needs
integers, not floats.
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import InputError

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def _check_count(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise InputError(f"a count needs 0 <= correct <= total, found correct={k}, total={n}")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n, as fractions in [0, 1].

    Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps its coverage at the
    small totals and extreme accuracies of a test subset (Wilson 1927; Brown, Cai and DasGupta
    2001). With n = 0 nothing is known: (0, 1).
    """
    _check_count(k, n)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def percent(k: int, n: int, decimals: int = 2) -> float:
    """100 k / n rounded for display (from integers: no float32 noise); NaN when n = 0."""
    _check_count(k, n)
    return round(100.0 * k / n, decimals) if n else float("nan")


def accuracy_record(k: int, n: int, decimals: int = 2) -> dict:
    """{correct, total, percent, ci95_low, ci95_high}: a count, its total, and what is shown
    of them (percentages, rounded to ``decimals``)."""
    low, high = wilson_interval(k, n)
    return {"correct": int(k), "total": int(n), "percent": percent(k, n, decimals),
            "ci95_low": round(100.0 * low, decimals), "ci95_high": round(100.0 * high, decimals)}


def discordant_pairs(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(images only ``a`` gets right, images only ``b`` gets right) of two paired outcome vectors."""
    a, b = [bool(v) for v in a], [bool(v) for v in b]
    if len(a) != len(b):
        raise InputError(f"paired outcomes need the same images: {len(a)} against {len(b)}")
    only_a = sum(1 for u, v in zip(a, b) if u and not v)
    only_b = sum(1 for u, v in zip(a, b) if v and not u)
    return only_a, only_b


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value of two models' per-image outcomes on the same images.

    Only the discordant pairs carry information: under the null hypothesis (equal accuracy)
    each of the n discordant images is won by either model with probability 1/2, so the
    p-value is a two-sided binomial(n, 1/2) test on the smaller count (McNemar 1947; the exact
    form avoids the chi-square approximation, poor at the few discordant pairs of a subset).
    """
    return mcnemar_exact_counts(*discordant_pairs(a, b))


def mcnemar_exact_counts(only_a: int, only_b: int) -> float:
    """The exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    if only_a < 0 or only_b < 0:
        raise InputError(f"discordant counts must be >= 0, found {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integers; one true division at the end


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of a method's figures over seeds (std 0 for one)."""
    values = [float(v) for v in values]
    if not values:
        raise InputError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
