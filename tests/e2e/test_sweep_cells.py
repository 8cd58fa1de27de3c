"""End-to-end: a run with several KV budgets and eval context sizes writes one row group per cell (issue 12,
item 4). Runs the binary (DSRSQ_BIN) on configs/tiny.ini in temporary folders and reads run.h5 with h5py
(layout: results/README.md, schema 3)."""
import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

SRC = Path(os.environ.get("DSRSQ_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BIN = Path(os.environ.get("DSRSQ_BIN", SRC / "build" / "dsrsq"))
TINY = SRC / "configs" / "tiny.ini"
ENV = dict(os.environ, DSRSQ_DATASETS=str(SRC / "datasets"), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
           OMP_WAIT_POLICY="PASSIVE")
METHODS = ["full", "sliding_window"]



def run(tmp_path, *extra, name="r"):
    argv = [str(BIN), "--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--run_name", name,
            "--no_report"] + [str(x) for x in extra]
    return subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)


def strings(g, name):
    end = g[name + "_end"][:]
    data = g[name + "_bytes"][: int(end[-1])] if end.size else np.zeros(0, np.uint8)
    start = np.concatenate([[0], end[:-1]]).astype(np.int64)
    return [bytes(data[s:e]).decode() for s, e in zip(start, end)]


def test_two_budgets_two_sizes_write_four_cells_per_method_on_the_same_examples(tmp_path):
    r = run(tmp_path, "--methods", *METHODS, "--kv_budget", "0.5", "0.25", "--eval_context_sizes", "64", "96",
            "--num_test", "4", "--steps", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with h5py.File(tmp_path / "out" / "r" / "run.h5", "r") as f:
        assert int(f.attrs["schema_version"]) == 3
        cells = f["cells"]
        sizes = cells["context_size"][:].tolist()
        budgets = cells.attrs["kv_budget"].split() if isinstance(cells.attrs["kv_budget"], str) else \
            cells.attrs["kv_budget"].decode().split()
        # Context size major, budget minor.
        assert list(zip(sizes, budgets)) == [(64, "0.5"), (64, "0.25"), (96, "0.5"), (96, "0.25")]
        assert cells["kv_budget_fraction"][:].tolist() == [0.5, 0.25, 0.5, 0.25]
        assert cells["kv_budget_bytes"][:].tolist() == [-1] * 4
        ids = {}
        for m in METHODS:
            g = f[f"eval/{m}"]
            cell = g["cell"][:]
            assert sorted(set(cell.tolist())) == [0, 1, 2, 3]
            assert np.all(np.diff(cell) >= 0)  # one contiguous row group per cell, in cell order
            id_ = strings(g, "id")
            meta = [json.loads(s) for s in strings(g, "meta")]
            req = g["kv_budget_requested_bytes"][:]
            for k in range(4):
                rows = np.nonzero(cell == k)[0]
                assert rows.size == 2  # 4 test examples over 2 sizes
                assert {int(meta[i]["context_size"]) for i in rows} == {sizes[k]}
                ids[(m, k)] = [id_[i] for i in rows]
                st = f[f"eval/{m}/cells/{k}/state"][()].rstrip(b"\0").decode()
                assert st == "done"
                assert int(f[f"eval/{m}/cells/{k}/summary/n_examples"][()]) == 2
                assert float(f[f"eval/{m}/cells/{k}/efficiency/serve_s"][()]) > 0
            # Same examples at both budgets; the requested bytes halve with the budget (same prompts).
            for k in (0, 2):
                assert ids[(m, k)] == ids[(m, k + 1)]
                a, b = req[cell == k], req[cell == k + 1]
                assert np.all(b < a) and np.all(np.abs(b * 2 - a) <= 2)
            assert int(f[f"eval/{m}/summary/n_examples"][()]) == 8
        for k in range(4):  # the same examples across methods
            assert ids[("full", k)] == ids[("sliding_window", k)]
        assert set(ids[("full", 0)]).isdisjoint(ids[("full", 2)])
    # The report reads it: one sweep, Table 5 with a row per method and a column per size.
    rep = subprocess.run(["/usr/bin/python3", str(SRC / "analysis" / "report.py"),
                          str(tmp_path / "out" / "r" / "run.h5"), "-o", str(tmp_path / "rep"), "--no-figures"],
                         capture_output=True, text=True, env=dict(ENV, MPLBACKEND="Agg"), timeout=240)
    assert rep.returncode == 0, rep.stderr
    t5 = (tmp_path / "rep" / "table5_budget_to_95pct.csv").read_text().splitlines()
    assert len(t5) == 1 + 2 * 2


def test_eval_sizes_beyond_training_set_max_pos(tmp_path):
    """Evaluation contexts longer than training: max_pos follows (largest eval size + the training room)."""
    r = run(tmp_path, "--methods", "full", "--eval_context_sizes", "200", "--num_test", "1", "--steps", "2",
            "--dry_run")
    assert r.returncode == 0, r.stderr
    # tiny.ini: context_sizes 64 96, max_seq_len 160: room 64 -> max_pos 264.
    assert "max_pos = 264" in r.stdout and "eval_context_sizes = 200" in r.stdout
    assert "max_seq_len = 160" in r.stdout


@pytest.mark.parametrize("extra, words", [
    (["--kv_budget", "0.5", "0.3x"], ["--kv_budget", "0.3x", "entry 2 of 2"]),
    (["--kv_budget", "0.5", "0.5"], ["--kv_budget", "given twice"]),
    (["--eval_context_sizes", "64", "0"], ["--eval_context_sizes", "entry 2"]),
    (["--eval_context_sizes", "64", "64"], ["--eval_context_sizes", "given twice"]),
    (["--eval_context_sizes", "64", "96", "128", "--num_test", "2"], ["--num_test", "eval context sizes"]),
])
def test_bad_list_entries_name_the_option(tmp_path, extra, words):
    r = run(tmp_path, *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert not (tmp_path / "out").exists()  # refused before the run directory exists
