"""Evaluation cells (context size x KV budget) of one or several runs: merging, the budget-to-95% table, the
paired tests against the full cache and the Pareto data.

A run (schema 3) evaluates every method in every cell on the same test examples; a Slurm array splits the cells
over tasks and this module merges them again. Runs merge into one sweep when their resolved configs agree on
every option except the swept ones (SWEPT_KEYS) and bookkeeping (aggregate.NON_IDENTITY_KEYS, the seed
excepted: another seed is another set of examples); runs that do not are separate sweeps (or, with
--one-sweep, refused). Within a sweep the examples of a context size must be the same in every run (ids and gold
answers, in order), else the merge is refused with a message naming both files.
"""

import copy
import math

import numpy as np

from . import schema as S
from .aggregate import NON_IDENTITY_KEYS
from .reader import ReportError
from .stats import BOOTSTRAP_SAMPLES, bootstrap_mean_ci, mcnemar_exact, paired_bootstrap

FULL = "full"          # the reference method: the full cache
KEEP = 0.95            # "keeps >= 95% of the full cache's F1"
# Options a sweep varies between runs (cells), and options that do not change what a cell measures.
# `model` is swept too: a trained method (dsrsq, atskv) is evaluated in a run of its own model, on its own
# checkpoint, and its cells join the standard model's cells of the same examples; _merge refuses a method whose
# cells come from runs of different models (a full cache on a fine-tuned backbone is another method).
SWEPT_KEYS = {"kv_budget", "methods", "eval_context_sizes", "command", "ablation", "ablation_variants", "model"}
FREE_KEYS = (SWEPT_KEYS | NON_IDENTITY_KEYS) - {"seed"}


class MergeError(ReportError):
    """Runs that cannot merge into one sweep (printed as one line, exit 2)."""

    def __init__(self, message):
        self.path, self.group, self.message = None, None, message
        Exception.__init__(self, message)


def _bare(k):
    return k.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- cells of one run
class CellResult:
    """One method in one cell: its per-example arrays (rows of the cell, in order) and its state."""

    def __init__(self, run, method, cell, rows):
        ex = run.eval[method]
        self.run, self.method, self.cell = run, method, cell
        self.context_size, self.kv_budget = cell.context_size, cell.kv_budget
        self.state, self.message = run.cell_status.get(method, {}).get(cell.index, run.state("eval", method))
        self.ids = [ex.strings["id"][i] for i in rows]
        self.golds = [ex.strings["gold"][i] for i in rows]
        self.meta = [ex.meta[i] for i in rows]
        idx = np.asarray(rows, dtype=np.int64)

        def col(name):
            a = np.asarray(ex.cols[name])[idx].astype(np.float64)
            if np.issubdtype(np.asarray(ex.cols[name]).dtype, np.integer):
                a[np.asarray(ex.cols[name])[idx] < 0] = np.nan
            return a
        self.f1, self.em = col("f1"), col("em")
        self.kv_bytes = col("kv_total_bytes")            # held after prefill, every tier
        self.kv_resident = col("kv_resident_bytes")
        self.requested = col("kv_budget_requested_bytes")
        self.infeasible = col("kv_infeasible")
        self.efficiency = run.cell_efficiency.get(method, {}).get(cell.index, {})

    @property
    def n(self):
        return len(self.ids)

    @property
    def failed(self):
        return self.state == "failed"

    @property
    def done(self):
        return self.state == "done" and self.n > 0

    @property
    def n_infeasible(self):
        return int(np.nansum(self.infeasible))


def run_cells(run):
    """{(method, context_size, kv_budget): CellResult} of one run (methods in the run's order)."""
    out = {}
    for m, ex in run.eval.items():
        cell_of = np.asarray(ex.cols.get("cell", np.zeros(ex.n, dtype=np.int64)))
        listed = set(run.cell_status.get(m, {})) | set(cell_of.tolist())
        for c in run.cells:
            if c.index not in listed:
                continue
            rows = np.nonzero(cell_of == c.index)[0].tolist()
            out[(m, c.context_size, c.kv_budget)] = CellResult(run, m, c, rows)
    return out


