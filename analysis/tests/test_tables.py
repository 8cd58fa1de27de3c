"""Every table value equals the value computed directly from the HDF5 datasets."""

import os

import h5py
import numpy as np
import pytest

from conftest import run_report
from h5direct import T975, close, col, mean_half, read_csv, row, scalar
import synthetic_fixtures as syn

MB = 1e-6


@pytest.fixture(scope="module")
def varied(real_runs, tmp_path_factory):
    """Copies of the real tiny runs with varied F1/EM/ROUGE-L/BLEU (a tiny model scores 0 everywhere, which would
    hide a column mix-up); everything else is the binary's output."""
    out = {}
    d = tmp_path_factory.mktemp("varied")
    for i, name in enumerate(("tiny", "seed2")):
        (d / name).mkdir()
        dst = str(d / name / "run.h5")
        with open(real_runs[name], "rb") as src, open(dst, "wb") as fh:
            fh.write(src.read())
        rng = np.random.default_rng(10 + i)
        with h5py.File(dst, "r+") as f:
            for m in f["eval"]:
                for c in ("f1", "em", "rouge_l", "bleu"):
                    ds = f[f"eval/{m}/{c}"]
                    ds[...] = rng.random(ds.shape[0])
                f[f"eval/{m}/summary/corpus_bleu"][...] = rng.random()
        out[name] = dst
    return out


