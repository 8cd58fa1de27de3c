"""Robust reading: a damaged, foreign or incomplete file gives one clear error naming file and group."""

import h5py
import numpy as np
import pytest

from conftest import run_report


def _assert_clean_error(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [l for l in res.stderr.strip().splitlines() if l]
    assert len(lines) == 1, res.stderr  # one line
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("group", ["efficiency", "eval/full/summary", "train", "status", "ranks"])
def test_missing_group_names_file_and_group(real_runs, copy_run, tmp_path, group):
    path = copy_run(real_runs["tiny"], "nogroup.h5")
    with h5py.File(path, "r+") as f:
        del f[group]
    res = run_report(path, "-o", tmp_path / "out", "--no-figures")
    _assert_clean_error(res, path, f"'/{group}'", "missing group")


def test_missing_column_names_group_and_dataset(real_runs, copy_run, tmp_path):
    path = copy_run(real_runs["tiny"], "nocol.h5")
    with h5py.File(path, "r+") as f:
        del f["eval/sliding_window/ttft_s"]
    res = run_report(path, "-o", tmp_path / "out", "--no-figures")
    _assert_clean_error(res, path, "/eval/sliding_window", "ttft_s")


def test_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    res = run_report(path, "-o", tmp_path / "out")
    _assert_clean_error(res, str(path), "not a dsrsq results file")


def test_other_schema_version(real_runs, copy_run, tmp_path):
    path = copy_run(real_runs["tiny"], "v4.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = np.int64(4)  # a layout newer than this tool
    res = run_report(path, "-o", tmp_path / "out")
    _assert_clean_error(res, path, "schema_version 4")


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_file(real_runs, tmp_path, keep):
    data = open(real_runs["tiny"], "rb").read()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: int(len(data) * keep)])
    res = run_report(path, "-o", tmp_path / "out", "--no-figures")
    _assert_clean_error(res, str(path))


def test_not_hdf5_and_missing_file(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("not hdf5\n")
    _assert_clean_error(run_report(p, "-o", tmp_path / "out"), str(p), "not an HDF5 file")
    _assert_clean_error(run_report(tmp_path / "nope.h5", "-o", tmp_path / "out"), "nope.h5", "no such file")
