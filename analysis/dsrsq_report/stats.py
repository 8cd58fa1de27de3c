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


# --------------------------------------------------------------------------- sweeps: bootstrap and paired tests
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20261207  # fixed: the same files give the same intervals


def bootstrap_mean_ci(values, samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """(mean, lo, hi): the mean of the finite values and its 95% percentile bootstrap interval from resampling
    the examples with replacement (fixed seed). One value: (v, v, v); none: NaNs."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if a.size == 1:
        return m, m, m
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(samples, a.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return m, float(lo), float(hi)


def paired_bootstrap(a, b, samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED):
    """Paired bootstrap of mean(a - b) over the same examples (rows aligned): (mean difference, lo, hi, p).

    The examples are resampled jointly; lo/hi is the 95% percentile interval of the resampled mean difference
    and p the two-sided bootstrap p-value 2 min(P(d* <= 0), P(d* >= 0)), capped at 1 (p = 1 when every
    difference is 0). Rows where either value is not finite are left out."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: {a.size} against {b.size} values (not the same examples)")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if d.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    m = float(d.mean())
    if d.size == 1 or not np.any(d != 0):
        return m, m, m, 1.0 if not np.any(d != 0) else math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    p = 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return m, float(lo), float(hi), min(1.0, p)


def mcnemar_exact(correct_a, correct_b):
    """Exact McNemar test on paired 0/1 outcomes (EM of method a and b on the same examples).

    Returns (n01, n10, p): n01 = examples only b got right, n10 = only a got right, p = the two-sided exact
    binomial p-value min(1, 2 P(X <= min(n01, n10))), X ~ Binomial(n01 + n10, 1/2); p = 1 with no discordant pair."""
    a = np.asarray(correct_a, dtype=np.float64).ravel() > 0.5
    b = np.asarray(correct_b, dtype=np.float64).ravel() > 0.5
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: {a.size} against {b.size} values (not the same examples)")
    n10 = int(np.sum(a & ~b))
    n01 = int(np.sum(~a & b))
    n = n01 + n10
    if n == 0:
        return n01, n10, 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return n01, n10, min(1.0, 2.0 * tail)
