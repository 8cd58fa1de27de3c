"""Groups runs (seed replicates merge; other config differences label groups) and builds the tables."""

import math

import numpy as np

from . import schema as S
from .stats import Estimate, mean_ci

# Options that do not change what a run measures: runs differing only in these are replicates
# (seed) or the same experiment (bookkeeping).
NON_IDENTITY_KEYS = {"seed", "run_name", "output_dir", "overwrite", "threads", "datasets_dir", "data_dir",
                     "log_every", "checkpoint_every", "keep_checkpoints", "stop_after", "dry_run", "config",
                     "comm_timeout", "init_from"}


def _bare(k):
    return k.rsplit(".", 1)[-1]


class Group:
    """Runs that differ only in seed (or bookkeeping options): their values merge, seeds give the interval."""

    def __init__(self, key, runs, shown=None):
        self.key = key          # tuple of (option, value) that tells this group from the others
        self.runs = runs
        self.shown = shown      # the options the label names (None: all of key)

    @property
    def label(self):
        return ", ".join(f"{k}={v}" for k, v in self.key if self.shown is None or k in self.shown)


# Not named in a group's label: the rows already name the method, and a method's
# own knobs are set only in the runs that train it (the label names the model).
_UNLABELLED = {"methods", "ablation", "ablation_variants"}


def group_runs(runs):
    """Groups runs by their resolved config minus NON_IDENTITY_KEYS; order of first appearance."""
    def ident(run):
        return {_bare(k): v for k, v in run.config.items() if _bare(k) not in NON_IDENTITY_KEYS}

    idents = [ident(r) for r in runs]
    all_keys = sorted(set().union(*idents)) if idents else []
    differing = [k for k in all_keys if len({i.get(k) for i in idents}) > 1]
    groups = {}
    for r, i in zip(runs, idents):
        key = tuple((k, i.get(k, "")) for k in differing)
        groups.setdefault(key, []).append(r)
    # A pipeline of runs (the main job: the standard model, GCA, DSRSQ) differs in
    # each method's knobs, unset in the other runs: name the model and the
    # options every run sets instead of every knob.
    shown = None
    if "model" in differing:
        shown = {k for k in differing
                 if k not in _UNLABELLED and (k == "model" or all(i.get(k, "") != "" for i in idents))}
    return [Group(k, v, shown) for k, v in groups.items()], differing


# --------------------------------------------------------------------------- column specs
class Col:
    """One numeric column of a table.

    source: 'example' (per-example column of /eval/<m> or /ablation/<v>), 'summary', 'efficiency'
    (for ablation: /ablation/<v>/efficiency), 'adaptation'.
    """

    def __init__(self, key, header, source, field, scale=1.0, digits=4, reduce="mean"):
        self.key, self.header, self.source, self.field, self.scale, self.digits = key, header, source, field, scale, digits
        self.reduce = reduce  # "mean" (with interval) or "sum" over runs (counts)


def _clean(v):
    """Unset scalars are NaN (float) or -1 (int): both become NaN."""
    if v is None:
        return math.nan
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return math.nan if v < 0 else float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _example_values(entity, field):
    a = np.asarray(entity.cols[field], dtype=np.float64)
    if np.issubdtype(np.asarray(entity.cols[field]).dtype, np.integer):
        a = np.where(np.asarray(entity.cols[field]) < 0, np.nan, a)
    return a


def estimate(col, entities):
    """entities: the per-run objects (Examples or dict) of one (group, method).

    One run: per-example column -> mean over its examples with a 95% t-interval over examples;
    a scalar -> the value. Several runs (seeds): each run is reduced first (mean over its examples, or
    its scalar), then the mean over runs with a 95% t-interval over runs.
    """
    if not entities:
        return Estimate(math.nan, math.nan, 0)
    if col.source == "example":
        per_run = [_example_values(e, col.field) * col.scale for e in entities]
        if len(per_run) == 1:
            return mean_ci(per_run[0])
        means = [float(np.nanmean(a)) if np.isfinite(a).any() else math.nan for a in per_run]
        return mean_ci(means)
    vals = []
    for e in entities:
        if col.source == "summary":
            v = e.summary.get(col.field)
        elif col.source == "efficiency":
            v = e.efficiency.get(col.field) if hasattr(e, "efficiency") and not isinstance(e, dict) else e.get(col.field)
        else:
            v = e.get(col.field)
        vals.append(_clean(v) * col.scale)
    if col.reduce == "sum":
        fin = [v for v in vals if math.isfinite(v)]
        return Estimate(float(sum(fin)) if fin else math.nan, math.nan, len(fin))
    return mean_ci(vals)


