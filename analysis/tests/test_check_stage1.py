"""scripts/check_stage1.py: the guard between stage 1 and stage 2 of the long model (exit codes and messages on
small HDF5 files with the run.h5 layout's val/loss and val/step)."""
import subprocess
from pathlib import Path

import h5py
import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_stage1.py"


def write_run(path, losses):
    with h5py.File(path, "w") as f:
        f["val/loss"] = np.asarray(losses, dtype=np.float64)
        f["val/step"] = np.arange(1, len(losses) + 1, dtype=np.int64) * 250


def run(*args):
    return subprocess.run(["/usr/bin/python3", str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_learned_passes(tmp_path):
    write_run(tmp_path / "run.h5", [1.88, 1.77, 1.29, 0.97, 0.87, 0.762])
    r = run(tmp_path / "run.h5")
    assert r.returncode == 0, r.stderr
    assert "0.762 at step 1500" in r.stdout


def test_not_learned_fails_with_the_reason(tmp_path):
    # The last loss decides (an early dip does not count), and the message names the file and the loss.
    write_run(tmp_path / "run.h5", [1.80, 1.10, 1.73, 1.60])
    r = run(tmp_path / "run.h5")
    assert r.returncode == 1
    assert "did not learn retrieval" in r.stderr and "1.600 at step 1000" in r.stderr and "run.h5" in r.stderr


def test_threshold_argument(tmp_path):
    write_run(tmp_path / "run.h5", [1.0])
    assert run(tmp_path / "run.h5").returncode == 0
    assert run(tmp_path / "run.h5", 0.9).returncode == 1
    r = run(tmp_path / "run.h5", "x")
    assert r.returncode == 1 and "THRESHOLD must be a number" in r.stderr


def test_unreadable_inputs(tmp_path):
    r = run(tmp_path / "missing.h5")
    assert r.returncode == 1 and "cannot read the validation losses" in r.stderr
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["val/loss"] = np.zeros(0)
        f["val/step"] = np.zeros(0, dtype=np.int64)
    r = run(tmp_path / "empty.h5")
    assert r.returncode == 1 and "holds no validation loss" in r.stderr
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["val/loss"] = np.array([float("nan")])
        f["val/step"] = np.array([250])
    assert run(tmp_path / "nan.h5").returncode == 1  # a NaN loss is not "learned"