# --------------------------------------------------------------------------- merging runs into sweeps
class Sweep:
    def __init__(self, label, runs):
        self.label, self.runs = label, runs
        self.cells = {}      # (method, context_size, budget) -> CellResult
        self.methods = []    # first-appearance order
        self.context_sizes = []
        self.budgets = []    # ascending (see _order_budgets)
        self.notes = []

    def cell(self, m, c, b):
        return self.cells.get((m, c, b))

    def reference(self, c, b=None):
        """The full cache's cell at context size c (at budget b when there is one: the same examples and the
        same run; the full cache's predictions do not depend on the budget)."""
        if b is not None and self.cell(FULL, c, b) is not None and self.cell(FULL, c, b).done:
            return self.cell(FULL, c, b)
        for bb in self.budgets:
            r = self.cell(FULL, c, bb)
            if r is not None and r.done:
                return r
        return None


def _identity(run):
    return {_bare(k): v for k, v in run.config.items() if _bare(k) not in FREE_KEYS}


def _mismatch(a, b):
    """Options both runs set to different values (an option only one run has is a method's own setting of a
    method the other does not run, or comes from another build: not compared)."""
    ia, ib = _identity(a), _identity(b)
    return sorted(k for k in set(ia) & set(ib) if ia[k] != ib[k])


def _order_budgets(sweep):
    """Budgets ascending: by fraction when all are fractions, else by the median requested bytes of their cells."""
    texts = sweep.budgets
    fr = {}
    for (m, c, b), r in sweep.cells.items():
        fr.setdefault(b, r.cell)
    if all(math.isfinite(fr[b].fraction) for b in texts):
        key = {b: fr[b].fraction for b in texts}
    else:
        key = {}
        for b in texts:
            req = np.concatenate([r.requested for (m, c, bb), r in sweep.cells.items() if bb == b and r.n] or
                                 [np.array([np.nan])])
            key[b] = float(np.nanmedian(req)) if np.isfinite(req).any() else math.inf
    sweep.budgets = sorted(texts, key=lambda b: (key[b], b))


def build_sweeps(runs, one_sweep=False):
    """Groups runs into sweeps and merges their cells. Raises MergeError on a conflict within a sweep (or, with
    one_sweep, when the runs do not form one sweep)."""
    groups = []  # [(representative run, [runs])]
    for r in runs:
        for rep, members in groups:
            if not _mismatch(rep, r) and _identity(rep).get("seed") == _identity(r).get("seed"):
                members.append(r)
                break
        else:
            groups.append((r, [r]))
    if one_sweep and len(groups) > 1:
        a, b = groups[0][0], groups[1][0]
        diff = _mismatch(a, b)
        ia, ib = _identity(a), _identity(b)
        what = ", ".join(f"{k}: {ia.get(k)!r} vs {ib.get(k)!r}" for k in diff) or \
            f"seed: {ia.get('seed')!r} vs {ib.get('seed')!r}"
        raise MergeError(f"--one-sweep: {a.path} and {b.path} cannot merge into one sweep: they differ in {what} "
                         f"(runs of one sweep may differ only in {', '.join(sorted(SWEPT_KEYS))} and bookkeeping "
                         "options)")
    sweeps = []
    for i, (rep, members) in enumerate(groups):
        label = "" if len(groups) == 1 else _group_label(rep, [g[0] for g in groups])
        sweeps.append(_merge(label, members))
    return sweeps


def _group_label(rep, reps):
    keys = set()
    for o in reps:
        keys.update(_mismatch(rep, o))
        if _identity(o).get("seed") != _identity(rep).get("seed"):
            keys.add("seed")
    ident = _identity(rep)
    return ", ".join(f"{k}={ident.get(k)}" for k in sorted(keys)) or rep.name


