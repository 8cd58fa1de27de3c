"""Means with 95% intervals (Student t; no SciPy needed)."""

import math

import numpy as np

# Two-sided 95% Student t quantiles t_{0.975, df}.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df):
    """t quantile for a two-sided 95% interval with df degrees of freedom."""
    if df < 1:
        return math.nan
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    for lo, hi in zip(keys, keys[1:]):
        if lo < df < hi:  # interpolate in 1/df, accurate to ~1e-3
            w = (1 / df - 1 / hi) / (1 / lo - 1 / hi)
            return _T975[hi] + w * (_T975[lo] - _T975[hi])
    return 1.960 + (1.980 - 1.960) * 120 / df


class Estimate:
    """mean, 95% half-width (NaN when n < 2) and n of the finite values."""

    __slots__ = ("mean", "half", "n")

    def __init__(self, mean, half, n):
        self.mean, self.half, self.n = mean, half, n

    @property
    def lo(self):
        return self.mean - self.half if self.half == self.half else self.mean

    @property
    def hi(self):
        return self.mean + self.half if self.half == self.half else self.mean

    def __repr__(self):
        return f"Estimate({self.mean!r}, ±{self.half!r}, n={self.n})"


def mean_ci(values):
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    n = int(a.size)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    m = float(a.mean())
    if n < 2:
        return Estimate(m, math.nan, 1)
    sd = float(a.std(ddof=1))
    return Estimate(m, t975(n - 1) * sd / math.sqrt(n), n)
