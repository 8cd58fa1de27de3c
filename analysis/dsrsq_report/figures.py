"""Figures (PNG). Each maker returns a Figure record: a file, or None with the reason it was skipped."""

import math
import os

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import schema as S  # noqa: E402
from .aggregate import group_runs, rank_summary, estimate, Col  # noqa: E402
from .stats import mean_ci  # noqa: E402

plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
                     "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.dpi": 110, "savefig.dpi": 110})

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
LINES = ("-", "--", "-.", ":")


def _style(i):
    """Distinct marker, line style and size so that coinciding series stay visible."""
    return dict(marker=MARKERS[i % len(MARKERS)], ls=LINES[i % len(LINES)], ms=max(4, 9 - 1.5 * i), color=f"C{i % 10}")


LOSS_TERMS = ("loss_task", "loss_retrieval", "loss_compression", "loss_compute")


class Figure:
    def __init__(self, name, path, caption, note=""):
        self.name, self.path, self.caption, self.note = name, path, caption, note


def _save(fig, outdir, name):
    path = os.path.join(outdir, name + ".png")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _run_label(run, groups):
    for g in groups:
        if run in g.runs:
            lab = run.name
            return f"{lab} ({g.label})" if g.label else lab
    return run.name


def _entities(groups, kind):
    """[(label, [runs], name, usable entities, failed?)] per (group, method/variant)."""
    out = []
    for g in groups:
        names = []
        for r in g.runs:
            for n in getattr(r, kind):
                if n not in names:
                    names.append(n)
        for n in names:
            runs = [r for r in g.runs if n in getattr(r, kind)]
            st = "eval" if kind in ("eval", "efficiency") else kind
            usable = [r for r in runs if r.state(st, n)[0] != "failed"]
            failed = not usable
            label = n if not g.label else f"{n}\n[{g.label}]"
            if kind in ("eval", "efficiency") and usable:
                # Held more KV bytes than the budget on some examples: not a result at the budget.
                inf = sum(int(np.nansum(r.eval[n].cols.get("kv_infeasible", []))) for r in usable if n in r.eval)
                tot = sum(r.eval[n].n for r in usable if n in r.eval)
                if inf:
                    label += f"\n(INFEASIBLE {inf}/{tot})"
            out.append((label, usable, n, failed))
    return out


def _finite(a):
    a = np.asarray(a, dtype=np.float64)
    return a[np.isfinite(a)]


def _ticks(ax, labels):
    """x tick labels: kept on two lines when few, else one line, rotated; x limits keep FAILED marks inside."""
    x = np.arange(len(labels))
    ax.set_xticks(x)
    if len(labels) <= 4:
        ax.set_xticklabels(labels)
    else:
        ax.set_xticklabels([l.replace("\n", " ") for l in labels], rotation=35, ha="right")
    ax.set_xlim(-0.6, len(labels) - 0.4)