def test_table1_single_run_equals_h5(varied, tmp_path):
    path = varied["tiny"]
    res = run_report(path, "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    rows = read_csv(tmp_path / "table1_task_performance.csv")
    with h5py.File(path, "r") as f:
        methods = sorted(f["eval"])
    assert sorted(r["method"] for r in rows) == methods
    for m in methods:
        r = row(rows, m)
        assert r["status"] == "done"
        for key, field in (("f1", "f1"), ("em", "em"), ("rouge_l", "rouge_l"), ("bleu_example", "bleu")):
            mean, half, n = mean_half(col(path, f"eval/{m}", field))
            assert close(r[key], mean), (m, key)
            assert close(r[key + "_ci95"], half, rel=1e-3), (m, key)
            assert int(r[key + "_n"]) == n == 10
        assert close(r["bleu"], scalar(path, f"eval/{m}/summary/corpus_bleu"))
        assert int(float(r["n_examples"])) == scalar(path, f"eval/{m}/summary/n_examples") == 10


def test_tables_on_unmodified_real_run(real_runs, tmp_path):
    """The binary's own file: Table 1 agrees with its summary group; Tables 2 and 2b with the datasets."""
    path = real_runs["tiny"]
    res = run_report(path, "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    t1 = read_csv(tmp_path / "table1_task_performance.csv")
    t2 = read_csv(tmp_path / "table2_efficiency.csv")
    t2b = read_csv(tmp_path / "table2b_kv_memory.csv")
    for m in ("full", "sliding_window"):
        r = row(t1, m)
        for key in ("f1", "em", "rouge_l"):
            assert close(r[key], scalar(path, f"eval/{m}/summary/{key}_mean"), abs_=1e-12)
        r = row(t2, m)
        for key, field, scale in (("peak_mem_mb", "peak_mem_bytes", MB), ("avg_mem_mb", "avg_mem_bytes", MB),
                                  ("process_peak_rss_mb", "process_peak_rss_bytes", MB), ("throughput_tok_s", "throughput_tok_s", 1),
                                  ("context_tokens_per_s", "context_tokens_per_s", 1),
                                  ("latency_s", "latency_s", 1), ("itl_s", "itl_s", 1),
                                  ("token_efficiency", "token_efficiency", 1)):
            v = float(scalar(path, f"efficiency/{m}/{field}")) * scale
            assert v > 0, (m, field)  # the tiny run measures all of these
            assert close(r[key], v), (m, key)
            assert r[key + "_ci95"] == ""  # one run: no interval for a scalar
        r = row(t2b, m)
        for key, field in (("kv_resident_mb", "kv_resident_bytes"), ("kv_total_mb", "kv_total_bytes"),
                           ("kv_read_per_step_mb", "kv_read_per_step_bytes"),
                           ("kv_peak_prefill_mb", "kv_peak_prefill_bytes"),
                           ("kv_budget_achieved_mb", "kv_budget_achieved_bytes")):
            mean, half, _ = mean_half(col(path, f"eval/{m}", field).astype(float) * MB)
            assert close(r[key], mean, rel=1e-9), (m, key)
            assert close(r[key + "_ci95"], half, rel=1e-3), (m, key)
    # The two methods really differ (sliding window keeps less KV), so a swapped row would fail.
    assert float(row(t2b, "sliding_window")["kv_resident_mb"]) < float(row(t2b, "full")["kv_resident_mb"])
    md = (tmp_path / "report.md").read_text()
    assert "Table 3: adaptation" in md and "Not present" in md
    assert "Table 4: ablation" in md
    for key in ("git_sha", "hostname", "world_size 1", "resolved config", "dataset_hash"):
        assert key in md, key
    assert md.index("## Provenance") < md.index("### Table 1")
    assert md.count("*Aggregation:*") >= 4  # Tables 1, 2, 2b and the ranks section


def test_seeds_merge_into_intervals(varied, tmp_path):
    a, b = varied["tiny"], varied["seed2"]
    res = run_report(a, b, "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    rows = read_csv(tmp_path / "table1_task_performance.csv")
    assert len(rows) == 2  # seeds merge: one row per method
    for m in ("full", "sliding_window"):
        r = row(rows, m)
        per_run = [float(np.mean(col(p, f"eval/{m}", "f1"))) for p in (a, b)]
        mean, half, n = mean_half(per_run)
        assert n == 2 and close(r["f1"], mean) and close(r["f1_ci95"], half, rel=1e-3)
        assert int(r["f1_n"]) == 2
        assert abs(half - T975[1] * abs(per_run[0] - per_run[1]) / 2) < 1e-9
        assert int(float(r["n_examples"])) == 20  # examples summed over the merged runs
    t2 = read_csv(tmp_path / "table2_efficiency.csv")
    r = row(t2, "full")
    vals = [float(scalar(p, "efficiency/full/throughput_tok_s")) for p in (a, b)]
    assert close(r["throughput_tok_s"], np.mean(vals)) and r["throughput_tok_s_ci95"] != ""


def test_sweep_groups_rows_by_kv_budget(real_runs, tmp_path):
    res = run_report(real_runs["tiny"], real_runs["b25"], "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    rows = read_csv(tmp_path / "table2b_kv_memory.csv")
    assert {r["runs"] for r in rows} == {"kv_budget=0.5", "kv_budget=0.25"}
    for runs, path in (("kv_budget=0.5", real_runs["tiny"]), ("kv_budget=0.25", real_runs["b25"])):
        r = row(rows, "sliding_window", runs)
        mean, _, _ = mean_half(col(path, "eval/sliding_window", "kv_budget_requested_bytes").astype(float) * MB)
        assert close(r["kv_budget_requested_mb"], mean)


def test_table3_adaptation_equals_h5(real_runs, tmp_path):
    path = real_runs["fs"]
    res = run_report(path, "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    rows = read_csv(tmp_path / "table3_adaptation.csv")
    with h5py.File(path, "r") as f:
        methods = sorted(f["adaptation"])
    assert methods and sorted(r["method"] for r in rows) == methods
    for m in methods:
        r = row(rows, m)
        for k in ("retention_auc", "temporal_consistency", "adaptation_speed"):
            assert close(r[k], float(scalar(path, f"adaptation/{m}/{k}"))), (m, k)
        assert int(float(r["n_queries"])) == int(scalar(path, f"adaptation/{m}/n_queries"))


def test_table4_ablation_and_failures_synthetic(tmp_path):
    p = tmp_path / "synthetic_ablation" / "run.h5"
    p.parent.mkdir()
    # The run's variant order (root attr ablation_order), not HDF5's name order (no_rckv < no_sqa).
    w = syn.write_run(str(p), ablation=("full_model", "no_dsr", "no_sqa", "no_rckv"), failed_variants=("no_sqa",),
                      failed_methods=("sliding_window",))
    out = tmp_path / "out"
    res = run_report(p, "-o", out)
    assert res.returncode == 0, res.stderr
    rows = read_csv(out / "table4_ablation.csv")
    assert [r["variant"] for r in rows] == ["full_model", "no_dsr", "no_sqa", "no_rckv"]
    for v in ("full_model", "no_dsr", "no_rckv"):
        r = row(rows, v, key="variant")
        mean, half, _ = mean_half(col(str(p), f"ablation/{v}", "f1"))
        assert close(r["f1"], mean) and close(r["f1_ci95"], half, rel=1e-3)
        assert close(r["peak_mem_mb"], float(w[("ablation", v)]["efficiency"]["peak_mem_bytes"]) * MB)
        assert close(r["throughput_tok_s"], float(scalar(str(p), f"ablation/{v}/efficiency/throughput_tok_s")))
    failed = row(rows, "no_sqa", key="variant")
    assert failed["status"] == "failed" and failed["f1"] == "failed"
    t1 = read_csv(out / "table1_task_performance.csv")
    sw = row(t1, "sliding_window")  # a failed method keeps its row, shown as failed (never zero)
    assert sw["status"] == "failed" and sw["f1"] == "failed"
    md = (out / "report.md").read_text()
    assert "synthetic failure of sliding_window: out of memory" in md
    assert "| no_sqa | FAILED: synthetic failure of no_sqa | failed | failed | failed |" in md
    tex = (out / "table4_ablation.tex").read_text()
    assert r"\textit{failed}" in tex and "no\\_sqa" in tex
    assert os.path.getsize(out / "ablation.png") > 5000
    # --print shows Table 4 beside Tables 1 and 2 when the run has an ablation (the main job's summary).
    res = run_report(p, "--print")
    assert res.returncode == 0, res.stderr
    assert "Table 1: task performance" in res.stdout and "Table 4: ablation" in res.stdout
    assert "| no_sqa | FAILED: synthetic failure of no_sqa |" in res.stdout


def test_print_tables_to_stdout(real_runs, tmp_path):
    res = run_report(real_runs["tiny"], "-o", tmp_path, "--print", "--no-figures")
    assert res.returncode == 0, res.stderr
    assert "Table 1: task performance" in res.stdout and "Table 2: efficiency" in res.stdout
    assert "Table 3" not in res.stdout
    # Tables 1 and 2 (the sweep tables of the run's cells follow them)
    tables12 = res.stdout[res.stdout.index("Table 1: task performance"):res.stdout.index("### Sweep 1")]
    assert tables12.count("| sliding_window |") == 2
    assert "Table 5, the budget at which each method first keeps >= 95%" in res.stdout


def test_method_order_backbones_and_protocol_from_the_file(real_runs, tmp_path):
    """Table rows follow the run's method order (root attr method_order, from
    the method table), not HDF5's name order, and the caption says which
    weights each method ran on and under which protocol."""
    import h5py
    path = real_runs["tiny"]
    with h5py.File(path, "r") as f:
        order = f.attrs["method_order"]
        order = (order.decode() if isinstance(order, bytes) else order).split()
        bb = f["eval/full"].attrs["backbone"]
        bb = bb.decode() if isinstance(bb, bytes) else bb
    res = run_report(path, "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    t1 = read_csv(tmp_path / "table1_task_performance.csv")
    assert [r["method"] for r in t1] == order
    md = (tmp_path / "report.md").read_text()
    assert "Protocol: query-aware" in md
    assert f"full: {bb}" in md


def test_reuse_protocol_caption(real_runs, copy_run, tmp_path):
    """A --protocol reuse run says so in the caption, with what its latency means."""
    path = copy_run(real_runs["tiny"])
    with h5py.File(path, "r+") as f:
        f.attrs["protocol"] = "reuse"
    res = run_report(path, "-o", tmp_path, "--no-figures")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "report.md").read_text()
    assert "Protocol: reuse, compress once and ask many" in md
    assert "latency = restore + question + first token" in md


def test_bleu_not_applicable_prints_na(real_runs, copy_run, tmp_path):
    """BLEU-4 that cannot be computed (no gold answer of >= 4 tokens: NaN in the file) prints as n/a in the
    markdown and LaTeX tables and as an empty cell in the CSV: never 0 and never a 1e-231 artefact."""
    path = copy_run(real_runs["tiny"])
    with h5py.File(path, "r+") as f:
        methods = sorted(f["eval"])
        for m in methods:
            f[f"eval/{m}/bleu"][...] = np.nan
            f[f"eval/{m}/summary/corpus_bleu"][...] = np.nan
            f[f"eval/{m}/summary/bleu_mean"][...] = np.nan
    out = tmp_path / "out"
    res = run_report(path, "-o", out, "--no-figures")
    assert res.returncode == 0, res.stderr
    rows = read_csv(out / "table1_task_performance.csv")
    for m in methods:
        r = row(rows, m)
        assert r["bleu"] == "" and r["bleu_example"] == "", r
        assert r["f1"] != ""
    md = (out / "report.md").read_text()
    table1 = md[md.index("Table 1"):md.index("Table 2")]
    header = next(line for line in table1.splitlines() if line.startswith("| method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    ib, ie = cols.index("BLEU-4 (corpus)"), cols.index("BLEU (per-example mean)")
    for m in methods:
        line = next(line for line in table1.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[ib] == "n/a" and cells[ie] == "n/a", line
    assert "e-231" not in md
    assert "n/a where no gold answer has 4 or more tokens" in md