def _merge(label, runs):
    sw = Sweep(label, runs)
    examples = {}  # context size -> (ids, golds, run path)
    model_of = {}  # method -> (model, run path) of the first run that gave its cells
    for r in runs:
        model = r.config_value("model")
        for key, res in run_cells(r).items():
            m, c, b = key
            prev_model = model_of.setdefault(m, (model, r.path))
            if prev_model[0] != model:
                raise MergeError(
                    f"method '{m}' has cells in {prev_model[1]} (--model {prev_model[0]}) and {r.path} (--model "
                    f"{model}): on different weights it is not one method; evaluate it in runs of one model "
                    "(--methods) only")
            if res.n:
                prev = examples.get(c)
                if prev is None:
                    examples[c] = (res.ids, res.golds, r.path)
                elif prev[0] != res.ids or prev[1] != res.golds:
                    raise MergeError(
                        f"{prev[2]} and {r.path} hold different test examples at context size {c} (example ids or "
                        f"gold answers differ): their cells cannot be merged. Runs of one sweep must share the "
                        "examples of a context size: split a sweep over --kv_budget and --methods with the same "
                        "--eval_context_sizes, --num_test, --seed and data options")
            old = sw.cells.get(key)
            if old is not None:
                if old.done and res.done and (old.ids != res.ids or not np.array_equal(old.f1, res.f1, equal_nan=True)):
                    sw.notes.append(f"cell ({m}, context {c}, budget {b}) is in {old.run.path} and {r.path} with "
                                    "different scores; the first is used")
                elif not old.done and res.done:
                    sw.cells[key] = res
                continue
            sw.cells[key] = res
            if m not in sw.methods:
                sw.methods.append(m)
            if c not in sw.context_sizes:
                sw.context_sizes.append(c)
            if b not in sw.budgets:
                sw.budgets.append(b)
    sw.context_sizes.sort()
    _order_budgets(sw)
    if FULL in sw.methods:  # the reference first
        sw.methods.remove(FULL)
        sw.methods.insert(0, FULL)
    return sw


# --------------------------------------------------------------------------- per-cell statistics
def cell_status_text(res):
    if res is None:
        return "missing"
    if res.failed:
        msg = (res.message or "").strip().replace("\n", " ")
        return "FAILED" + (f": {msg[:120]}" if msg else "")
    if not res.done:
        return res.state if res.state != "done" else "no examples"
    if res.n_infeasible:
        return f"infeasible on {res.n_infeasible}/{res.n}"
    return "ok"


def cell_stats(sweep, m, c, b):
    """Everything the cell table shows for (method, context size, budget), or None when the cell is absent."""
    res = sweep.cell(m, c, b)
    if res is None:
        return None
    out = {"method": m, "context_size": c, "kv_budget": b, "status": cell_status_text(res), "n": res.n,
           "failed": res.failed, "infeasible": res.done and res.n_infeasible > 0, "n_infeasible": res.n_infeasible,
           "f1": math.nan, "f1_lo": math.nan, "f1_hi": math.nan, "em": math.nan, "kv_bytes": math.nan,
           "requested_bytes": math.nan, "ratio": math.nan, "df1": math.nan, "df1_lo": math.nan, "df1_hi": math.nan,
           "p_bootstrap": math.nan, "mcnemar_n01": None, "mcnemar_n10": None, "p_mcnemar": math.nan}
    if not res.done:
        return out
    out["f1"], out["f1_lo"], out["f1_hi"] = bootstrap_mean_ci(res.f1)
    out["em"] = float(np.nanmean(res.em)) if np.isfinite(res.em).any() else math.nan
    out["kv_bytes"] = float(np.nanmean(res.kv_bytes)) if np.isfinite(res.kv_bytes).any() else math.nan
    out["requested_bytes"] = float(np.nanmean(res.requested)) if np.isfinite(res.requested).any() else math.nan
    ref = sweep.reference(c, b)
    if ref is not None and m != FULL:
        if ref.ids != res.ids:  # cannot happen after _merge; a guard for hand-made inputs
            raise MergeError(f"cell ({m}, context {c}, budget {b}) and the full cache's cell hold different examples")
        full_f1 = float(np.nanmean(ref.f1))
        out["ratio"] = out["f1"] / full_f1 if full_f1 > 0 else math.nan
        out["df1"], out["df1_lo"], out["df1_hi"], out["p_bootstrap"] = paired_bootstrap(res.f1, ref.f1)
        out["mcnemar_n01"], out["mcnemar_n10"], out["p_mcnemar"] = mcnemar_exact(res.em, ref.em)
    return out