# --------------------------------------------------------------------------- tables
class Row:
    def __init__(self, group, name, status, estimates, failed):
        self.group, self.name, self.status, self.estimates, self.failed = group, name, status, estimates, failed


class Table:
    def __init__(self, slug, title, entity_header, cols, rows, rules, present=True, absent_note=""):
        self.slug, self.title, self.entity_header, self.cols, self.rows = slug, title, entity_header, cols, rows
        self.rules, self.present, self.absent_note = rules, present, absent_note


def printed_tables(tables):
    """What --print shows: Tables 1 and 2, and Table 4 (the ablation) when the runs have one."""
    return tables[:2] + [t for t in tables if t.slug == "table4_ablation" and t.present and t.rows]


def _status_text(states):
    """states: list of (state, message) over the runs of a group."""
    kinds = [s for s, _ in states]
    n = len(kinds)
    failed = [(s, m) for s, m in states if s == "failed"]
    if failed:
        msg = failed[0][1].strip().replace("\n", " ")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        head = "FAILED" if len(failed) == n else f"FAILED in {len(failed)} of {n} runs"
        return head + (f": {msg}" if msg else "")
    uniq = sorted(set(kinds))
    if uniq == ["done"]:
        return "done"
    return "/".join(uniq)


def _entity_rows(groups, kind, cols, getter, order=None):
    rows = []
    for g in groups:
        names = []
        for r in g.runs:
            for n in getter(r):
                if n not in names:
                    names.append(n)
        if order:
            names = [n for n in order if n in names] + sorted(n for n in names if n not in order)
        for n in names:
            states = [r.state(kind, n) for r in g.runs if n in getter(r)]
            missing = sum(1 for r in g.runs if n not in getter(r))
            states += [("missing", "")] * missing
            usable = [getter(r)[n] for r in g.runs if n in getter(r) and r.state(kind, n)[0] != "failed"]
            all_failed = all(s == "failed" for s, _ in states)
            est = {c.key: estimate(c, usable) for c in cols}
            rows.append(Row(g.label, n, _status_text(states), est, all_failed))
    return rows


MB = 1e-6

T1_COLS = [Col("f1", "F1", "example", "f1"), Col("em", "EM", "example", "em"),
           Col("rouge_l", "ROUGE-L", "example", "rouge_l"),
           Col("bleu", "BLEU-4 (corpus)", "summary", "corpus_bleu"),
           Col("bleu_example", "BLEU (per-example mean)", "example", "bleu"),
           Col("n_examples", "examples", "summary", "n_examples", digits=0, reduce="sum"),
           Col("kv_infeasible", "share infeasible (held more than the KV budget)", "example", "kv_infeasible", 1.0, 3)]

T2_COLS = [Col("peak_mem_mb", "peak memory (MB)", "efficiency", "peak_mem_bytes", MB, 3),
           Col("avg_mem_mb", "avg memory (MB)", "efficiency", "avg_mem_bytes", MB, 3),
           Col("process_peak_rss_mb", "process peak RSS (MB, process lifetime)", "efficiency",
               "process_peak_rss_bytes", MB, 1),
           Col("throughput_tok_s", "throughput (tokens run/s)", "efficiency", "throughput_tok_s", 1.0, 1),
           Col("context_tokens_per_s", "context served (tokens/s)", "efficiency", "context_tokens_per_s", 1.0, 1),
           Col("latency_s", "latency TTFT (s)", "efficiency", "latency_s", 1.0, 5),
           Col("itl_s", "ITL (s)", "efficiency", "itl_s", 1.0, 5),
           Col("token_efficiency", "token efficiency", "efficiency", "token_efficiency", 1.0, 4)]

