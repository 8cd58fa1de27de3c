"""Issue 13: one table across context sizes from scripts/study_4k.sh evaluation folders (STUDY_EVAL_DIR of each
size), as markdown on stdout. Each cell: F1 [95% bootstrap] and the paired test against the reference of the same
size and examples: the long model's full cache for training-free methods and ATSKV, the same seed's control for
DSRSQ. Reads the runs through the report tool's reader and statistics.
Usage: /usr/bin/python3 scripts/study_sizes_table.py [--budget B] DIR [DIR ...]   (e.g. STUDY STUDY/ctx8192
STUDY/ctx16384; --budget: only that budget's cells, e.g. 0.125)"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "analysis"))
from dsrsq_report.reader import read_run
from dsrsq_report import stats as ST

args = sys.argv[1:]
only = None
if len(args) >= 2 and args[0] == "--budget":
    only, args = args[1], args[2:]
if not args:
    sys.exit("usage: study_sizes_table.py [--budget B] DIR [DIR ...]")


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
    if ref is None:
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
    assert c["ids"] == ref["ids"], "not the same examples"
    n01, n10, p = ST.mcnemar_exact(c["em"], ref["em"])
    d = float(np.mean(c["f1"]) - np.mean(ref["f1"]))
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]; {d:+.3f}, {n10}/{n01}, p={p:.2g}"


dirs = args
rows, heads = {}, []
for d in dirs:
    full = cells(f"{d}/e_std/run.h5", "full")
    ref = next(iter(full.values())) if full else None
    heads.append(f"{ref['ctx']} tokens (n = {len(ref['f1'])})" if ref else d)
    std_methods = list(read_run(f"{d}/e_std/run.h5").eval) if ref else []
    entries = [(m, f"{d}/e_std/run.h5", m, "full") for m in std_methods]
    entries.append(("rag (original positions)", f"{d}/e_rag_original/run.h5", "rag", "full"))
    for s in ("1234", "2", "3"):
        entries += [(f"control seed {s}", f"{d}/e_control_s{s}/run.h5", "full", "full"),
                    (f"dsrsq seed {s}", f"{d}/e_dsrsq_s{s}/run.h5", "dsrsq", s),
                    (f"atskv seed {s}", f"{d}/e_atskv_s{s}/run.h5", "atskv", "full")]
    entries.append(("dsrsq compact positions, seed 1234", f"{d}/e_dsrsq_compact/run.h5", "dsrsq", "1234"))
    for name, path, m, against in entries:
        r = ref if against == "full" else next(iter(cells(f"{d}/e_control_s{against}/run.h5", "full").values()), None)
        for b, c in cells(path, m).items():
            if only is not None and m != "full" and b != only:
                continue
            key = (name, "1 (all)" if m == "full" else b)
            rows.setdefault(key, {})[d] = cell_text(c, None if name == "full" else r)

print("Each cell: F1 [95% bootstrap]; ΔF1 against its reference (the full cache; for DSRSQ the same seed's "
      "control), McNemar on EM (only this / only the reference), p.\n")
print("| method | budget | " + " | ".join(heads) + " |")
print("|---|---|" + "---|" * len(dirs))
for (name, b), per in rows.items():
    print(f"| {name} | {b} | " + " | ".join(per.get(d, "") for d in dirs) + " |")