def keep95(sweep, m, c):
    """The smallest budget at which method m keeps >= 95% of the full cache's F1 at context size c.

    Returns (text, budget or None). Infeasible cells (an example held more than its budget) and failed cells do
    not count; they are named when no budget qualifies."""
    ref = sweep.reference(c)
    cells = [(b, sweep.cell(m, c, b)) for b in sweep.budgets if sweep.cell(m, c, b) is not None]
    if not cells:
        return "not run", None
    if all(r.failed for _, r in cells):
        return "failed", None
    if ref is None:
        return "n/a (no full-cache cell)", None
    full_f1 = float(np.nanmean(ref.f1))
    if not full_f1 > 0:
        return "n/a (full-cache F1 is 0)", None
    infeasible, failed = [], []
    for b, r in cells:
        if r.failed:
            failed.append(b)
            continue
        if not r.done:
            continue
        if r.n_infeasible:
            infeasible.append(b)
            continue
        if float(np.nanmean(r.f1)) >= KEEP * full_f1:
            return b, b
    why = []
    if infeasible:
        why.append("infeasible at " + ", ".join(infeasible))
    if failed:
        why.append("failed at " + ", ".join(failed))
    if infeasible and len(infeasible) + len(failed) == len(cells):
        return "infeasible" + (f" ({'; '.join(why)})" if len(why) > 1 else f" at {', '.join(infeasible)}"), None
    return "never" + (f" ({'; '.join(why)})" if why else ""), None


# --------------------------------------------------------------------------- Pareto data
def pareto_data(sweep):
    """Per context size: the full cache's reference and every method's points in budget order.

    {c: {"reference": {f1, lo, hi, kv_bytes} or None, "methods": {m: [point]}, "frontier": [(m, budget)]}}, a
    point = {budget, kv_bytes, f1, lo, hi, n, status: ok | infeasible | failed | missing}. The frontier holds the
    done, feasible points no other such point beats in both KV bytes (fewer) and F1 (higher)."""
    out = {}
    for c in sweep.context_sizes:
        ref = sweep.reference(c)
        refd = None
        if ref is not None:
            f, lo, hi = bootstrap_mean_ci(ref.f1)
            refd = {"f1": f, "lo": lo, "hi": hi, "kv_bytes": float(np.nanmean(ref.kv_bytes)), "n": ref.n}
        methods = {}
        for m in sweep.methods:
            pts = []
            for b in sweep.budgets:
                res = sweep.cell(m, c, b)
                if res is None:
                    continue
                p = {"budget": b, "kv_bytes": math.nan, "f1": math.nan, "lo": math.nan, "hi": math.nan, "n": res.n,
                     "status": "failed" if res.failed else ("missing" if not res.done else
                                                            "infeasible" if res.n_infeasible else "ok")}
                if res.done:
                    p["f1"], p["lo"], p["hi"] = bootstrap_mean_ci(res.f1)
                    p["kv_bytes"] = float(np.nanmean(res.kv_bytes))
                pts.append(p)
            if pts:
                methods[m] = pts
        cand = [(m, p) for m, pts in methods.items() for p in pts
                if p["status"] == "ok" and math.isfinite(p["kv_bytes"]) and math.isfinite(p["f1"])]
        frontier = []
        for m, p in cand:
            dominated = any(q["kv_bytes"] <= p["kv_bytes"] and q["f1"] >= p["f1"] and
                            (q["kv_bytes"] < p["kv_bytes"] or q["f1"] > p["f1"]) for _, q in cand)
            if not dominated:
                frontier.append((m, p["budget"]))
        out[c] = {"reference": refd, "methods": methods, "frontier": frontier}
    return out