T2B_COLS = [Col("kv_resident_mb", "KV resident (MB)", "example", "kv_resident_bytes", MB, 4),
            Col("kv_peak_prefill_mb", "KV peak prefill (MB)", "example", "kv_peak_prefill_bytes", MB, 4),
            Col("kv_read_per_step_mb", "KV read/step (MB)", "example", "kv_read_per_step_bytes", MB, 4),
            Col("kv_total_mb", "KV total (MB)", "example", "kv_total_bytes", MB, 4),
            Col("kv_budget_requested_mb", "KV budget requested (MB)", "example", "kv_budget_requested_bytes", MB, 4),
            Col("kv_budget_achieved_mb", "KV budget achieved (MB)", "example", "kv_budget_achieved_bytes", MB, 4),
            Col("kv_infeasible", "share of examples over budget (infeasible)", "example", "kv_infeasible", 1.0, 3)]

T3_COLS = [Col("retention_auc", "information retention (AUC)", "adaptation", "retention_auc"),
           Col("temporal_consistency", "temporal consistency", "adaptation", "temporal_consistency"),
           Col("adaptation_speed", "adaptation speed", "adaptation", "adaptation_speed"),
           Col("n_queries", "queries", "adaptation", "n_queries", digits=0, reduce="sum")]

T4_COLS = [Col("f1", "F1", "example", "f1"),
           Col("peak_mem_mb", "peak memory (MB)", "efficiency", "peak_mem_bytes", MB, 3),
           Col("throughput_tok_s", "throughput (tokens/s)", "efficiency", "throughput_tok_s", 1.0, 1)]


def _seed_rule(groups):
    multi = any(len(g.runs) > 1 for g in groups)
    if multi:
        return ("Several runs (seeds) per row: each run is reduced first (mean over its examples, or its "
                "scalar), then the table shows the mean over runs ± the 95% Student-t half-width over runs "
                "(n = runs).")
    return ""


def _protocol_note(runs):
    protocols = sorted({r.protocol for r in runs if r.protocol})
    names = {"query_aware": "query-aware (the question is in the prompt every method compresses)",
             "context_only": "query-agnostic (the context is compressed before the question is appended)",
             "reuse": "reuse, compress once and ask many (a context shared by several questions is compressed once, "
                      "without them, and each question is answered from a copy of that cache; latency = restore + "
                      "question + first token, the compression counted once per context in serving time)"}
    if not protocols:
        return ""
    return "Protocol: " + "; ".join(names.get(p, p) for p in protocols) + "."


def _backbone_note(runs):
    """Which weights each method ran on (training-free methods: the standard checkpoint)."""
    seen = {}
    for r in runs:
        for m, b in r.backbones.items():
            seen.setdefault(m, [])
            if b not in seen[m]:
                seen[m].append(b)
    if not seen:
        return ""
    return "Backbones: " + "; ".join(f"{m}: {' | '.join(b)}" for m, b in seen.items()) + "."


