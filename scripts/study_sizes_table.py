"""Issue 13: one table across context sizes from scripts/study_4k.sh evaluation folders (STUDY_EVAL_DIR of each
size), as markdown on stdout. Each cell: F1 [95% bootstrap] and the paired test against the reference of the same
size and examples: the long model's full cache for training-free methods and ATSKV, the same seed's control for
DSRSQ. Reads the runs through the report tool's reader and statistics.
Usage: /usr/bin/python3 scripts/study_sizes_table.py [--budget B] [--plot PNG] [--title T] [--protocol P] DIR [DIR ...]
(e.g. STUDY STUDY/ctx8192 STUDY/ctx16384; --budget: only that budget's cells, e.g. 0.125; --plot: also F1 against
context size per method, with the intervals, for the first seed of each trained method; --protocol context_only:
the training-free methods of the query-agnostic runs (e_std_ctx), each against that run's full cache, and no
trained method: they were evaluated query-aware)"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "analysis"))
from dsrsq_report.reader import read_run
from dsrsq_report import stats as ST

args = sys.argv[1:]
only = plot = title = None
protocol = "query_aware"
while len(args) >= 2 and args[0] in ("--budget", "--plot", "--protocol", "--title"):
    if args[0] == "--budget":
        only = args[1]
    elif args[0] == "--plot":
        plot = args[1]
    elif args[0] == "--title":
        title = args[1]
    else:
        protocol = args[1]
    args = args[2:]
if not args or protocol not in ("query_aware", "context_only"):
    sys.exit("usage: study_sizes_table.py [--budget B] [--plot PNG] [--title T] [--protocol query_aware|context_only] "
             "DIR [DIR ...]")
tf_run = "e_std" if protocol == "query_aware" else "e_std_ctx"  # the training-free methods' run (scripts/study_4k.sh)


def cells(path, method):
    """budget text -> (ids, f1, em) of `method` in the run at `path`; {} when the run is absent."""
    if not os.path.exists(path):
        return {}
    run = read_run(path)
    if method not in run.eval:
        return {}
    ex = run.eval[method]
    out = {}
    for c in run.cells:
        idx = np.nonzero(np.asarray(ex.cols["cell"]) == c.index)[0]
        if idx.size:
            out[c.kv_budget] = dict(ids=[ex.strings["id"][i] for i in idx], f1=np.asarray(ex.cols["f1"])[idx],
                                    em=np.asarray(ex.cols["em"])[idx], ctx=c.context_size)
    return out


def cell_text(c, ref):
    m, lo, hi = ST.bootstrap_mean_ci(c["f1"])
    curve.setdefault(current, {})[c["ctx"]] = (m, lo, hi)
    if ref is None:
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
    assert c["ids"] == ref["ids"], "not the same examples"
    n01, n10, p = ST.mcnemar_exact(c["em"], ref["em"])
    d = float(np.mean(c["f1"]) - np.mean(ref["f1"]))
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]; {d:+.3f}, {n10}/{n01}, p={p:.2g}"


dirs = args
rows, heads = {}, []
curve, current = {}, None  # (method, budget) -> {context: (F1, lo, hi)}: the plot's points
for d in dirs:
    full = cells(f"{d}/{tf_run}/run.h5", "full")
    ref = next(iter(full.values())) if full else None
    heads.append(f"{ref['ctx']} tokens (n = {len(ref['f1'])})" if ref else d)
    std_methods = list(read_run(f"{d}/{tf_run}/run.h5").eval) if ref else []
    entries = [(m, f"{d}/{tf_run}/run.h5", m, "full") for m in std_methods]
    if protocol == "query_aware":  # the trained methods and RAG at original positions ran query-aware only
        entries.append(("rag (original positions)", f"{d}/e_rag_original/run.h5", "rag", "full"))
        for s in ("1234", "2", "3"):
            entries += [(f"control seed {s}", f"{d}/e_control_s{s}/run.h5", "full", "full"),
                        (f"dsrsq seed {s}", f"{d}/e_dsrsq_s{s}/run.h5", "dsrsq", s),
                        (f"gca seed {s}", f"{d}/e_gca_s{s}/run.h5", "gca", s),
                        (f"atskv seed {s}", f"{d}/e_atskv_s{s}/run.h5", "atskv", "full")]
        entries.append(("dsrsq compact positions, seed 1234", f"{d}/e_dsrsq_compact/run.h5", "dsrsq", "1234"))
    for name, path, m, against in entries:
        r = ref if against == "full" else next(iter(cells(f"{d}/e_control_s{against}/run.h5", "full").values()), None)
        for b, c in cells(path, m).items():
            if only is not None and m != "full" and b != only:
                continue
            key = (name, "1 (all)" if m == "full" else b)
            current = key
            rows.setdefault(key, {})[d] = cell_text(c, None if name == "full" else r)

print("Each cell: F1 [95% bootstrap]; ΔF1 against its reference (the full cache; for DSRSQ and GCA the same "
      "seed's control), McNemar on EM (only this / only the reference), p.\n")
print("| method | budget | " + " | ".join(heads) + " |")
print("|---|---|" + "---|" * len(dirs))
for (name, b), per in rows.items():
    print(f"| {name} | {b} | " + " | ".join(per.get(d, "") for d in dirs) + " |")

if plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.6, 4.0))
    colors = iter(plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
    for (name, b), pts in curve.items():
        if (" seed " in name and not name.endswith("seed 1234")) or "compact" in name or len(pts) < 2:
            continue
        xs = sorted(pts)
        ys = np.array([pts[x][0] for x in xs])
        err = np.array([[pts[x][0] - pts[x][1] for x in xs], [pts[x][2] - pts[x][0] for x in xs]])
        style = dict(lw=2.2, color="black") if name == "full" else dict(lw=1.2, color=next(colors))
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=name.replace(" seed 1234", ""), **style)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for pts in curve.values() for x in pts})
    ax.set_xticks(ticks, [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("context tokens")
    ax.set_ylabel("F1 (95% bootstrap)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title or f"F1 against context length" + (f", budget {only}" if only else ""), fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(plot, dpi=90)
    print(f"\n(plot: {plot})")
