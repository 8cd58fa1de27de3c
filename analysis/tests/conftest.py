"""Fixtures: real run.h5 files from the dsrsq binary (once per session) and synthetic ones."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ANALYSIS = os.path.dirname(HERE)
SOURCE_DIR = os.environ.get("DSRSQ_SOURCE_DIR", os.path.dirname(ANALYSIS))
REPORT = os.path.join(ANALYSIS, "report.py")

sys.path.insert(0, ANALYSIS)
sys.path.insert(0, HERE)

TINY = ["--d_model", "32", "--n_heads", "2", "--n_layers", "1", "--d_ff", "64", "--steps", "20", "--batch_size", "4",
        "--num_train", "64", "--num_val", "8", "--num_test", "10", "--context_sizes", "64", "96",
        "--max_seq_len", "160", "--max_new_tokens", "8", "--val_every", "10", "--log_every", "10",
        "--checkpoint_every", "10", "--threads", "1", "--methods", "full", "sliding_window"]

# name -> extra options; 'tiny' and 'seed2' are seed replicates, 'tiny' and 'b25' a KV-budget sweep.
RUNS = {"tiny": [], "seed2": ["--seed", "2"], "b25": ["--kv_budget", "0.25"], "fs": ["--dataset", "fact_stream"]}


def _find_binary():
    b = os.environ.get("DSRSQ_BIN")
    if b:
        return b
    for d in ("build-report", "build", "build-tests"):
        p = os.path.join(SOURCE_DIR, d, "dsrsq")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory):
    """Runs the dsrsq binary at a tiny size; {name: path to run.h5}."""
    binary = _find_binary()
    if not binary:
        pytest.skip("dsrsq binary not found: set DSRSQ_BIN (ctest does)")
    out = tmp_path_factory.mktemp("dsrsq_runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    procs = {}
    for name, extra in RUNS.items():
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([binary, "--output_dir", str(out), "--run_name", name] + TINY + extra,
                                        cwd=SOURCE_DIR, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    paths = {}
    for name, (p, log) in procs.items():
        rc = p.wait(timeout=300)
        log.close()
        if rc != 0:
            raise RuntimeError(f"dsrsq run {name} failed ({rc}):\n" + (out / f"{name}.log").read_text()[-3000:])
        paths[name] = str(out / name / "run.h5")
    return paths


def run_report(*args, timeout=240):
    """Runs analysis/report.py in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, REPORT] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def copy_run(tmp_path):
    """Copies a run.h5 to a fresh file (to modify it)."""
    def _copy(src, name="run.h5"):
        d = tmp_path / os.path.basename(os.path.dirname(src)) / name.replace(".h5", "")
        d.mkdir(parents=True, exist_ok=True)
        dst = d / "run.h5"
        shutil.copy(src, dst)
        return str(dst)
    return _copy