# --------------------------------------------------------------------------- the existing tables on sweeps
def _merge_efficiency(effs, ns):
    """Exact merge of cell efficiencies (schema 3 numerators); NaN where a numerator is unknown."""
    if len(effs) == 1:
        return dict(effs[0])
    nan = math.nan

    def g(e, k):
        v = e.get(k, nan)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return nan
        return nan if (k in S.EFFICIENCY_INT + S.EFFICIENCY_MERGE_INT and v < 0) else v
    n = float(sum(ns))
    out = {}
    out["peak_mem_bytes"] = max((g(e, "peak_mem_bytes") for e in effs), default=nan)
    out["process_peak_rss_bytes"] = max((g(e, "process_peak_rss_bytes") for e in effs), default=nan)
    for k in ("avg_mem_bytes", "latency_s", "itl_s"):
        out[k] = sum(g(e, k) * w for e, w in zip(effs, ns)) / n if n > 0 else nan
    for k in ("flops",) + S.EFFICIENCY_MERGE_FLOAT + S.EFFICIENCY_MERGE_INT:
        out[k] = sum(g(e, k) for e in effs)
    out["throughput_tok_s"] = out["tokens_run"] / out["serve_s"] if out["serve_s"] > 0 else nan
    out["context_tokens_per_s"] = out["context_tokens_served"] / out["serve_s"] if out["serve_s"] > 0 else nan
    d = out["decode_examples"]
    out["token_efficiency"] = (sum(g(e, "token_efficiency") * g(e, "decode_examples") for e in effs
                                   if g(e, "decode_examples") > 0) / d) if d > 0 else nan
    return out


def _budget_summary(ex, cell_summaries):
    """The summary scalars of a budget's rows: means from the rows, n_examples = rows; corpus BLEU-4 does not
    decompose over cells: the cell's value when the budget has one cell, else NaN (shown n/a)."""
    def mean(c):
        a = np.asarray(ex.cols[c], dtype=np.float64)
        return float(a.mean()) if a.size else math.nan
    known = [s for s in cell_summaries if s is not None]
    return {"f1_mean": mean("f1"), "em_mean": mean("em"), "rouge_l_mean": mean("rouge_l"), "bleu_mean": mean("bleu"),
            "corpus_bleu": known[0].get("corpus_bleu", math.nan) if len(cell_summaries) == 1 and known else math.nan,
            "n_examples": ex.n}


def _subset(ex, mask):
    from .reader import Examples
    idx = np.nonzero(mask)[0]
    cols = {k: np.asarray(v)[idx] for k, v in ex.cols.items()}
    strings = {k: [v[i] for i in idx] for k, v in ex.strings.items()}
    out = Examples(cols, strings, dict(ex.summary), ex.efficiency)
    out.n = len(idx)
    return out


