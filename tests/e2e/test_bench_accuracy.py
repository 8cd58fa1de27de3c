"""End-to-end: bench_long_context's accuracy part (issue 13, item 7) scores the dsrsq program's own test split with the
program's own evaluation. On a tiny trained checkpoint the bench and `dsrsq eval` must give every method the same
prediction, F1 and KV bytes on every example; the full cache is the reference of its own row (paired difference 0,
sign-test p 1). The same holds for the methods on their own trained weights (DSRSQ, GCA, the ATSKV predictor), each
given its checkpoint with --method_init. An own-weights method without its checkpoint, an unknown method and a training-free --method_init
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
MODEL = ["--d_model", "32", "--n_heads", "2", "--d_ff", "64", "--threads", "1"]


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


def same_as_program(rows, h5, methods):
    """Every (size, method) row of the bench's JSON equals the program's run.h5 rows, example by example."""
    with h5py.File(h5, "r") as f:
        sizes = f["cells/context_size"][:]
        for m in methods:
            g = f["eval"][m]
            n = g["f1"].shape[0]
            assert n == PER_SIZE * len(SIZES), m
            preds = strings(g, "prediction", n)
            ids = strings(g, "id", n)
            cell = g["cell"][:n]
            for size in SIZES:
                want = [i for i in range(n) if sizes[cell[i]] == size]
                got = rows[(size, m)]["examples"]
                assert len(got) == len(want), (m, size)
                for e, i in zip(got, want):
                    assert e["id"] == ids[i][:43], (m, size)
                    assert e["prediction"] == preds[i][:43], (m, size, e["prediction"], preds[i])
                    assert e["f1"] == g["f1"][i], (m, size)
                    assert e["kv_bytes"] == g["kv_resident_bytes"][i], (m, size)
                    assert e["read_bytes"] == g["kv_read_per_step_bytes"][i], (m, size)


def bench(tmp_path, *args):
    return run([BENCH, *MODEL, "--n_layers", "1", "--min_context", SIZES[0], "--max_context", SIZES[-1], "--only-accuracy", *args],
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
    same_as_program(rows, tmp_path / "ev" / "e" / "run.h5", METHODS)
    # The printed table: one row per (size, method); the reference's own row differs from it by nothing.
    table = [l.split() for l in r.stdout.splitlines() if l.startswith("  ") and l.split()[1] in METHODS]
    assert len(table) == len(METHODS) * len(SIZES), r.stdout
    for t in table:
        assert t[-1] == "ok", t
        if t[1] == "full":
            assert t[5] in ("+0.000", "-0.000") and t[7] == "1" and t[10] == "1.000" and t[12] == "1.0000", t
    assert "ref = full" in r.stdout


def test_bench_accuracy_own_weights_methods_equal_the_program(tmp_path):
    """DSRSQ, GCA and the ATSKV predictor, each trained a few steps from a tiny 2-layer standard model (GCA needs a
    lower and an upper layer), scored by the bench through --method_init and by `dsrsq eval --model M`."""
    cfg = tmp_path / "tiny2.ini"
    text = TINY.read_text()
    assert "n_layers = 1\n" in text
    cfg.write_text(text.replace("n_layers = 1\n", "n_layers = 2\n"))
    ok(run([BIN, "train", "--config", cfg, "--steps", "6", "--checkpoint_every", "6", "--output_dir", tmp_path / "t",
            "--run_name", "std", "--no_report"], tmp_path))
    std = tmp_path / "t" / "std" / "ckpt_6.h5"
    knobs = {"dsrsq": DSRSQ_SMALL + ["--hof_ramp", "5"], "gca": ["--gca_init", "standard"], "atskv": []}
    inits = []
    for m, k in knobs.items():
        ok(run([BIN, "train", "--config", cfg, "--model", m, "--init_from", std, "--steps", "3", "--checkpoint_every",
                "3", "--output_dir", tmp_path / "t", "--run_name", m, "--no_report", *k], tmp_path))
        ck = tmp_path / "t" / m / "ckpt_3.h5"
        ok(run([BIN, "eval", "--config", cfg, "--model", m, "--init_from", ck, "--methods", m, "--kv_budget", "0.5",
                "--eval_context_sizes", *SIZES, "--num_test", PER_SIZE * len(SIZES), "--max_seq_len", "320",
                "--output_dir", tmp_path / "ev", "--run_name", m, "--no_report", *k], tmp_path))
        inits.append(f"{m}={ck}")
    js = tmp_path / "acc.json"
    r = ok(run([BENCH, *MODEL, "--n_layers", "2", "--min_context", SIZES[0], "--max_context", SIZES[-1], "--only-accuracy",
                "--init_from", std, "--acc_examples", PER_SIZE, "--acc_methods", "full", *knobs,
                "--method_init", *inits, "--acc_budget", "0.5", "--max_new_tokens", "8", "--acc_json", js,
                *DSRSQ_SMALL, "--hof_ramp", "5", "--gca_init", "standard"], tmp_path))
    rows = {(x["context"], x["method"]): x for x in json.loads(js.read_text())}
    for m in knobs:
        same_as_program(rows, tmp_path / "ev" / m / "run.h5", [m])
        assert str(tmp_path / "t" / m / "ckpt_3.h5") in r.stdout
    # A method's settings come from its training run (config.ini beside the checkpoint): one set otherwise on the
    # command line is refused, naming the option and the training's value; so is a model the weights were not
    # trained as (same parameter count, another RoPE base).
    base = [BENCH, *MODEL, "--min_context", SIZES[0], "--max_context", SIZES[-1], "--only-accuracy", "--init_from", std,
            "--acc_examples", "1"]
    r = run([*base, "--n_layers", "2", "--acc_methods", "dsrsq", "--method_init", inits[0], "--rckv_d_c", "8",
             "--dsr_d_r", "32"], tmp_path)
    assert r.returncode != 0 and "--rckv_d_c 8" in r.stderr and "trained with 16" in r.stderr, r.stderr
    r = run([*base, "--n_layers", "2", "--acc_methods", "full", "--rope_theta", "500000"], tmp_path)
    assert r.returncode != 0 and "rope_theta 10000" in r.stderr and "--init_from" in r.stderr, r.stderr


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
