"""Test helpers that read the HDF5 datasets directly with h5py (independently of dsrsq_report)."""

import csv
import math

import h5py
import numpy as np

# t_{0.975, df} for the degrees of freedom the tests meet.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 9: 2.262, 11: 2.201, 19: 2.093}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def row(rows, name, runs=None, key="method"):
    hits = [r for r in rows if r[key] == name and (runs is None or r["runs"] == runs)]
    assert len(hits) == 1, f"expected one row for {name} ({runs}), got {len(hits)}: {rows}"
    return hits[0]


def col(path, group, name):
    with h5py.File(path, "r") as f:
        return np.asarray(f[f"{group}/{name}"][()])


def scalar(path, dsname):
    with h5py.File(path, "r") as f:
        return f[dsname][()]


def mean_half(values):
    a = np.asarray(values, dtype=float)
    n = a.size
    m = float(a.mean())
    if n < 2:
        return m, math.nan, n
    return m, T975[n - 1] * float(a.std(ddof=1)) / math.sqrt(n), n


def close(a, b, rel=1e-9, abs_=1e-12):
    if isinstance(a, str):
        a = float(a) if a else math.nan
    if isinstance(b, str):
        b = float(b) if b else math.nan
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