def _bar_panel(ax, labels, ests, failed, ylabel, title, color="C0"):
    for i, (e, f) in enumerate(zip(ests, failed)):
        if f:
            ax.bar(i, 0, color="none")
            ax.text(i, 0, "FAILED", ha="center", va="bottom", color="red", fontweight="bold", rotation=90)
            continue
        if e.n == 0 or not math.isfinite(e.mean):
            ax.text(i, 0, "n/a", ha="center", va="bottom", color="gray")
            continue
        err = e.half if (e.n > 1 and math.isfinite(e.half)) else None
        ax.bar(i, e.mean, yerr=err, capsize=4, color=color, alpha=0.85)
    _ticks(ax, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


# --------------------------------------------------------------------------- training
def fig_loss(runs, groups, outdir):
    have = [r for r in runs if len(r.train.get("step", [])) or len(r.val.get("step", []))]
    if not have:
        return Figure("loss", None, "", "no /train or /val rows in these runs")
    plotted, zero = [], []
    for t in LOSS_TERMS:
        vals = np.concatenate([_finite(r.train.get(t, [])) for r in have])
        (plotted if vals.size and np.any(vals != 0) else zero).append(t)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6 + (0.25 * len(have) + 0.6 if len(have) > 2 else 0)))
    ax = axes[0]
    many = len(have) > 2
    for i, r in enumerate(have):
        c = f"C{i % 10}"
        lw = 1.5 + 1.5 * (len(have) - 1 - i) / max(1, len(have) - 1) if many else 1.5  # coinciding runs stay visible
        lab = _run_label(r, groups)
        if len(r.train.get("step", [])):
            ax.plot(r.train["step"], r.train["loss_total"], color=c, lw=lw,
                    label=lab if many else f"train loss_total: {lab}")
        if len(r.val.get("step", [])):
            ax.plot(r.val["step"], r.val["loss"], "o--", color=c, lw=lw, label=None if many else f"validation loss: {lab}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training (solid) and validation (dashed, dots) loss")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=8)
    else:
        ax.legend()
    ax = axes[1]
    styles = {"loss_task": "-", "loss_retrieval": "--", "loss_compression": "-.", "loss_compute": ":"}
    for i, r in enumerate(have):
        for t in plotted:
            lw = 1.5 + 1.5 * (len(have) - 1 - i) / max(1, len(have) - 1) if many else 1.5
            ax.plot(r.train["step"], r.train[t], styles[t], color=f"C{i % 10}", lw=lw,
                    label=f"{t}" + (f": {r.name}" if len(have) > 1 else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss term (unweighted)")
    ax.set_title("hybrid-loss terms" + (" (zero terms omitted)" if zero else ""))
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "all four terms are zero", ha="center", transform=ax.transAxes)
    cap = ("Training loss (loss_total, the optimised objective) per logged step and validation loss; right: the "
           "hybrid-loss terms that are non-zero: " + (", ".join(plotted) or "none") + ".")
    # A run whose loss turned non-finite: say so (its curve stops where it diverged).
    for r in have:
        lt = np.asarray(r.train.get("loss_total", []), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(lt))
        if bad.size:
            step = int(np.asarray(r.train["step"])[bad[0]])
            cap += f" Run {r.name} DIVERGED: non-finite training loss from step {step}."
            axes[0].text(0.02, 0.95, f"{r.name}: diverged at step {step}", transform=axes[0].transAxes, color="red",
                         va="top", fontsize=9)
    if zero:
        cap += " Not plotted because they are zero (or NaN) at every logged step: " + ", ".join(zero) + "."
    return Figure("loss", _save(fig, outdir, "loss"), cap)


def fig_train_metrics(runs, groups, outdir):
    have = [r for r in runs if len(r.train.get("step", []))]
    specs = [("lr", "learning rate"), ("grad_norm", "global gradient L2 norm"),
             ("tokens_per_s", "training throughput (tokens/s)"), ("selected_fraction", "selected fraction (0-1)"),
             ("step_time_s", "step time (s)")]
    def nonzero(k):
        v = np.concatenate([_finite(r.train.get(k, [])) for r in have]) if have else np.zeros(0)
        return v.size > 0 and bool(np.any(v != 0))
    present = [(k, lab) for k, lab in specs if nonzero(k)]
    if not present:
        return Figure("metrics_over_steps", None, "", "no per-step training metrics in these runs")
    n = len(present)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    for ax, (k, lab) in zip(axes.ravel(), present):
        for i, r in enumerate(have):
            ax.plot(r.train["step"], r.train[k], color=f"C{i % 10}", label=r.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        if len(have) > 1:
            ax.legend()
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    absent = [k for k, _ in specs if k not in dict(present)]
    cap = "Per-step training metrics from /train: " + ", ".join(k for k, _ in present) + "."
    if absent:
        cap += " Not plotted (zero or NaN at every logged step): " + ", ".join(absent) + "."
    return Figure("metrics_over_steps", _save(fig, outdir, "metrics_over_steps"), cap)


# --------------------------------------------------------------------------- per-method bars
def _eff_estimates(ents, field, scale=1.0):
    col = Col(field, field, "efficiency", field, scale)
    out = []
    for label, usable, name, failed in ents:
        views = [type("V", (), {"efficiency": r.efficiency.get(name, {})})() for r in usable]
        out.append(estimate(col, views))
    return out


def _ex_estimates(ents, field, scale=1.0, kind="eval"):
    col = Col(field, field, "example", field, scale)
    return [estimate(col, [getattr(r, kind)[name] for r in usable]) for _, usable, name, _ in ents]


def fig_memory(runs, groups, outdir):
    ents = _entities(groups, "eval")
    if not ents:
        return Figure("memory", None, "", "no evaluated methods")
    labels = [e[0] for e in ents]
    failed = [e[3] for e in ents]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [2, 1.2, 2.4]})
    series = [("peak arena", _eff_estimates(ents, "peak_mem_bytes", 1e-6)),
              ("avg arena", _eff_estimates(ents, "avg_mem_bytes", 1e-6))]
    _grouped(axes[0], labels, series, failed, "arena memory (MB)", "activations + KV arenas")
    _bar_panel(axes[1], labels, _eff_estimates(ents, "process_peak_rss_bytes", 1e-6), failed,
               "process peak RSS (MB)", "process peak RSS (process lifetime, not per method)", color="C2")
    kv = [("resident after prefill", _ex_estimates(ents, "kv_resident_bytes", 1e-3)),
          ("peak during prefill", _ex_estimates(ents, "kv_peak_prefill_bytes", 1e-3)),
          ("read per decode step", _ex_estimates(ents, "kv_read_per_step_bytes", 1e-3)),
          ("total (resident + offloaded)", _ex_estimates(ents, "kv_total_bytes", 1e-3))]
    _grouped(axes[2], labels, kv, failed, "KV cache (kB per example)", "KV-cache bytes (mean over examples)")
    cap = ("Left: peak and time-averaged arena memory (activations + KV) per method; middle: peak resident set size "
           "of the process (or device memory); MB = 10^6 bytes. Right: the four KV numbers per example (kB = 10^3 "
           "bytes), mean over examples with 95% intervals.")
    return Figure("memory", _save(fig, outdir, "memory"), cap)