def build_tables(runs):
    groups, differing = group_runs(runs)
    seed_rule = _seed_rule(groups)
    group_note = (f"Rows are grouped by the options that differ between the runs given ({', '.join(differing)}); "
                  "runs differing only in seed or bookkeeping options merge." if differing else "")
    eval_of = lambda r: r.eval  # noqa: E731
    eff_of = lambda r: {m: _EffView(r, m) for m in r.eval}  # noqa: E731
    tables = []

    one_run_ex = ("Per-example metrics (F1, EM, ROUGE-L, per-example BLEU): mean over the evaluated examples of "
                  "/eval/<method> ± the 95% Student-t half-width over examples (n = examples). F1/EM: SQuAD-"
                  "normalised, max over gold answers, in [0,1]. BLEU-4 (corpus) is /eval/<method>/summary/"
                  "corpus_bleu (one value per run, no interval from one run). BLEU-4 is n/a where no gold answer "
                  "has 4 or more tokens (e.g. one-token answers): no 4-gram can match whatever is predicted, so "
                  "it measures nothing there (NaN in the file; the per-example mean skips n/a examples). "
                  "examples = /eval/<method>/summary/n_examples, summed over merged runs. Share infeasible: "
                  "the examples whose KV budget the method could not meet (a full cache cannot shrink), so its "
                  "scores there are not at the budget.")
    rules1 = " ".join(x for x in [one_run_ex, _protocol_note(runs), _backbone_note(runs), seed_rule, group_note] if x)
    tables.append(Table("table1_task_performance", "Table 1: task performance", "method", T1_COLS,
                        _entity_rows(groups, "eval", T1_COLS, eval_of), rules1,
                        present=any(r.eval for r in runs), absent_note="no /eval/<method> groups in these runs"))

    rules2 = ("Scalars of /efficiency/<method>, one value per run: memory = this method's peak / time-averaged "
              "arena bytes (activations + KV, high-water mark reset at every example), in MB (10^6 bytes); "
              "process peak RSS = the process's high-water mark when the method finished (process lifetime: "
              "training and earlier methods included, not a per-method figure); throughput = tokens the method "
              "ran through the model (prompt tokens fed after any selection + generated tokens) per second of "
              "serving (selection + prefill + decode); context served = the examples' full prompt tokens per "
              "second of serving; latency = mean time to first token; ITL = mean inter-token latency; token "
              "efficiency = keys a decode query attends to / keys a full cache holds at that step, mean over decode steps and examples (lower is cheaper). One run: no interval. " + seed_rule)
    tables.append(Table("table2_efficiency", "Table 2: efficiency", "method", T2_COLS,
                        _entity_rows(groups, "eval", T2_COLS, eff_of), (rules2 + " " + group_note).strip(),
                        present=any(r.eval for r in runs), absent_note="no /efficiency/<method> groups"))

    rules2b = ("Per-example KV-cache bytes of /eval/<method> (MB = 10^6 bytes): mean over examples ± 95% "
               "Student-t half-width over examples. Every method is asked for the same bytes; 'infeasible' is the "
               "share of examples whose budget the method could not meet (a full cache cannot shrink; a fixed "
               "minimum such as RCKV's window and index can exceed a small budget): those examples hold more than "
               "they were given. " + seed_rule)
    tables.append(Table("table2b_kv_memory", "Table 2b: KV-cache memory (the four numbers, and the budget)",
                        "method", T2B_COLS, _entity_rows(groups, "eval", T2B_COLS, eval_of),
                        (rules2b + " " + group_note).strip(), present=any(r.eval for r in runs),
                        absent_note="no /eval/<method> groups"))

    ad_of = lambda r: r.adaptation  # noqa: E731
    rules3 = ("Scalars of /adaptation/<method> (one value per run): information retention = area under accuracy "
              "by fact age (retention_auc); temporal consistency and adaptation speed in [0,1]. One run: no "
              "interval. " + seed_rule)
    tables.append(Table("table3_adaptation", "Table 3: adaptation", "method", T3_COLS,
                        _entity_rows(groups, "adaptation", T3_COLS, ad_of), (rules3 + " " + group_note).strip(),
                        present=any(r.adaptation for r in runs),
                        absent_note="no /adaptation/<method> groups in these runs (a streaming dataset such as "
                                    "fact_stream writes them)"))

    ab_of = lambda r: r.ablation  # noqa: E731
    rules4 = ("F1: mean over the examples of /ablation/<variant> ± 95% Student-t half-width over examples; "
              "memory (MB = 10^6 bytes) and throughput: scalars of /ablation/<variant>/efficiency, one per run. "
              + seed_rule)
    tables.append(Table("table4_ablation", "Table 4: ablation", "variant", T4_COLS,
                        _entity_rows(groups, "ablation", T4_COLS, ab_of),
                        (rules4 + " " + group_note).strip(), present=any(r.ablation for r in runs),
                        absent_note="no /ablation/<variant> groups in these runs (run with --ablation)"))
    return tables, groups


class _EffView:
    """Adapts /efficiency/<m> of one run to the estimate() interface."""

    def __init__(self, run, m):
        self.efficiency = run.efficiency.get(m, {})

    def get(self, k):
        return self.efficiency.get(k)


