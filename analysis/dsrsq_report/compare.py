"""report --compare A.h5 B.h5: the ratio B/A of every number the report shows, for two comparable runs."""

import math

import numpy as np

from . import aggregate as A
from . import schema as S


def flat_figures(run):
    """Ordered {name: value} of every scalar the report derives from one run."""
    out = {}
    from .sweep import expand_budgets
    tables, _ = A.build_tables(expand_budgets([run]))  # a run with several budgets: rows per budget
    for t in tables:
        if not t.present:
            continue
        for r in t.rows:
            for c in t.cols:
                v = math.nan if r.failed else r.estimates[c.key].mean
                name = f"{r.name} [{r.group}]" if r.group else r.name
                out[f"{t.slug.split('_')[0]}/{name}/{c.key}"] = v
    for k in ("loss_total", "loss_task"):
        a = np.asarray(run.train.get(k, []), dtype=float)
        if a.size:
            out[f"train/{k} (last step)"] = float(a[-1])
    for k in ("tokens_per_s", "step_time_s"):
        a = np.asarray(run.train.get(k, []), dtype=float)
        a = a[np.isfinite(a)]
        if a.size:
            out[f"train/{k} (mean)"] = float(a.mean())
    v = np.asarray(run.val.get("loss", []), dtype=float)
    if v.size:
        out["val/loss (last)"] = float(v[-1])
    rs = A.rank_summary(run)
    if rs:
        out["ranks/job step time s"] = rs["job_step_time_s"]
        out["ranks/imbalance"] = rs["imbalance"]
        out["ranks/comm fraction"] = rs["comm_fraction"]
    for m, d in run.adaptation.items():
        for i, x in enumerate(np.asarray(d["retention_by_age"], dtype=float)):
            out[f"adaptation/{m}/retention_by_age[{i}]"] = float(x)
    return out


def incompatibilities(a, b):
    """Differences that make two runs incomparable: hardware attributes and the task split."""
    diffs = []
    for k in S.HARDWARE_ATTRS + ("dataset_hash",):
        va, vb = a.attrs.get(k), b.attrs.get(k)
        if va is None and vb is None:
            continue
        if va != vb:
            what = "task split" if k == "dataset_hash" else "hardware"
            diffs.append(f"{what}: {k} differs ({va!r} in {a.path} vs {vb!r} in {b.path})")
    return diffs


def ratio(x, y):
    if not (math.isfinite(x) and math.isfinite(y)):
        return math.nan
    if x == 0:
        return 1.0 if y == 0 else math.inf
    return y / x


def compare_text(a, b):
    fa, fb = flat_figures(a), flat_figures(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    lines = [f"A = {a.path}", f"B = {b.path}", "", "| figure | A | B | B/A |", "|---|---|---|---|"]
    for k in keys:
        x, y = fa.get(k, math.nan), fb.get(k, math.nan)
        r = ratio(x, y)
        rs = "n/a" if not math.isfinite(r) and r == r and r != math.inf else ("inf" if r == math.inf else
                                                                            ("n/a" if r != r else f"{r:.4f}"))
        lines.append(f"| {k} | {A.fmt_num(x, 6)} | {A.fmt_num(y, 6)} | {rs} |")
    lines += ["", "Ratio = B / A; n/a where either value is missing, NaN or failed; 1 where both are 0."]
    return "\n".join(lines), fa, fb
