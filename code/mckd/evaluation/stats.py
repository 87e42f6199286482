"""Paired comparisons with their noise: the difference of two methods over shared seeds.

Two runs with the same training seed share their data order and initialisation, so the noise of
a comparison is the spread of the per-seed differences ``d_i = a_i - b_i``, not of each method's
scores. With ``n`` seeds, mean ``d``, sample standard deviation ``s``:

* 95% interval: ``d ± t_{0.975, n-1} · s / sqrt(n)`` (Student's t);
* smallest effect the design detects (two-sided test at level 0.05 with power 0.8):
  ``(t_{0.975, n-1} + t_{0.8, n-1}) · s / sqrt(n)``.

A method "beats" another only where the interval excludes 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from mckd.evaluation.results import mean_std


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference ``a - b`` with its ``level`` interval over ``n`` pairs."""

    mean: float
    lo: float
    hi: float
    sd: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def format(self, digits: int = 2) -> str:
        """``+1.23 [+0.45, +2.01]``; ``*`` marks an interval that excludes 0."""
        f = f"{{:+.{digits}f}}"
        mark = "*" if self.excludes_zero else ""
        return f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]{mark}"


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of ``a[i] - b[i]`` with its t interval (``nan`` bounds for fewer than 2 pairs).

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists (got {len(a)} "
                         f"and {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    m, s = mean_std(d)
    n = len(d)
    if n < 2:
        return PairedDifference(m, math.nan, math.nan, math.nan, n, level)
    half = t_quantile(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return PairedDifference(m, m - half, m + half, s, n, level)


def detectable_effect(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true mean difference a paired t-test over ``n`` pairs with difference standard
    deviation ``sd`` detects at ``level`` with probability ``power`` (normal-shift approximation
    with t quantiles)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