def _cells_run(r, ks, **config):
    """A pseudo-run of run r holding only cells ks: their rows, their cells' efficiency merged exactly, their
    cells' states; config keys given here replace the run's (e.g. kv_budget)."""
    p = copy.copy(r)
    p.cells = [c for c in r.cells if c.index in ks]
    p.config = {k: (config[_bare(k)] if _bare(k) in config else v) for k, v in r.config.items()}
    p.status = {k: dict(v) for k, v in r.status.items()}
    p.eval, p.efficiency, p.ablation = {}, {}, {}
    for m, ex in r.eval.items():
        mask = np.isin(np.asarray(ex.cols["cell"]), ks)
        p.eval[m] = _subset(ex, mask)
        p.eval[m].summary = _budget_summary(p.eval[m], [r.cell_summary.get(m, {}).get(k) for k in ks])
        states = [r.cell_status.get(m, {}).get(k) for k in ks if k in r.cell_status.get(m, {})]
        failed = [s for s in states if s[0] == "failed"]
        if failed:
            p.status["eval"][m] = ("failed", failed[0][1])
        elif states and all(s[0] == "done" for s in states):
            p.status["eval"][m] = ("done", "")
        elif states:
            p.status["eval"][m] = next(s for s in states if s[0] != "done")
        effs = [r.cell_efficiency[m][k] for k in ks if k in r.cell_efficiency.get(m, {})]
        ns = [int(np.sum(np.asarray(ex.cols["cell"]) == k)) for k in ks if k in r.cell_efficiency.get(m, {})]
        p.efficiency[m] = _merge_efficiency(effs, ns) if effs else dict(r.efficiency.get(m, {}))
    for v, ex in r.ablation.items():
        q = _subset(ex, np.isin(np.asarray(ex.cols["cell"]), ks))
        q.efficiency = ex.efficiency  # pooled over every cell (no per-cell ablation efficiency)
        p.ablation[v] = q
    return p


def expand_budgets(runs):
    """Runs holding several budgets become one pseudo-run per budget (its cells' rows, its cells' efficiency merged
    exactly, config kv_budget = that budget), so the per-method tables and figures read them as a budget sweep of
    single-budget runs. A run with one budget is returned as it is."""
    out = []
    for r in runs:
        budgets = []
        for c in r.cells:
            if c.kv_budget not in budgets:
                budgets.append(c.kv_budget)
        if len(budgets) < 2:
            out.append(r)
            continue
        for b in budgets:
            out.append(_cells_run(r, [c.index for c in r.cells if c.kv_budget == b], kv_budget=b))
    return out


def restrict_context(runs, size):
    """Tables 1-4 at one context size (report --tables-context N): each run keeps only its cells of that size
    and their rows; a run with none is left out. Refuses when no run has the size."""
    out = []
    for r in runs:
        ks = [c.index for c in r.cells if c.context_size == size]
        if not ks:
            continue
        out.append(r if len(ks) == len(r.cells) else _cells_run(r, ks))
    if not out:
        sizes = sorted({c.context_size for r in runs for c in r.cells})
        raise ReportError(", ".join(r.path for r in runs), "/cells",
                          f"--tables-context {size}: no run has cells of that context size (they have {sizes})")
    return out


# --------------------------------------------------------------------------- rendering
def _f(v, d=4):
    return "n/a" if v is None or not (isinstance(v, (int, float)) and math.isfinite(v)) else f"{v:.{d}f}"