def _grouped(ax, labels, series, failed, ylabel, title, values=False):
    k = len(series)
    w = 0.8 / k
    x = np.arange(len(labels))
    for j, (name, ests) in enumerate(series):
        for i, e in enumerate(ests):
            if failed[i] or e.n == 0 or not math.isfinite(e.mean):
                continue
            err = e.half if (e.n > 1 and math.isfinite(e.half)) else None
            xi = x[i] - 0.4 + w * (j + 0.5)
            ax.bar(xi, e.mean, w, yerr=err, capsize=3, color=f"C{j}",
                   label=name if i == next((q for q in range(len(ests)) if not failed[q]), -1) else None)
            if values:
                ax.text(xi, e.mean + (err or 0), f"{e.mean:.2f}", ha="center", va="bottom", fontsize=8)
    for i, f in enumerate(failed):
        if f:
            ax.text(x[i], 0, "FAILED", ha="center", va="bottom", color="red", fontweight="bold", rotation=90)
    _ticks(ax, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    # Headroom above the tallest bar (with its interval) so the legend never covers the data.
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.3 * (hi - lo))
    ax.legend(loc="upper center", ncol=len(series), bbox_to_anchor=(0.5, 1.0), fontsize=8)


def fig_throughput(runs, groups, outdir):
    ents = _entities(groups, "eval")
    if not ents:
        return Figure("throughput", None, "", "no evaluated methods")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ents) + 2), 4.4))
    _bar_panel(ax, [e[0] for e in ents], _eff_estimates(ents, "throughput_tok_s"), [e[3] for e in ents],
               "throughput (tokens/s)", "evaluation throughput per method")
    return Figure("throughput", _save(fig, outdir, "throughput"),
                  "(Prefilled + generated) tokens per wall-clock second during evaluation, /efficiency/<method>/"
                  "throughput_tok_s; error bars only across seeds.")


def fig_token_efficiency(runs, groups, outdir):
    ents = _entities(groups, "eval")
    if not ents:
        return Figure("token_efficiency", None, "", "no evaluated methods")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ents) + 2), 4.4))
    _bar_panel(ax, [e[0] for e in ents], _eff_estimates(ents, "token_efficiency"), [e[3] for e in ents],
               "keys attended / keys in the full cache (ratio)", "token efficiency per method (lower is cheaper)", color="C2")
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    return Figure("token_efficiency", _save(fig, outdir, "token_efficiency"),
                  "Tokens the core attention attended divided by tokens in the full context "
                  "(/efficiency/<method>/token_efficiency); the dashed line is dense attention (1.0).")


def fig_latency(runs, groups, outdir):
    ents = _entities(groups, "eval")
    if not ents:
        return Figure("latency", None, "", "no evaluated methods")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    labels, failed = [e[0] for e in ents], [e[3] for e in ents]
    series = [("time to first token", _ex_estimates(ents, "ttft_s", 1e3)),
              ("inter-token latency", _ex_estimates(ents, "itl_s", 1e3))]
    _grouped(axes[0], labels, series, failed, "latency (ms)", "latency per method (mean over examples)")
    ax = axes[1]
    anything = False
    for i, (label, usable, name, f) in enumerate(ents):
        if f:
            continue
        xs = np.concatenate([np.asarray(r.eval[name].cols["context_tokens"], dtype=float) for r in usable])
        ys = np.concatenate([np.asarray(r.eval[name].cols["ttft_s"], dtype=float) for r in usable]) * 1e3
        ok = np.isfinite(xs) & np.isfinite(ys) & (xs >= 0)
        if ok.any():
            anything = True
            ax.scatter(xs[ok], ys[ok], s=18, alpha=0.7, color=f"C{i % 10}", label=label.replace("\n", " "))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("TTFT against context length (per example)")
    ax.grid(alpha=0.3)
    if anything:
        ax.legend()
    return Figure("latency", _save(fig, outdir, "latency"),
                  "Left: mean time to first token and mean inter-token latency per method (ms), 95% intervals over "
                  "examples (or seeds). Right: TTFT of each example against its context length.")


