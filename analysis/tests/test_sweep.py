"""Sweeps (issue 12 item 4): evaluation cells, merging runs, the budget-to-95% table, paired tests, Pareto data.

The known-answer tests use synthetic schema 3 files (sweep_fixtures.py) whose per-example F1/EM are chosen so the
answers are worked out by hand below; the real-run test uses the tiny binary run of conftest.py.
"""

import math
import os

import numpy as np
import pytest

import contextlib
import io
import types

from h5direct import read_csv
from sweep_fixtures import CellSpec, write_sweep_run

from dsrsq_report import stats as ST
from dsrsq_report import sweep as SW
from dsrsq_report.cli import main as report_main
from dsrsq_report.reader import read_run


def run_report(*args):
    """The report tool in this process (no interpreter and matplotlib start per call): returncode, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = report_main([str(a) for a in args])
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())

N = 10
CELLS = [(64, "0.5"), (64, "0.25"), (64, "0.125"), (128, "0.5"), (128, "0.25"), (128, "0.125")]
KV = {"0.5": 5000, "0.25": 2500, "0.125": 1250}


def _v(*parts):
    out = []
    for value, count in parts:
        out += [value] * count
    assert len(out) == N
    return out


def _specs():
    """Hand-made cells. Context 64: full F1 0.8 (ones at 0..7). Context 128: full F1 0.5 (ones at 0..4)."""
    full64, full128 = _v((1, 8), (0, 2)), _v((1, 5), (0, 5))
    s = {}
    for k, (c, b) in enumerate(CELLS):
        # The full cache cannot shrink: infeasible at every budget below 1, same predictions at every budget.
        s[("full", k)] = CellSpec(full64 if c == 64 else full128, kv_bytes=10000, infeasible=True)
    # a at 64: 0.125 -> F1 0.4 (ratio 0.5; EM right at 0,1,2,8: b = 1 (index 8), c = 5 (3..7)),
    #          0.25 -> 0.77 (ratio 0.9625 >= 0.95: the answer), 0.5 -> 0.8.
    s[("a", 2)] = CellSpec([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], kv_bytes=KV["0.125"])
    s[("a", 1)] = CellSpec(_v((1, 7), (0.7, 1), (0, 2)), em=_v((1, 7), (0, 3)), kv_bytes=KV["0.25"])
    s[("a", 0)] = CellSpec(full64, kv_bytes=KV["0.5"])
    # b at 64: 0.6 everywhere (ratio 0.75): never.
    for k in (0, 1, 2):
        s[("b", k)] = CellSpec(_v((1, 6), (0, 4)), kv_bytes=KV[CELLS[k][1]])
    # c at 64: the full cache's F1 but infeasible at 0.125 and 0.25; feasible at 0.5 with 0.78 (ratio 0.975).
    s[("c", 2)] = CellSpec(full64, kv_bytes=9000, infeasible=True)
    s[("c", 1)] = CellSpec(full64, kv_bytes=9000, infeasible=True)
    s[("c", 0)] = CellSpec(_v((1, 7), (0.8, 1), (0, 2)), em=_v((1, 7), (0, 3)), kv_bytes=KV["0.5"])
    # Context 128: a keeps the full F1 from 0.125 on; b is infeasible everywhere; c failed everywhere.
    for k in (3, 4, 5):
        s[("a", k)] = CellSpec(full128, kv_bytes=KV[CELLS[k][1]])
        s[("b", k)] = CellSpec(full128, kv_bytes=9000, infeasible=True)
        s[("c", k)] = CellSpec(failed=True)
    return s


EXPECTED_95 = {("full", 64): "infeasible", ("a", 64): "0.25", ("b", 64): "never", ("c", 64): "0.5",
               ("full", 128): "infeasible", ("a", 128): "0.125", ("b", 128): "infeasible", ("c", 128): "failed"}


def _subset_specs(specs, keep):
    """The specs of the cells in `keep` (indices into CELLS), re-indexed as a run holding only those cells."""
    out = {}
    for new, old in enumerate(keep):
        for (m, k), v in specs.items():
            if k == old:
                out[(m, new)] = v
    return out


@pytest.fixture
def one_file(tmp_path):
    p = tmp_path / "all" / "run.h5"
    p.parent.mkdir()
    write_sweep_run(str(p), CELLS, _specs(), n_examples=N)
    return str(p)


def _table5(out):
    rows = read_csv(os.path.join(out, "table5_budget_to_95pct.csv"))
    return {(r["method"], int(r["context_size"])): r["budget_to_95pct"] for r in rows}


def _check_95(got):
    for key, want in EXPECTED_95.items():
        assert got[key] == want or (want == "infeasible" and got[key].startswith("infeasible")), (key, got[key])
    assert got[("b", 64)] == "never"  # ratio 0.75 at every feasible budget: no infeasible or failed cell to name


def test_budget_to_95pct_table_known_answers(one_file, tmp_path):
    out = tmp_path / "out"
    res = run_report(one_file, "-o", out, "--no-figures")
    assert res.returncode == 0, res.stderr
    _check_95(_table5(out))
    md = (out / "report.md").read_text()
    assert "Table 5: the budget at which each method first keeps >= 95%" in md
    assert "infeasible at 0.125, 0.25" in _table5(out)[("full", 64)] or "infeasible" in _table5(out)[("full", 64)]


def test_paired_tests_in_cell_table(one_file, tmp_path):
    out = tmp_path / "out"
    assert run_report(one_file, "-o", out, "--no-figures").returncode == 0
    rows = read_csv(os.path.join(out, "table6_sweep_cells.csv"))
    cell = {(r["method"], int(r["context_size"]), r["kv_budget"]): r for r in rows}
    a = cell[("a", 64, "0.125")]
    # McNemar: b = 1, c = 5 discordant pairs; two-sided exact p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64.
    assert int(a["mcnemar_n10"]) == 1 and int(a["mcnemar_n01"]) == 5
    assert math.isclose(float(a["p_mcnemar"]), 14 / 64, rel_tol=1e-12)
    assert math.isclose(float(a["f1"]), 0.4) and math.isclose(float(a["ratio"]), 0.5)
    assert math.isclose(float(a["df1"]), 0.4 - 0.8)
    assert float(a["df1_lo"]) <= -0.4 <= float(a["df1_hi"])
    # Identical predictions: difference 0 with p = 1 and McNemar p = 1.
    same = cell[("a", 64, "0.5")]
    assert float(same["df1"]) == 0 and float(same["p_bootstrap"]) == 1 and float(same["p_mcnemar"]) == 1
    assert cell[("c", 128, "0.5")]["status"].startswith("FAILED")
    assert cell[("b", 128, "0.25")]["status"] == f"infeasible on {N}/{N}"
    # The reference itself carries no test.
    assert cell[("full", 64, "0.5")]["p_mcnemar"] == ""


def test_pareto_data_extraction(one_file):
    sw, = SW.build_sweeps([read_run(one_file)])
    assert sw.context_sizes == [64, 128] and sw.budgets == ["0.125", "0.25", "0.5"]
    d = SW.pareto_data(sw)[64]
    assert math.isclose(d["reference"]["f1"], 0.8) and d["reference"]["kv_bytes"] == 10000
    a = {p["budget"]: p for p in d["methods"]["a"]}
    assert [p["budget"] for p in d["methods"]["a"]] == ["0.125", "0.25", "0.5"]  # budget order
    assert math.isclose(a["0.25"]["f1"], 0.77) and a["0.25"]["kv_bytes"] == 2500 and a["0.25"]["status"] == "ok"
    assert a["0.25"]["lo"] <= 0.77 <= a["0.25"]["hi"]
    assert {p["status"] for p in d["methods"]["full"]} == {"infeasible"}
    c = {p["budget"]: p["status"] for p in d["methods"]["c"]}
    assert c == {"0.125": "infeasible", "0.25": "infeasible", "0.5": "ok"}
    # Frontier of the feasible cells: b@0.125 (1250 B, 0.6) beats a@0.125 (1250 B, 0.4); a@0.25 beats b@0.25;
    # a@0.5 (0.8) beats c@0.5 (0.78) and b@0.5; infeasible cells (full, c below 0.5) are not candidates.
    assert sorted(d["frontier"]) == [("a", "0.25"), ("a", "0.5"), ("b", "0.125")]
    assert {p["status"] for p in SW.pareto_data(sw)[128]["methods"]["c"]} == {"failed"}


def test_merging_split_runs_gives_the_same_table(one_file, tmp_path):
    specs = _specs()
    paths = []
    for name, keep in (("b05", [0, 3]), ("rest", [1, 2, 4, 5])):
        p = tmp_path / name / "run.h5"
        p.parent.mkdir()
        write_sweep_run(str(p), [CELLS[k] for k in keep], _subset_specs(specs, keep), n_examples=N)
        paths.append(str(p))
    out = tmp_path / "merged"
    res = run_report(*paths, "-o", out, "--no-figures", "--one-sweep")
    assert res.returncode == 0, res.stderr
    _check_95(_table5(out))
    whole = tmp_path / "whole"
    assert run_report(one_file, "-o", whole, "--no-figures").returncode == 0
    assert (out / "table6_sweep_cells.csv").read_text() == (whole / "table6_sweep_cells.csv").read_text()


def test_merge_refuses_other_configs_and_example_sets(tmp_path):
    specs = _specs()

    def make(name, keep, **kw):
        p = tmp_path / name / "run.h5"
        p.parent.mkdir()
        write_sweep_run(str(p), [CELLS[k] for k in keep], _subset_specs(specs, keep), n_examples=N, **kw)
        return str(p)
    a = make("a", [0, 3])
    other = make("steps40", [1, 2], config_extra={"steps": "40"})
    res = run_report(a, other, "-o", tmp_path / "o1", "--no-figures", "--one-sweep")
    assert res.returncode == 2 and "cannot merge into one sweep" in res.stderr and "steps" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # Without --one-sweep they are two sweeps, each with its own tables.
    res = run_report(a, other, "-o", tmp_path / "o2", "--no-figures")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o2" / "table5_budget_to_95pct_1.csv").exists()
    assert (tmp_path / "o2" / "table5_budget_to_95pct_2.csv").exists()
    # Same config, other examples at context 64: refused whatever the flags.
    ids = {64: [f"other-{i}" for i in range(N)]}
    foreign = make("foreign", [1, 2], ids=ids)
    res = run_report(a, foreign, "-o", tmp_path / "o3", "--no-figures")
    assert res.returncode == 2 and "different test examples at context size 64" in res.stderr, res.stderr
    assert a in res.stderr and foreign in res.stderr


def test_efficiency_of_a_budget_merges_its_cells_exactly(tmp_path):
    """Table 2 of a multi-budget run: per budget, throughput = sum tokens / sum serve time over its cells."""
    specs = _specs()
    specs[("a", 0)].eff = {"tokens_run": 1000.0, "serve_s": 2.0, "throughput_tok_s": 500.0, "peak_mem_bytes": 7}
    specs[("a", 3)].eff = {"tokens_run": 3000.0, "serve_s": 2.0, "throughput_tok_s": 1500.0, "peak_mem_bytes": 9}
    p = tmp_path / "r" / "run.h5"
    p.parent.mkdir()
    write_sweep_run(str(p), CELLS, specs, n_examples=N)
    out = tmp_path / "o"
    assert run_report(str(p), "-o", out, "--no-figures").returncode == 0
    rows = read_csv(os.path.join(out, "table2_efficiency.csv"))
    r = [x for x in rows if x["method"] == "a" and x["runs"] == "kv_budget=0.5"]
    assert len(r) == 1, rows
    assert math.isclose(float(r[0]["throughput_tok_s"]), 4000.0 / 4.0)  # not the mean of 500 and 1500 (1000)...
    assert math.isclose(float(r[0]["peak_mem_mb"]), 9e-6)               # max over the cells


def test_pareto_figure_is_written(one_file, tmp_path):
    from dsrsq_report.figures import fig_pareto
    sw, = SW.build_sweeps([read_run(one_file)])
    fig = fig_pareto(sw, str(tmp_path))
    assert fig.path == str(tmp_path / "pareto.png") and (tmp_path / "pareto.png").stat().st_size > 10000
    assert "Pareto frontier" in fig.caption and "failed cells are named" in fig.caption


def test_real_run_reads_as_one_budget_sweep(real_runs, tmp_path):
    """The binary's single-budget run (schema 3, two context sizes): one sweep, one budget, the full cache as
    reference, and Table 1 exactly as before (one row per method)."""
    out = tmp_path / "o"
    res = run_report(real_runs["tiny"], "-o", out, "--no-figures")
    assert res.returncode == 0, res.stderr
    t1 = read_csv(os.path.join(out, "table1_task_performance.csv"))
    assert [r["method"] for r in t1] == ["full", "sliding_window"] and all(r["runs"] == "" for r in t1)
    cells = read_csv(os.path.join(out, "table6_sweep_cells.csv"))
    assert {(r["method"], r["context_size"], r["kv_budget"]) for r in cells} == {
        (m, c, "0.5") for m in ("full", "sliding_window") for c in ("64", "96")}
    assert sum(int(r["n"]) for r in cells if r["method"] == "full") == 10


# --------------------------------------------------------------------------- the statistics themselves
def test_mcnemar_exact_values():
    assert ST.mcnemar_exact([1, 1, 0], [1, 1, 0]) == (0, 0, 1.0)
    # 0 against 5 discordant pairs: p = 2 / 32.
    n01, n10, p = ST.mcnemar_exact([0] * 5 + [1], [1] * 5 + [1])
    assert (n01, n10) == (5, 0) and math.isclose(p, 2 / 32)
    # Symmetric split: p = 1 (capped).
    assert ST.mcnemar_exact([1, 0], [0, 1])[2] == 1.0
    with pytest.raises(ValueError):
        ST.mcnemar_exact([1, 0], [1])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    v = np.linspace(0, 1, 37)
    a = ST.bootstrap_mean_ci(v)
    assert a == ST.bootstrap_mean_ci(v)  # fixed seed: the same files give the same intervals
    assert a[1] < a[0] < a[2] and math.isclose(a[0], 0.5)
    # The interval of a mean of 37 values in [0, 1] is far narrower than the range and about 2 x 1.96 sd/sqrt(n).
    se = float(np.std(v, ddof=1)) / math.sqrt(v.size)
    assert 0.7 * 3.92 * se < a[2] - a[1] < 1.3 * 3.92 * se
    assert ST.bootstrap_mean_ci([0.3] * 5) == (0.3, 0.3, 0.3)
    m, lo, hi, p = ST.paired_bootstrap([1.0] * 8, [0.5] * 8)
    assert (m, lo, hi) == (0.5, 0.5, 0.5) and p == 0.0


def test_merge_takes_a_trained_method_from_its_own_models_run(tmp_path):
    """--model is swept: a trained method's run (its own checkpoint, its cells only) joins the standard runs'
    sweep; a method whose cells come from runs of two models is refused."""
    specs = _specs()

    def make(name, keep, methods, model):
        p = tmp_path / name / "run.h5"
        p.parent.mkdir()
        sub = {k: v for k, v in _subset_specs(specs, keep).items() if k[0] in methods}
        write_sweep_run(str(p), [CELLS[k] for k in keep], sub, n_examples=N, config_extra={"model": model})
        return str(p)
    std = make("std", [0, 1, 2, 3, 4, 5], ("full", "b", "c"), "standard")
    own = make("own", [0, 1, 2, 3, 4, 5], ("a",), "dsrsq")
    out = tmp_path / "merged"
    res = run_report(std, own, "-o", out, "--no-figures", "--one-sweep")
    assert res.returncode == 0, res.stderr
    _check_95(_table5(out))  # a's row is worked out against the standard runs' full cache
    # full from both models: refused, naming both files.
    both = make("both", [0, 3], ("full", "a"), "dsrsq")
    res = run_report(std, both, "-o", tmp_path / "o2", "--no-figures")
    assert res.returncode == 2 and "method 'full'" in res.stderr and std in res.stderr and both in res.stderr, \
        res.stderr


def test_f1_vs_context_figure(one_file, tmp_path):
    """The curves are the cells of each budget in context order (known F1s of _specs); the figure is written."""
    from dsrsq_report.figures import context_curves, fig_f1_vs_context
    sw, = SW.build_sweeps([read_run(one_file)])
    cur = context_curves(sw)
    assert [c for c, _ in cur["0.25"]["a"]] == [64, 128]
    assert [p["f1"] for _, p in cur["0.25"]["a"]] == pytest.approx([0.77, 0.5])
    assert [p["status"] for _, p in cur["0.125"]["c"]] == ["infeasible", "failed"]
    assert [p["f1"] for _, p in cur["0.5"]["full"]] == pytest.approx([0.8, 0.5])
    fig = fig_f1_vs_context(sw, str(tmp_path))
    assert fig.path == str(tmp_path / "f1_vs_context.png") and (tmp_path / "f1_vs_context.png").stat().st_size > 10000
    assert "F1 against context length" in fig.caption


def test_tables_at_one_context_size(one_file, tmp_path):
    """--tables-context: Table 1 from that size's cells only (full: 0.8 at 64, 0.5 at 128, 0.65 pooled);
    Table 5 still has both sizes; a size no run has is refused with the sizes there are."""
    for size, want in ((64, 0.8), (128, 0.5)):
        out = tmp_path / f"o{size}"
        res = run_report(one_file, "-o", out, "--no-figures", "--tables-context", size)
        assert res.returncode == 0, res.stderr
        rows = [r for r in read_csv(os.path.join(out, "table1_task_performance.csv")) if r["method"] == "full"]
        assert len(rows) == 3, rows                      # one row per budget
        for r in rows:
            assert math.isclose(float(r["f1"]), want), (size, r)
            assert int(float(r["n_examples"])) == N      # one cell of N examples per budget
        assert {k[1] for k in _table5(out)} == {64, 128}
    pooled = tmp_path / "pooled"
    assert run_report(one_file, "-o", pooled, "--no-figures").returncode == 0
    rows = [r for r in read_csv(os.path.join(pooled, "table1_task_performance.csv")) if r["method"] == "full"]
    assert all(math.isclose(float(r["f1"]), 0.65) for r in rows), rows
    res = run_report(one_file, "-o", tmp_path / "none", "--no-figures", "--tables-context", 256)
    assert res.returncode == 2 and "--tables-context 256" in res.stderr and "[64, 128]" in res.stderr, res.stderr
