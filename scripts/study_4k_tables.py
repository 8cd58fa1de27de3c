"""Issue 13, the 4K study of docs/RESULTS.md (scripts/study_4k.sh; any context size): per-cell F1 with bootstrap intervals and paired tests against the
full cache (both protocols when STUDY_DIR also holds e_std_ctx, a --protocol context_only run, with each of its
cells paired against the same cell of e_std), and the trained methods over 3 training seeds, as markdown on stdout. Reads the runs through the report
tool's reader and statistics. Usage: /usr/bin/python3 scripts/study_4k_tables.py STUDY_DIR (run names in
docs/RESULTS.md)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "analysis"))
from dsrsq_report.reader import read_run
from dsrsq_report import stats as ST

if len(sys.argv) != 2:
    sys.exit("usage: study_4k_tables.py STUDY_DIR")
D = sys.argv[1]

def cells(run, m):
    """budget text -> (ids, f1, em, infeasible share, achieved/requested bytes mean)"""
    ex = run.eval[m]
    out = {}
    for c in run.cells:
        mask = np.asarray(ex.cols["cell"]) == c.index
        if not mask.any():
            continue
        idx = np.nonzero(mask)[0]
        ids = [ex.strings["id"][i] for i in idx]
        out[c.kv_budget] = dict(ids=ids, f1=np.asarray(ex.cols["f1"])[idx], em=np.asarray(ex.cols["em"])[idx],
                                inf=float(np.asarray(ex.cols["kv_infeasible"])[idx].mean()),
                                ach=float(np.asarray(ex.cols["kv_budget_achieved_bytes"])[idx].mean()),
                                req=float(np.asarray(ex.cols["kv_budget_requested_bytes"])[idx].mean()),
                                tot=float(np.asarray(ex.cols["kv_total_bytes"])[idx].mean()),
                                read=float(np.asarray(ex.cols["kv_read_per_step_bytes"])[idx].mean()))
    return out

def fmt(x):
    return f"{x:.3f}"

def row(name, b, c, ref):
    m, lo, hi = ST.bootstrap_mean_ci(c["f1"])
    assert c["ids"] == ref["ids"], "not the same examples"
    n01, n10, p = ST.mcnemar_exact(c["em"], ref["em"])
    d, dlo, dhi, _ = ST.paired_bootstrap(c["f1"], ref["f1"])
    inf = f"{c['inf']:.0%}" if c["inf"] > 0 else "0"
    asked = f"{c['req']/1e6:.3f}"
    if b == "1 (all)":  # the full cache keeps everything: the budget of the cell it was run in does not apply
        inf = asked = "-"
    return (f"| {name} | {b} | {fmt(m)} [{fmt(lo)}, {fmt(hi)}] | {len(c['f1'])} | {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] | "
            f"{n10} / {n01}, p = {p:.2g} | {inf} | {asked} | {c['tot']/1e6:.3f} | {c['read']/1e6:.3f} |")

# KV MB read/step: the KV bytes one decode step reads (mean over steps and examples): the budget rule bounds what
# a method holds; this is what each generated token costs in memory traffic (GCA holds much, reads little).
hdr = ("| method | budget | F1 [95% bootstrap] | n | ΔF1 vs reference [95% paired] | McNemar on EM: only this / only ref, p | "
       "infeasible | KV MB asked | KV MB held | KV MB read/step |\n|---|---|---|---|---|---|---|---|---|---|")

# The training-free runs: e_std (query-aware) and, when present, e_std_ctx (the same evaluation under
# --protocol context_only). Each is paired against its own full cache; then each cell of e_std_ctx is
# paired with the same method and budget of e_std.
std = read_run(f"{D}/e_std/run.h5")
ctx = std.cells[0].context_size if std.cells else -1
K = f"{ctx // 1024}K" if ctx > 0 and ctx % 1024 == 0 else f"{ctx} tokens"
ref = next(iter(cells(std, "full").values()))
tf_runs = [("e_std", std)]
if os.path.exists(f"{D}/e_std_ctx/run.h5"):
    tf_runs.append(("e_std_ctx", read_run(f"{D}/e_std_ctx/run.h5")))
for name, run in tf_runs:
    rref = next(iter(cells(run, "full").values()))
    print(f"## Training-free methods on the long model, {K}, protocol {run.protocol or '?'} ({name}), "
          f"{len(rref['f1'])} examples; reference: the full cache\n")
    print(hdr)
    for m in run.eval:
        for b, c in cells(run, m).items():
            if m == "full" and b != next(iter(cells(run, "full"))):
                continue
            print(row(m, b if m != "full" else "1 (all)", c, rref))
    if name == "e_std":
        for extra, m in (("e_rag_original", "rag"),):
            try:
                r = read_run(f"{D}/{extra}/run.h5")
                for b, c in cells(r, m).items():
                    print(row(f"{m} (original positions)", b, c, ref))
            except Exception as e:  # noqa
                print(f"<!-- {extra}: {e} -->")
    print()
if len(tf_runs) == 2:
    qa, co = tf_runs[0][1], tf_runs[1][1]
    print(f"## Query-agnostic against query-aware: same method, budget and examples ({co.protocol} - {qa.protocol})\n")
    print("| method | budget | F1 query-aware | F1 query-agnostic | ΔF1 [95% paired] | McNemar on EM: only agnostic / "
          "only aware, p |\n|---|---|---|---|---|---|")
    for m in co.eval:
        if m == "full" or m not in qa.eval:
            continue
        a_cells = cells(qa, m)
        for b, c in cells(co, m).items():
            if b not in a_cells:
                continue
            a = a_cells[b]
            assert a["ids"] == c["ids"], "not the same examples"
            d, lo, hi, _ = ST.paired_bootstrap(c["f1"], a["f1"])
            n01, n10, p = ST.mcnemar_exact(c["em"], a["em"])
            print(f"| {m} | {b} | {fmt(float(np.mean(a['f1'])))} | {fmt(float(np.mean(c['f1'])))} | "
                  f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {n10} / {n01}, p = {p:.2g} |")
    print()

print(f"## Trained methods, training seeds 1234, 2, 3 where present (fine-tuned from the long model), {K}, "
      f"the same {len(ref['f1'])} examples\n")
print(hdr.replace("vs reference", "vs the same seed's control (full cache)").replace("only ref", "only control"))
per = {}
tb = None  # the trained methods' budget: the one the control was evaluated at (scripts/study_4k.sh: 0.125)
for s in ("1234", "2", "3"):
    try:
        tb, ctrl = next(iter(cells(read_run(f"{D}/e_control_s{s}/run.h5"), "full").items()))
    except Exception as e:  # noqa
        print(f"<!-- control {s}: {e} -->"); continue
    per.setdefault("control", []).append(ctrl)
    for name, run, m in (("dsrsq", f"e_dsrsq_s{s}", "dsrsq"), ("gca", f"e_gca_s{s}", "gca"),
                         ("atskv", f"e_atskv_s{s}", "atskv")):
        try:
            cs = cells(read_run(f"{D}/{run}/run.h5"), m)
        except Exception as e:  # noqa
            print(f"<!-- {run}: {e} -->"); continue
        for b, c in cs.items():
            if m == "atskv" and b != tb:
                continue
            per.setdefault((name, b), []).append(c)
            # DSRSQ's backbone and GCA (started from the long model) were fine-tuned: their reference is the
            # control of the same seed; ATSKV's predictor
            # sits on the frozen long model: its reference is the long model's full cache.
            print(row(f"{name} seed {s}" + (" (vs the long model's full cache)" if m == "atskv" else ""), b, c,
                      ref if m == "atskv" else ctrl))
    print(row(f"control seed {s} vs the long model's full cache", "1 (all)", ctrl, ref))
try:
    c = cells(read_run(f"{D}/e_dsrsq_compact/run.h5"), "dsrsq")[tb]
    ctrl = cells(read_run(f"{D}/e_control_s1234/run.h5"), "full")[tb]
    print(row("dsrsq, compact positions, seed 1234", tb, c, ctrl))
    o = cells(read_run(f"{D}/e_dsrsq_s1234/run.h5"), "dsrsq")[tb]
    d, lo, hi, _ = ST.paired_bootstrap(c["f1"], o["f1"]); n01, n10, p = ST.mcnemar_exact(c["em"], o["em"])
    print(f"\ncompact - original positions (seed 1234): ΔF1 {d:+.3f} [{lo:+.3f}, {hi:+.3f}], McNemar {n10} / {n01}, p = {p:.2g}")
except Exception as e:  # noqa
    print(f"<!-- compact: {e} -->")
print("\n## Across seeds (mean of the per-seed F1; spread = min..max over seeds)\n")
for k, cs in per.items():
    f = [float(np.mean(c["f1"])) for c in cs]
    print(f"- {k}: {len(f)} seeds, F1 {np.mean(f):.3f} (min {min(f):.3f}, max {max(f):.3f}); per seed {', '.join(fmt(x) for x in f)}")