def fig_baselines(runs, groups, outdir):
    ents = _entities(groups, "eval")
    if not ents:
        return Figure("baseline_comparison", None, "", "no evaluated methods")
    labels, failed = [e[0] for e in ents], [e[3] for e in ents]
    series = [("F1", _ex_estimates(ents, "f1")), ("EM", _ex_estimates(ents, "em")),
              ("ROUGE-L", _ex_estimates(ents, "rouge_l")), ("BLEU (per example)", _ex_estimates(ents, "bleu"))]
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(ents) + 3), 4.6))
    _grouped(ax, labels, series, failed, "score (0-1)", "task performance per method", values=True)
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    return Figure("baseline_comparison", _save(fig, outdir, "baseline_comparison"),
                  "F1, EM, ROUGE-L and per-example BLEU of every method (mean over examples, 95% intervals; "
                  "over seeds when several runs merge). A failed method is marked FAILED, not drawn as zero.")


def fig_ablation(runs, groups, outdir):
    ents = _entities(groups, "ablation")
    if not ents:
        return Figure("ablation", None, "", "no /ablation/<variant> groups in these runs (run with --ablation)")
    labels, failed = [e[0] for e in ents], [e[3] for e in ents]
    f1 = _ex_estimates(ents, "f1", kind="ablation")
    col_m = Col("m", "m", "efficiency", "peak_mem_bytes", 1e-6)
    col_t = Col("t", "t", "efficiency", "throughput_tok_s")
    mem = [estimate(col_m, [r.ablation[n] for r in u]) for _, u, n, _ in ents]
    thr = [estimate(col_t, [r.ablation[n] for r in u]) for _, u, n, _ in ents]
    if len(ents) <= 5:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    else:  # many variants x groups: one panel per row, wide enough for the labels
        fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.75 * len(ents) + 2), 13))
    _bar_panel(axes[0], labels, f1, failed, "F1 (0-1)", "F1 per variant")
    _bar_panel(axes[1], labels, mem, failed, "peak memory (MB)", "peak memory per variant", color="C1")
    _bar_panel(axes[2], labels, thr, failed, "throughput (tokens/s)", "throughput per variant", color="C2")
    return Figure("ablation", _save(fig, outdir, "ablation"),
                  "Ablation variants (/ablation/<variant>): F1 (mean over examples, 95% intervals), peak arena "
                  "memory (MB) and throughput (tokens/s) from each variant's efficiency group.")