# --------------------------------------------------------------------------- ranks
def rank_summary(run):
    """Per-rank means from /ranks; None when the table is empty."""
    rk = run.ranks
    if not rk or len(rk.get("rank", [])) == 0:
        return None
    ranks = np.asarray(rk["rank"])
    st = np.asarray(rk["step_time_s"], dtype=np.float64)
    ct = np.asarray(rk["comm_time_s"], dtype=np.float64)
    bs = np.asarray(rk["bytes_sent"], dtype=np.float64)
    steps = np.asarray(rk["step"])
    per = []
    for q in sorted(set(ranks.tolist())):
        sel = ranks == q
        per.append({"rank": int(q), "steps": int(sel.sum()), "step_time_s": float(np.nanmean(st[sel])),
                    "comm_time_s": float(np.nanmean(ct[sel])), "bytes_sent": float(np.nanmean(bs[sel]))})
    means = np.array([p["step_time_s"] for p in per])
    slow = per[int(np.nanargmax(means))]
    avg = float(np.nanmean(means))
    # Step time of the job: per step, the slowest rank (the others wait for it).
    uniq = sorted(set(steps.tolist()))
    step_max = np.array([np.nanmax(st[steps == s]) for s in uniq])
    return {"per_rank": per, "slowest": slow, "mean_step_time_s": avg,
            "imbalance": float(slow["step_time_s"] / avg - 1.0) if avg > 0 else math.nan,
            "comm_fraction": float(np.nansum(ct) / np.nansum(st)) if np.nansum(st) > 0 else math.nan,
            "job_step_time_s": float(np.nanmean(step_max)), "n_steps": len(uniq)}


# --------------------------------------------------------------------------- rendering
def fmt_num(v, digits):
    if v is None or not math.isfinite(v):
        return "n/a"
    if digits == 0:
        return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.1f}"
    a = abs(v)
    if a != 0 and (a >= 1e7 or a < 0.01):
        return f"{v:.3e}"
    return f"{v:.{digits}f}"


def fmt_est(e, digits):
    if e.n == 0 or not math.isfinite(e.mean):
        return "n/a"
    s = fmt_num(e.mean, digits)
    if e.n > 1 and math.isfinite(e.half) and digits > 0:
        s += " ± " + fmt_num(e.half, digits)
    return s


def _cell(row, c):
    if row.failed:
        return "failed"
    return fmt_est(row.estimates[c.key], c.digits)


def _show_group(table):
    return any(r.group for r in table.rows)


def to_markdown(table):
    if not table.present:
        return f"### {table.title}\n\nNot present: {table.absent_note}.\n"
    hdr = (["runs"] if _show_group(table) else []) + [table.entity_header, "status"] + [c.header for c in table.cols]
    lines = [f"### {table.title}", "", "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in table.rows:
        cells = ([r.group] if _show_group(table) else []) + [r.name, r.status.replace("|", "/")]
        cells += [_cell(r, c) for c in table.cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"*Aggregation:* {table.rules}", ""]
    return "\n".join(lines)


def _csv_field(s):
    s = str(s)
    if any(ch in s for ch in ',"\n\r'):
        s = '"' + s.replace('"', '""') + '"'
    return s


def to_csv(table):
    hdr = ["runs", table.entity_header, "status"]
    for c in table.cols:
        hdr += [c.key, c.key + "_ci95", c.key + "_n"]
    out = [",".join(hdr)]
    for r in table.rows:
        cells = [r.group, r.name, "failed" if r.failed else r.status]
        for c in table.cols:
            e = r.estimates[c.key]
            if r.failed:
                cells += ["failed", "", "0"]
            else:
                cells += [repr(float(e.mean)) if math.isfinite(e.mean) else "",
                          repr(float(e.half)) if math.isfinite(e.half) else "", str(e.n)]
        out.append(",".join(_csv_field(x) for x in cells))
    return "\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s):
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(table):
    if not table.present:
        return f"% {tex_escape(table.title)}: not present ({tex_escape(table.absent_note)})\n"
    show = _show_group(table)
    hdr = (["runs"] if show else []) + [table.entity_header, "status"] + [c.header for c in table.cols]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * (3 if show else 2) + "r" * len(table.cols) + "}", r"\hline",
             " & ".join(tex_escape(h) for h in hdr) + r" \\", r"\hline"]
    for r in table.rows:
        cells = ([r.group] if show else []) + [r.name, r.status if len(r.status) < 40 else r.status[:37] + "..."]
        cells = [tex_escape(x) for x in cells]
        for c in table.cols:
            cells.append(r"\textit{failed}" if r.failed else tex_escape(_cell(r, c)).replace("±", r"$\pm$"))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", r"\caption{" + tex_escape(table.title) + ". " + tex_escape(table.rules) + "}",
              r"\label{tab:" + table.slug + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"