def _p(v):
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def keep95_markdown(sweep):
    head = ["method"] + [f"context {c}" for c in sweep.context_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in sweep.methods:
        lines.append("| " + " | ".join([m] + [keep95(sweep, m, c)[0] for c in sweep.context_sizes]) + " |")
    refs = []
    for c in sweep.context_sizes:
        ref = sweep.reference(c)
        refs.append(f"{c}: {_f(float(np.nanmean(ref.f1)))} (n={ref.n})" if ref is not None else f"{c}: none")
    return "\n".join(lines) + "\n\n" + (
        f"*Rule:* the smallest KV budget (budgets ordered {' < '.join(sweep.budgets)}) at which the method's mean F1 "
        f"over the cell's examples is >= {KEEP:.0%} of the full cache's mean F1 on the same examples. Infeasible "
        "cells (an example held more KV bytes than its budget: a full cache cannot shrink, a fixed minimum exceeds "
        "the budget) and failed cells never qualify; 'never' names them; 'n/a' when the full cache scores 0 (no "
        "ratio). Full-cache F1 per context size: " + "; ".join(refs) + ".")


def keep95_csv(sweep):
    rows = ["sweep,method,context_size,budget_to_95pct,budget"]
    for m in sweep.methods:
        for c in sweep.context_sizes:
            text, b = keep95(sweep, m, c)
            rows.append(",".join(_csv(x) for x in (sweep.label, m, c, text, b or "")))
    return "\n".join(rows) + "\n"


CELL_COLS = ("context_size", "method", "kv_budget", "status", "n", "f1", "f1_lo", "f1_hi", "em", "kv_bytes",
             "requested_bytes", "ratio", "df1", "df1_lo", "df1_hi", "p_bootstrap", "mcnemar_n01", "mcnemar_n10",
             "p_mcnemar")


def all_cell_stats(sweep):
    out = []
    for c in sweep.context_sizes:
        for m in sweep.methods:
            for b in sweep.budgets:
                s = cell_stats(sweep, m, c, b)
                if s is not None:
                    out.append(s)
    return out


def cells_markdown(sweep, stats=None):
    stats = all_cell_stats(sweep) if stats is None else stats
    head = ["context", "method", "budget", "status", "n", "F1 [95% CI]", "KV bytes (MB)", "F1 / full",
            "ΔF1 vs full [95% CI]", "p (paired bootstrap)", "McNemar EM (b, c, p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        if s["failed"]:
            vals = ["failed"] * 6
        else:
            f1 = f"{_f(s['f1'])} [{_f(s['f1_lo'])}, {_f(s['f1_hi'])}]" if math.isfinite(s["f1"]) else "n/a"
            d = (f"{s['df1']:+.4f} [{s['df1_lo']:+.4f}, {s['df1_hi']:+.4f}]" if math.isfinite(s["df1"]) and
                 math.isfinite(s["df1_lo"]) else ("n/a" if not math.isfinite(s["df1"]) else f"{s['df1']:+.4f}"))
            mc = ("n/a" if s["mcnemar_n01"] is None else
                  f"{s['mcnemar_n10']}, {s['mcnemar_n01']}, {_p(s['p_mcnemar'])}")
            # A bootstrap p of 0: no resample crossed 0, i.e. p < 1 / resamples.
            pb = f"<{1 / BOOTSTRAP_SAMPLES:.1g}" if s["p_bootstrap"] == 0 else _p(s["p_bootstrap"])
            vals = [f1, _f(s["kv_bytes"] * 1e-6, 4) if math.isfinite(s["kv_bytes"]) else "n/a",
                    _f(s["ratio"], 3), d, pb, mc]
        lines.append("| " + " | ".join([str(s["context_size"]), s["method"], s["kv_budget"],
                                        s["status"].replace("|", "/"), str(s["n"])] + vals) + " |")
    return "\n".join(lines) + "\n\n" + (
        "*Aggregation:* per cell (method, context size, budget) the mean F1 over its examples with a 95% percentile "
        "bootstrap interval (examples resampled with replacement, 2000 resamples, fixed seed); KV bytes = mean "
        "kv_total_bytes (held after prefill in every tier; MB = 10^6 bytes); F1 / full = the cell's mean F1 over the "
        "full cache's on the same examples (n/a when the full cache scores 0). Paired tests against the full cache "
        "on the same examples: ΔF1 = mean(F1 - F1_full) with a paired bootstrap interval and two-sided p; McNemar's "
        "exact test on per-example EM (b = examples only this method got right, c = only the full cache got right). "
        "'infeasible on k/n': k examples held more than their budget; 'failed': the cell's evaluation failed.")


def cells_csv(sweep, stats=None):
    stats = all_cell_stats(sweep) if stats is None else stats
    rows = ["sweep," + ",".join(CELL_COLS)]
    for s in stats:
        vals = [sweep.label] + ["" if s[k] is None or (isinstance(s[k], float) and not math.isfinite(s[k]))
                                else (repr(float(s[k])) if isinstance(s[k], float) else s[k]) for k in CELL_COLS]
        rows.append(",".join(_csv(v) for v in vals))
    return "\n".join(rows) + "\n"


def _csv(s):
    s = str(s)
    if any(ch in s for ch in ',"\n\r'):
        s = '"' + s.replace('"', '""') + '"'
    return s