def fig_retention(runs, groups, outdir):
    have = [(r, a) for r in runs for a in r.adaptation]
    if not have:
        return Figure("retention_by_age", None, "", "no /adaptation/<method> groups in these runs")
    fig, ax = plt.subplots(figsize=(8, 4.6))
    drawn = 0
    for i, (r, a) in enumerate(have):
        d = r.adaptation[a]
        st = r.state("adaptation", a)[0]
        lab = a + (f" ({r.name})" if len(runs) > 1 else "")
        if st == "failed":
            ax.plot([], [], color=f"C{i % 10}", label=lab + ": FAILED")
            continue
        edges = np.asarray(d["age_bin_edges"], dtype=float)
        y = np.asarray(d["retention_by_age"], dtype=float)
        if not np.isfinite(edges).all() or not np.isfinite(y).any():
            ax.plot([], [], color=f"C{i % 10}", label=lab + ": no data")
            continue
        mid = 0.5 * (edges[:-1] + edges[1:])
        ax.plot(mid, y, label=lab, **_style(i))
        drawn += 1
    ax.set_xlabel("fact age (tokens since the fact was stated, bin centre)")
    ax.set_ylabel("retention (accuracy, 0-1)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("information retention by age")
    ax.grid(alpha=0.3)
    ax.legend()
    return Figure("retention_by_age", _save(fig, outdir, "retention_by_age"),
                  "Accuracy on facts per age bin (/adaptation/<method>/retention_by_age, empty bins omitted), "
                  "plotted at the bin centres." + ("" if drawn else " No method has retention data."))


# --------------------------------------------------------------------------- sweep
def _budget_value(s):
    try:
        return float(s), "fraction"
    except (TypeError, ValueError):
        pass
    units = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if str(s).endswith(u):
            try:
                return float(str(s)[: -len(u)]) * m, "bytes"
            except ValueError:
                return math.nan, "?"
    return math.nan, "?"


def fig_kv_sweep(runs, groups, outdir):
    budgets = {r.config_value("kv_budget") for r in runs}
    budgets.discard(None)
    if len(budgets) < 2:
        return Figure("f1_vs_kv_budget", None, "",
                      "needs several runs with different kv_budget (a sweep); these runs have "
                      f"{len(budgets)} distinct value(s)")
    # x: requested budget (fraction <= 1 of the full cache, or bytes); one series per method.
    by_method = {}
    kinds = set()
    for r in runs:
        x, kind = _budget_value(r.config_value("kv_budget"))
        if kind == "fraction" and x > 1:
            kind = "bytes"
        kinds.add(kind)
        for m, ex in r.eval.items():
            by_method.setdefault(m, {}).setdefault(x, []).append((r, ex))
    xlabel = "KV budget (fraction of the full cache)" if kinds == {"fraction"} else "KV budget (requested)"
    if len(kinds) > 1:
        xlabel = "KV budget (mixed units as given: fraction or bytes)"
    fig, ax = plt.subplots(figsize=(8, 4.6))
    col = Col("f1", "F1", "example", "f1")
    infeasible_drawn = False
    for i, (m, pts) in enumerate(sorted(by_method.items())):
        xs, ys, es, fx = [], [], [], []
        for x in sorted(pts):
            usable = [ex for r, ex in pts[x] if r.state("eval", m)[0] != "failed"]
            if not usable:
                fx.append(x)
                continue
            e = estimate(col, usable)
            xs.append(x), ys.append(e.mean), es.append(e.half if e.n > 1 and math.isfinite(e.half) else 0)
            if any(np.nansum(ex.cols.get("kv_infeasible", [])) > 0 for ex in usable):
                ax.plot([x], [e.mean], "o", mfc="none", mec="red", ms=14, mew=1.5,
                        label=None if infeasible_drawn else "infeasible (over its budget)")
                infeasible_drawn = True
        ax.errorbar(xs, ys, yerr=es, capsize=4, label=m, **_style(i))
        for x in fx:
            ax.plot([x], [0], "x", color="red", ms=10)
            ax.annotate(f"{m} FAILED", (x, 0), textcoords="offset points", xytext=(4, 6), color="red", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("F1 (0-1)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("F1 against KV budget per method")
    ax.grid(alpha=0.3)
    ax.legend()
    return Figure("f1_vs_kv_budget", _save(fig, outdir, "f1_vs_kv_budget"),
                  "F1 (mean over examples, 95% intervals; seeds merged) of each method against the requested KV "
                  "budget (--kv_budget), one point per budget of the sweep. A red x marks a failed method, a red ring "
                  "a method that held more than the budget (infeasible) on some examples.")


# --------------------------------------------------------------------------- scaling
def _run_step_time(r):
    """(seconds per step, source): /ranks (slowest rank per step, mean over steps) else /train step_time_s."""
    rs = rank_summary(r)
    if rs:
        return rs["job_step_time_s"], "ranks"
    st = _finite(r.train.get("step_time_s", []))
    return (float(st.mean()) if st.size else math.nan), "train"


def _tokens_per_step(r):
    tp = np.asarray(r.train.get("tokens_per_s", []), dtype=float)
    st = np.asarray(r.train.get("step_time_s", []), dtype=float)
    v = tp * st
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size else math.nan


def scaling_data(runs):
    """Per world size: step time, tokens/step, comm fraction; strong/weak efficiency relative to the smallest."""
    sizes = sorted({r.world_size for r in runs})
    if len(sizes) < 2:
        return None
    pts = []
    for n in sizes:
        rr = [r for r in runs if r.world_size == n]
        times = [_run_step_time(r) for r in rr]
        t = mean_ci([x for x, _ in times])
        tok = float(np.nanmean([_tokens_per_step(r) for r in rr])) if rr else math.nan
        cf = [rank_summary(r)["comm_fraction"] for r in rr if rank_summary(r)]
        pts.append({"world_size": n, "step_time": t, "tokens_per_step": tok, "sources": {s for _, s in times},
                    "comm_fraction": mean_ci(cf) if cf else None})
    base = pts[0]
    for p in pts:
        n0, n = base["world_size"], p["world_size"]
        t0, t = base["step_time"].mean, p["step_time"].mean
        p["strong_eff"] = (t0 * n0) / (t * n) if t > 0 else math.nan
        p["weak_eff"] = t0 / t if t > 0 else math.nan
        ratio = p["tokens_per_step"] / base["tokens_per_step"] if base["tokens_per_step"] > 0 else math.nan
        if not math.isfinite(ratio):
            p["mode"] = "unknown"
        elif abs(ratio - n / n0) <= 0.1 * n / n0 and n != n0:
            p["mode"] = "weak"
        elif abs(ratio - 1.0) <= 0.1:
            p["mode"] = "strong" if n != n0 else "base"
        else:
            p["mode"] = "other"
    return pts


def fig_scaling(runs, groups, outdir):
    pts = scaling_data(runs)
    if pts is None:
        return Figure("scaling", None, "", "needs several runs with different world sizes (a scaling study); "
                                           f"these runs have world_size {sorted({r.world_size for r in runs})}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ns = [p["world_size"] for p in pts]
    strong = [p for p in pts if p["mode"] in ("strong", "base", "unknown")]
    weak = [p for p in pts if p["mode"] in ("weak", "base")]
    ax = axes[0]
    if len(strong) > 1:
        ax.plot([p["world_size"] for p in strong], [p["strong_eff"] for p in strong], "o-", label="strong scaling")
    if len(weak) > 1:
        ax.plot([p["world_size"] for p in weak], [p["weak_eff"] for p in weak], "s-", label="weak scaling")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="ideal")
    ax.set_xlabel("ranks (world size)")
    ax.set_ylabel("parallel efficiency (1 = ideal)")
    ax.set_xticks(ns)
    ax.set_title("scaling efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    cf = [(p["world_size"], p["comm_fraction"]) for p in pts if p["comm_fraction"] is not None]
    if cf:
        ax.errorbar([c[0] for c in cf], [c[1].mean for c in cf],
                    yerr=[c[1].half if c[1].n > 1 and math.isfinite(c[1].half) else 0 for c in cf],
                    fmt="o-", capsize=4, color="C3")
    else:
        ax.text(0.5, 0.5, "no /ranks rows", ha="center", transform=ax.transAxes)
    ax.set_xlabel("ranks (world size)")
    ax.set_ylabel("communication time / step time")
    if cf:
        ax.set_ylim(0, max(0.05, 1.25 * max(c[1].hi for c in cf)))
    ax.set_xticks(ns)
    ax.set_title("communication fraction")
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.errorbar(ns, [p["step_time"].mean for p in pts],
                yerr=[p["step_time"].half if p["step_time"].n > 1 and math.isfinite(p["step_time"].half) else 0
                      for p in pts], fmt="o-", capsize=4, color="C4")
    ax.set_xlabel("ranks (world size)")
    ax.set_ylabel("step time (s, slowest rank)")
    ax.set_xticks(ns)
    ax.set_title("time per optimizer step")
    ax.grid(alpha=0.3)
    modes = ", ".join(f"{p['world_size']}: {p['mode']}" for p in pts)
    cap = ("Strong-scaling efficiency T(N0)·N0 / (T(N)·N) for runs with the same tokens per step as the smallest "
           "world size N0, weak-scaling efficiency T(N0)/T(N) for runs whose tokens per step grow with N; T = mean "
           "over steps of the slowest rank's step_time_s in /ranks (or /train step_time_s where /ranks is "
           "empty). Communication fraction = sum comm_time_s / sum step_time_s over /ranks rows. "
           f"Classification by tokens per step (world size: mode): {modes}.")
    return Figure("scaling", _save(fig, outdir, "scaling"), cap)


# --------------------------------------------------------------------------- needle
def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def needle_grid(exs):
    """(depths, lengths, mean F1 grid, count grid) of the needle examples of Examples tables, or None.

    Depth: the requested depth in the meta JSON ('depth'; 'actual_depth' where absent); length: 'target_tokens'
    ('length' or 'context_tokens' where absent). Examples of all tables given (seeds) pool into the cells.
    """
    if not isinstance(exs, (list, tuple)):
        exs = [exs]
    depth, length, f1 = [], [], []
    for ex in exs:
        tasks = ex.strings.get("task", [""] * ex.n)
        for i, m in enumerate(ex.meta):
            if m.get("task", tasks[i]) != "needle":
                continue
            d = _num(m.get("depth", m.get("actual_depth")))
            L = _num(m.get("target_tokens", m.get("length", m.get("context_tokens"))))
            if math.isfinite(d) and math.isfinite(L):
                depth.append(round(d, 3)), length.append(L), f1.append(float(ex.cols["f1"][i]))
    if not depth:
        return None
    ds, ls = sorted(set(depth)), sorted(set(length))
    if len(ds) > 12:  # continuous depths: bin into fifths
        edges = np.linspace(0, 1, 6)
        depth = [float(edges[min(int(d * 5), 4)] + 0.1) for d in depth]
        ds = sorted(set(depth))
    grid = np.full((len(ds), len(ls)), np.nan)
    cnt = np.zeros((len(ds), len(ls)), dtype=int)
    acc = np.zeros((len(ds), len(ls)))
    for d, L, v in zip(depth, length, f1):
        i, j = ds.index(d), ls.index(L)
        if math.isfinite(v):
            acc[i, j] += v
            cnt[i, j] += 1
    ok = cnt > 0
    grid[ok] = acc[ok] / cnt[ok]
    return ds, ls, grid, cnt


def fig_needle(runs, groups, outdir):
    panels = []
    for label, usable, m, failed in _entities(groups, "eval"):
        if failed:
            panels.append((label, m, None, True))
            continue
        g = needle_grid([r.eval[m] for r in usable])
        if g is not None:
            panels.append((label, m, g, False))
    if not any(p[2] is not None for p in panels):
        return Figure("needle_heatmap", None, "", "no needle examples with depth and length in their meta JSON")
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols + 1, 4.4 * rows), squeeze=False,
                             constrained_layout=True)
    im = None
    for ax, (label, m, g, failed) in zip(axes.ravel(), panels):
        title = label.replace("\n", " ")
        if failed:
            ax.text(0.5, 0.5, f"{m}: FAILED", ha="center", va="center", color="red", fontweight="bold",
                    transform=ax.transAxes)
            ax.set_title(title)
            ax.set_xticks([]), ax.set_yticks([])
            continue
        ds, ls, grid, cnt = g
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(ls)))
        ax.set_xticklabels([f"{int(L)}" for L in ls])
        ax.set_yticks(range(len(ds)))
        ax.set_yticklabels([f"{d:.2f}" for d in ds])
        ax.set_xlabel("context length (target tokens)")
        if ax in axes[:, 0]:
            ax.set_ylabel("needle depth (fraction of context)")
        ax.set_title(title)
        for i in range(len(ds)):
            for j in range(len(ls)):
                txt = "—" if cnt[i, j] == 0 else f"{grid[i, j]:.2f}\nn={cnt[i, j]}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=9,
                        color="white" if (cnt[i, j] == 0 or grid[i, j] < 0.6) else "black")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="mean F1 (0-1)", shrink=0.9)
    path = os.path.join(outdir, "needle_heatmap.png")
    fig.savefig(path)
    plt.close(fig)
    return Figure("needle_heatmap", path,
                  "Needle-in-a-haystack: mean F1 per (requested depth, context length) cell of the needle "
                  "examples (meta JSON 'depth' and 'target_tokens'), examples of merged seeds pooled; n = examples per cell, — = empty "
                  "cell. A failed method is shown as FAILED; a panel title says INFEASIBLE on k/n when k examples held "
                  "more KV bytes than their budget (their F1 is not at the budget).")


