"""End-to-end: bench_long_context's accuracy part (issue 13, item 7) scores the dsrsq program's own test split with the
program's own evaluation. On a tiny trained checkpoint the bench and `dsrsq eval` must give every method the same
prediction, F1 and KV bytes on every example; the full cache is the reference of its own row (paired difference 0,
sign-test p 1); an own-weights method without its checkpoint, an unknown method and a training-free --method_init
are refused before anything runs, naming the option."""
import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np

SRC = Path(os.environ.get("DSRSQ_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BIN = Path(os.environ.get("DSRSQ_BIN", SRC / "build" / "dsrsq"))
BENCH = Path(os.environ.get("DSRSQ_BENCH_LONG_CONTEXT", SRC / "build" / "bench" / "bench_long_context"))
TINY = SRC / "configs" / "tiny.ini"
ENV = dict(os.environ, DSRSQ_DATASETS=str(SRC / "datasets"), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
           OMP_WAIT_POLICY="PASSIVE")
METHODS = ["full", "sliding_window", "rag", "pyramid", "rocket_kv"]
SIZES = [64, 128]
PER_SIZE = 3
# tiny.ini's model, and DSRSQ's settings scaled to it (the bench's own DSRSQ defaults are the paper's)
DSRSQ_SMALL = ["--rckv_d_c", "16", "--dsr_d_r", "32", "--sqa_clusters", "4", "--sqa_top_clusters", "2"]
MODEL = ["--d_model", "32", "--n_heads", "2", "--n_layers", "1", "--d_ff", "64", "--threads", "1"]


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def run(cmd, cwd, timeout=240):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def strings(g, name, n):
    end = g[name + "_end"][:n]
    data = g[name + "_bytes"][: int(end[-1])]
    start = np.concatenate([[0], end[:-1]]).astype(np.int64)
    return [bytes(data[s:e]).decode("utf-8", "replace") for s, e in zip(start, end)]


def bench(tmp_path, *args):
    return run([BENCH, *MODEL, "--min_context", SIZES[0], "--max_context", SIZES[-1], "--only-accuracy", *args],
               tmp_path)


def test_bench_accuracy_equals_the_program_on_its_test_split(tmp_path):
    ok(run([BIN, "train", "--config", TINY, "--steps", "20", "--output_dir", tmp_path / "std", "--run_name", "s",
            "--no_report"], tmp_path))
    ckpt = tmp_path / "std" / "s" / "ckpt_20.h5"
    assert ckpt.exists()
    # The program's evaluation: the same checkpoint, sizes, budget and examples per size (its test split of seed 1234).
    ok(run([BIN, "eval", "--config", TINY, "--init_from", ckpt, "--methods", *METHODS, "--kv_budget", "0.5",
            "--eval_context_sizes", *SIZES, "--num_test", PER_SIZE * len(SIZES), "--max_seq_len", "320",
            "--output_dir", tmp_path / "ev", "--run_name", "e", "--no_report"], tmp_path))
    js = tmp_path / "acc.json"
    r = ok(bench(tmp_path, "--init_from", ckpt, "--acc_examples", PER_SIZE, "--acc_methods", *METHODS,
                 "--acc_budget", "0.5", "--max_new_tokens", "8", "--data_seed", "1234", "--acc_json", js))
    rows = {(x["context"], x["method"]): x for x in json.loads(js.read_text())}
    assert len(rows) == len(METHODS) * len(SIZES)
    with h5py.File(tmp_path / "ev" / "e" / "run.h5", "r") as f:
        sizes = f["cells/context_size"][:]
        for m in METHODS:
            g = f["eval"][m]
            n = g["f1"].shape[0]
            assert n == PER_SIZE * len(SIZES), m
            preds = strings(g, "prediction", n)
            cell = g["cell"][:n]
            for size in SIZES:
                want = [i for i in range(n) if sizes[cell[i]] == size]
                got = rows[(size, m)]["examples"]
                assert len(got) == len(want), (m, size)
                for e, i in zip(got, want):
                    assert e["prediction"] == preds[i][:43], (m, size, e["prediction"], preds[i])
                    assert e["f1"] == g["f1"][i], (m, size)
                    assert e["kv_bytes"] == g["kv_resident_bytes"][i], (m, size)
                    assert e["read_bytes"] == g["kv_read_per_step_bytes"][i], (m, size)
    # The printed table: one row per (size, method); the reference's own row differs from it by nothing.
    table = [l.split() for l in r.stdout.splitlines() if l.startswith("  ") and l.split()[1] in METHODS]
    assert len(table) == len(METHODS) * len(SIZES), r.stdout
    for t in table:
        assert t[-1] == "ok", t
        if t[1] == "full":
            assert t[5] in ("+0.000", "-0.000") and t[7] == "1" and t[10] == "1.000" and t[12] == "1.0000", t
    assert "ref = full" in r.stdout


def test_bench_accuracy_refuses_bad_methods(tmp_path):
    r = bench(tmp_path, "--acc_examples", "2", "--acc_methods", "full", "dsrsq")
    assert r.returncode == 2 and "--acc_methods" in r.stderr and "--method_init dsrsq=" in r.stderr, r.stderr
    r = bench(tmp_path, "--acc_examples", "2", "--acc_methods", "full", "nonesuch")
    assert r.returncode == 2 and "--acc_methods" in r.stderr and "nonesuch" in r.stderr, r.stderr
    r = bench(tmp_path, "--acc_examples", "2", "--method_init", "rag=x.h5")
    assert r.returncode == 2 and "--method_init" in r.stderr and "training-free" in r.stderr, r.stderr
    r = bench(tmp_path, "--acc_examples", "2", "--acc_methods", "dsrsq", "--method_init", "dsrsq=missing.h5",
              *DSRSQ_SMALL)
    assert r.returncode != 0 and "--method_init dsrsq=missing.h5" in r.stderr, r.stderr
    r = bench(tmp_path, "--acc_examples", "2", "--protocol", "context_only", "--acc_methods", "rag")
    assert r.returncode == 2 and "context_only" in r.stderr and "rag" in r.stderr, r.stderr
