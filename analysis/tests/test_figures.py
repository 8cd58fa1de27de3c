"""Each figure is produced (file exists, non-empty, sane size) or skipped with a note; ranks and scaling."""

import os
import re

import numpy as np
import pytest

from conftest import run_report
from h5direct import png_size
import synthetic_fixtures as syn


def _check_png(path):
    assert os.path.isfile(path), path
    assert os.path.getsize(path) > 8000, (path, os.path.getsize(path))
    w, h = png_size(path)
    assert 500 <= w <= 3000 and 300 <= h <= 2500, (path, w, h)


@pytest.fixture(scope="module")
def real_report(real_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_report")
    runs = [real_runs[n] for n in ("tiny", "seed2", "b25", "fs")]
    res = run_report(*runs, "-o", out)
    assert res.returncode == 0, res.stderr
    return out


def test_real_figures(real_report):
    for name in ("loss", "metrics_over_steps", "memory", "throughput", "token_efficiency", "latency",
                 "baseline_comparison", "needle_heatmap", "f1_vs_kv_budget", "retention_by_age"):
        _check_png(real_report / f"{name}.png")
    md = (real_report / "report.md").read_text()
    # absent data: skipped with a note, no file
    for name in ("ablation", "scaling"):
        assert not (real_report / f"{name}.png").exists()
        assert re.search(rf"### {name}\n\nSkipped: .+", md), name
    # the loss caption says which hybrid-loss terms are zero and not plotted
    cap = re.search(r"\*Training loss.*\*", md).group(0)
    assert "Not plotted because they are zero" in cap
    for t in ("loss_retrieval", "loss_compression", "loss_compute"):
        assert t in cap.split("Not plotted")[1]
    assert "non-zero: loss_task" in cap
    assert "/ranks holds no rows" in md


def test_synthetic_ablation_scaling_and_ranks(tmp_path):
    """Scaling study: world sizes 1, 2, 4 with the same tokens per step (strong scaling), rank 2 slow."""
    paths = []
    times = {1: [0.40], 2: [0.21, 0.22], 4: [0.11, 0.11, 0.16, 0.11]}
    for n, t in times.items():
        p = tmp_path / f"synthetic_ws{n}" / "run.h5"
        p.parent.mkdir()
        syn.write_run(str(p), world_size=n, rank_times=np.array(t), ablation=("full_model", "no_dsr"),
                      adaptation=("full",), tokens_per_step=4096.0, step_time=t[0])
        paths.append(p)
    out = tmp_path / "out"
    res = run_report(*paths, "-o", out)
    assert res.returncode == 0, res.stderr
    for name in ("scaling", "ablation", "retention_by_age", "needle_heatmap", "loss", "memory"):
        _check_png(out / f"{name}.png")
    md = (out / "report.md").read_text()
    # slowest rank and imbalance named from /ranks (world size 4: rank 2)
    line = [l for l in md.splitlines() if l.startswith("- `synthetic_ws4`")][0]
    assert "slowest rank **2**" in line
    per_rank = np.array([np.mean([t * (1 + 0.01 * ((s + q) % 3)) for s in range(1, 11)])
                         for q, t in enumerate(times[4])])
    imb = per_rank.max() / per_rank.mean() - 1
    assert f"imbalance (slowest / mean - 1) = {100 * imb:.1f}%" in line
    assert "communication fraction 20.0%" in line
    # scaling table: strong efficiency = T1 / (N T_N), T = mean over steps of the slowest rank
    rows = {int(m.group(1)): m for m in re.finditer(r"^\| (\d) \| ([^|]+) \| [^|]+ \| (\w+) \| ([^|]+) \|", md, re.M)}
    assert set(rows) == {1, 2, 4}
    def job_time(ts):
        return np.mean([max(t * (1 + 0.01 * ((s + q) % 3)) for q, t in enumerate(ts)) for s in range(1, 11)])
    for n in (2, 4):
        assert rows[n].group(3) == "strong"
        want = job_time(times[1]) / (n * job_time(times[n]))
        assert abs(float(rows[n].group(4)) - want) < 1e-3, (n, rows[n].group(0), want)
    assert "Table 4: ablation" in md and "| full_model |" in md


def test_weak_scaling_classified(tmp_path):
    paths = []
    for n in (1, 2):
        p = tmp_path / f"synthetic_weak{n}" / "run.h5"
        p.parent.mkdir()
        syn.write_run(str(p), world_size=n, rank_times=np.full(n, 0.1 * (1 + 0.1 * (n - 1))),
                      tokens_per_step=1000.0 * n, step_time=0.1)
        paths.append(p)
    out = tmp_path / "out"
    res = run_report(*paths, "-o", out)
    assert res.returncode == 0, res.stderr
    md = (out / "report.md").read_text()
    m = re.search(r"^\| 2 \| [^|]+ \| [^|]+ \| (\w+) \| [^|]+ \| ([^|]+) \|", md, re.M)
    assert m.group(1) == "weak"
    t1 = np.mean([0.1 * (1 + 0.01 * ((s + 0) % 3)) for s in range(1, 11)])
    t2 = np.mean([max(0.11 * (1 + 0.01 * ((s + q) % 3)) for q in range(2)) for s in range(1, 11)])
    assert abs(float(m.group(2)) - t1 / t2) < 1e-3
    _check_png(out / "scaling.png")


def test_diverged_run_is_named_in_the_loss_caption(tmp_path):
    """A run whose training loss turned non-finite is said to have diverged (step named), never an empty plot."""
    import h5py
    p = tmp_path / "diverged" / "run.h5"
    p.parent.mkdir()
    syn.write_run(str(p))
    with h5py.File(p, "r+") as f:
        lt = f["train/loss_total"]
        v = lt[...]
        v[4:] = np.nan
        lt[...] = v
        step = int(f["train/step"][4])
    out = tmp_path / "out"
    res = run_report(p, "-o", out)
    assert res.returncode == 0, res.stderr
    md = (out / "report.md").read_text()
    assert f"DIVERGED: non-finite training loss from step {step}" in md
    _check_png(out / "loss.png")