# --------------------------------------------------------------------------- Pareto (sweeps)
def fig_pareto(sweep, outdir, name="pareto"):
    """Per context size: mean F1 against mean KV bytes of every (method, budget) cell of a sweep."""
    from . import sweep as SW
    data = SW.pareto_data(sweep)
    sizes = [c for c in sweep.context_sizes if data[c]["methods"]]
    if not sizes:
        return Figure(name, None, "", "no evaluation cells")
    cols = min(3, len(sizes))
    rows = (len(sizes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    for ax, c in zip(axes.ravel(), sizes):
        marks = {}
        d = data[c]
        ref = d["reference"]
        if ref is not None:
            ax.axhline(ref["f1"], color="black", ls="--", lw=1.2, label=f"{SW.FULL} (reference)")
            ax.axhspan(ref["lo"], ref["hi"], color="black", alpha=0.08)
        notes = []
        front = set(d["frontier"])
        fx, fy = [], []
        for i, m in enumerate(sweep.methods):
            pts = d["methods"].get(m)
            if not pts:
                continue
            st = _style(i)
            ok = [p for p in pts if p["status"] in ("ok", "infeasible") and math.isfinite(p["kv_bytes"])]
            if ok:
                xs = [p["kv_bytes"] * 1e-6 for p in ok]
                ys = [p["f1"] for p in ok]
                err = np.array([[max(0.0, p["f1"] - p["lo"]) for p in ok], [max(0.0, p["hi"] - p["f1"]) for p in ok]])
                ax.errorbar(xs, ys, yerr=err, capsize=3, label=m, color=st["color"], ls=st["ls"], lw=1.2,
                            marker=st["marker"], ms=st["ms"])
                labels = {}  # cells at the same point (a full cache at every budget) share one label
                for p, x, y in zip(ok, xs, ys):
                    if p["status"] == "infeasible":  # held more than its budget: hollow red ring
                        ax.plot([x], [y], "o", mfc="none", mec="red", ms=st["ms"] + 6, mew=1.5,
                                label=None if "infeasible" in marks else "infeasible (over its budget)")
                        marks["infeasible"] = True
                    if (m, p["budget"]) in front:
                        fx.append(x), fy.append(y)
                    labels.setdefault((x, y), []).append(p["budget"])
                for (x, y), bs in labels.items():
                    ax.annotate("/".join(bs), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                color=st["color"])
            for p in pts:
                if p["status"] == "failed":
                    notes.append(f"{m} @ {p['budget']}: FAILED")
                elif p["status"] == "missing":
                    notes.append(f"{m} @ {p['budget']}: not done")
        if fx:
            order = np.argsort(fx)
            ax.step(np.asarray(fx)[order], np.asarray(fy)[order], where="post", color="gray", lw=0.8, alpha=0.7,
                    label="Pareto frontier")
        if notes:
            ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", ha="left", color="red",
                    fontsize=8, fontweight="bold")
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes held after prefill (MB, mean over examples)")
        ax.set_ylabel("F1 (0-1)")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"context {c}" + (f" [{sweep.label}]" if sweep.label else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best", framealpha=0.7)
    for ax in axes.ravel()[len(sizes):]:
        ax.axis("off")
    cap = ("Accuracy against KV bytes per context size: each point is one (method, KV budget) cell of the sweep "
           "(label = the --kv_budget entry), mean F1 over the cell's examples with a 95% bootstrap interval "
           "(examples resampled, fixed seed), at the mean KV bytes the method held after prefill (kv_total_bytes). "
           "Dashed line and band: the full cache's F1 and its 95% interval on the same examples. Grey steps: the "
           "Pareto frontier of the feasible cells. A red ring marks an infeasible cell (some example held more "
           "than its budget); failed cells are named in red in the panel, never drawn.")
    return Figure(name, _save(fig, outdir, name), cap)


def context_curves(sweep):
    """Per budget and method: [(context size, point)] in context order, the points of pareto_data (the full
    cache's reference cell under FULL)."""
    from . import sweep as SW
    data = SW.pareto_data(sweep)
    out = {}
    for b in sweep.budgets:
        per = {}
        for c in sweep.context_sizes:
            for m, pts in data[c]["methods"].items():
                for p in pts:
                    if p["budget"] == b:
                        per.setdefault(m, []).append((c, p))
        out[b] = {m: per[m] for m in sweep.methods if m in per}
    return out


def fig_f1_vs_context(sweep, outdir, name="f1_vs_context"):
    """Per KV budget: mean F1 against the eval context size, one line per method."""
    from . import sweep as SW
    curves = context_curves(sweep)
    budgets = [b for b in sweep.budgets if curves[b]]
    if len(sweep.context_sizes) < 2 or not budgets:
        return Figure(name, None, "", "fewer than two context sizes")
    cols = min(2, len(budgets))
    rows = (len(budgets) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    for ax, b in zip(axes.ravel(), budgets):
        notes = []
        for i, m in enumerate(sweep.methods):
            pts = curves[b].get(m)
            if not pts:
                continue
            st = _style(i)
            done = [(c, p) for c, p in pts if p["status"] in ("ok", "infeasible") and math.isfinite(p["f1"])]
            if done:
                xs = [c for c, _ in done]
                ys = [p["f1"] for _, p in done]
                err = np.array([[max(0.0, p["f1"] - p["lo"]) for _, p in done],
                                [max(0.0, p["hi"] - p["f1"]) for _, p in done]])
                ax.errorbar(xs, ys, yerr=err, capsize=3, label=m, color="black" if m == SW.FULL else st["color"],
                            ls="--" if m == SW.FULL else st["ls"], lw=1.2, marker=st["marker"], ms=st["ms"])
                inf = [(c, p["f1"]) for c, p in done if p["status"] == "infeasible" and m != SW.FULL]
                if inf:
                    ax.plot(*zip(*inf), "o", mfc="none", mec="red", ms=st["ms"] + 6, mew=1.5)
            notes += [f"{m} @ {c}: FAILED" for c, p in pts if p["status"] == "failed"]
        if notes:
            ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, va="bottom", ha="left", color="red",
                    fontsize=7, fontweight="bold")
        ax.set_xticks(sweep.context_sizes)
        ax.set_xlabel("eval context size (model tokens)")
        ax.set_ylabel("F1 (0-1)")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"KV budget {b}" + (f" [{sweep.label}]" if sweep.label else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", framealpha=0.7, ncol=2)
    for ax in axes.ravel()[len(budgets):]:
        ax.axis("off")
    cap = ("F1 against context length per KV budget: mean F1 of each method's cell at each eval context size with "
           "its 95% bootstrap interval (examples resampled, fixed seed); dashed black: the full cache on the same "
           "examples. A red ring marks an infeasible cell (some example held more than its budget); failed cells "
           "are named in red, never drawn.")
    return Figure(name, _save(fig, outdir, name), cap)


ALL = (fig_loss, fig_train_metrics, fig_memory, fig_throughput, fig_token_efficiency, fig_latency, fig_ablation,
       fig_baselines, fig_retention, fig_kv_sweep, fig_scaling, fig_needle)

NAMES = ("loss", "metrics_over_steps", "memory", "throughput", "token_efficiency", "latency", "ablation",
         "baseline_comparison", "retention_by_age", "f1_vs_kv_budget", "scaling", "needle_heatmap")


def make_all(runs, outdir):
    groups, _ = group_runs(runs)
    return [f(runs, groups, outdir) for f in ALL]
