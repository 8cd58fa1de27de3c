"""Writes report.md, the table files (CSV, LaTeX) and the figures for a set of runs."""

import os

from . import aggregate as A
from . import figures as F
from . import sweep as SW

PROVENANCE_KEYS = ("git_sha", "dsrsq_version", "build_type", "config_hash", "command_line", "start_time",
                   "hostname", "backend", "device", "blas", "compiler", "mpi_version", "hdf5_version", "cuda", "nccl",
                   "dataset", "dataset_hash", "tokenizer", "tokenizer_hash", "metric_version", "model_config",
                   "n_parameters", "seed", "slurm_job_id", "slurm_array_task_id", "slurm_restart_count")


def _md_escape(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def provenance_md(runs):
    out = ["## Provenance", ""]
    for r in runs:
        out += [f"### Run `{r.name}`", "", f"- file: `{r.path}`",
                f"- run state: **{r.run_state}**" + (f", ended {r.end_time}" if r.end_time else ""),
                f"- ranks: world_size {r.attrs.get('world_size')}, dp {r.attrs.get('dp')}, sp {r.attrs.get('sp')}",
                f"- schema: format {r.attrs.get('format')}, schema_version {r.attrs.get('schema_version')}", ""]
        out += ["| attribute | value |", "|---|---|"]
        for k in PROVENANCE_KEYS:
            if k in r.attrs and r.attrs[k] != "":
                out.append(f"| {k} | `{_md_escape(r.attrs[k])}` |")
        for k in sorted(r.attrs):
            if k.startswith("env."):
                out.append(f"| {k} | `{_md_escape(r.attrs[k])}` |")
        st = r.state("train", "train")
        out.append(f"| training status | {st[0]}{(': ' + _md_escape(st[1])) if st[1] else ''} |")
        out += ["", "<details><summary>resolved config</summary>", "", "```ini", r.resolved.rstrip(), "```", "",
                "</details>", ""]
    return "\n".join(out)


def ranks_md(runs):
    out = ["## Ranks", ""]
    for r in runs:
        rs = A.rank_summary(r)
        if rs is None:
            out.append(f"- `{r.name}`: /ranks holds no rows (world_size {r.world_size}); slowest rank and "
                       "imbalance cannot be named.")
            continue
        s = rs["slowest"]
        out.append(f"- `{r.name}`: slowest rank **{s['rank']}** (mean step time {s['step_time_s']:.4g} s over "
                   f"{s['steps']} steps, {100 * rs['imbalance']:.1f}% above the mean over ranks of "
                   f"{rs['mean_step_time_s']:.4g} s); imbalance (slowest / mean - 1) = {100 * rs['imbalance']:.1f}%; "
                   f"communication fraction {100 * rs['comm_fraction']:.1f}%.")
        out += ["", "  | rank | steps | mean step time (s) | mean comm time (s) | mean bytes sent |",
                "  |---|---|---|---|---|"]
        for p in rs["per_rank"]:
            out.append(f"  | {p['rank']} | {p['steps']} | {p['step_time_s']:.4g} | {p['comm_time_s']:.4g} | "
                       f"{p['bytes_sent']:.4g} |")
        out.append("")
    out += ["", "*Aggregation:* per rank, the mean over its /ranks rows; imbalance = slowest rank's mean step time / "
            "mean over ranks - 1; communication fraction = sum comm_time_s / sum step_time_s over all rows.", ""]
    return "\n".join(out)


def scaling_md(runs):
    pts = F.scaling_data(runs)
    if pts is None:
        return ""
    out = ["## Scaling", "", "| world size | step time (s) | tokens/step | mode | strong eff. | weak eff. | comm fraction |",
           "|---|---|---|---|---|---|---|"]
    for p in pts:
        cf = p["comm_fraction"]
        out.append(f"| {p['world_size']} | {A.fmt_est(p['step_time'], 5)} | {A.fmt_num(p['tokens_per_step'], 0)} | "
                   f"{p['mode']} | {A.fmt_num(p['strong_eff'], 3)} | {A.fmt_num(p['weak_eff'], 3)} | "
                   f"{A.fmt_est(cf, 3) if cf else 'n/a'} |")
    out += ["", "*Aggregation:* step time = mean over steps of the slowest rank's step_time_s (/ranks; /train "
            "step_time_s where /ranks is empty), mean over the runs of a world size; efficiencies relative to the "
            "smallest world size.", ""]
    return "\n".join(out)


def failures_md(runs):
    lines = []
    for r in runs:
        for kind in ("train", "eval", "ablation", "adaptation"):
            for n, (st, msg) in r.status.get(kind, {}).items():
                if st == "failed":
                    lines.append(f"- `{r.name}` {kind}/{n}: **failed**: {_md_escape(msg) or '(no message)'}")
                elif st in ("pending", "running") and r.run_state != "running":
                    lines.append(f"- `{r.name}` {kind}/{n}: {st} (run state {r.run_state})")
    if not lines:
        return ""
    return "\n".join(["## Failures and incomplete parts", ""] + lines + [""])


def sweeps_md(sweeps, outdir, figures):
    """The cell sections: per sweep, the budget-to-95% table, the cell table with paired tests, the Pareto plot.
    Returns (markdown, figures, the text --print shows)."""
    out, figs, shown = ["## Sweeps: accuracy against KV bytes per context size", ""], [], []
    for i, sw in enumerate(sweeps):
        suffix = "" if len(sweeps) == 1 else f"_{i + 1}"
        title = f"Sweep {i + 1}" + (f" ({sw.label})" if sw.label else "")
        stats = SW.all_cell_stats(sw)
        k95 = SW.keep95_markdown(sw)
        cells = SW.cells_markdown(sw, stats)
        out += [f"### {title}", "",
                f"Runs: {', '.join('`' + r.name + '`' for r in sw.runs)}; context sizes "
                f"{', '.join(str(c) for c in sw.context_sizes)}; KV budgets {', '.join(sw.budgets)}; methods "
                f"{', '.join(sw.methods)}.", ""]
        out += [f"#### Table 5{suffix}: the budget at which each method first keeps >= 95% of the full cache's F1", "",
                k95, "", f"#### Table 6{suffix}: every cell, with paired tests against the full cache", "", cells, ""]
        for n in sw.notes:
            out.append(f"- note: {n}")
        with open(os.path.join(outdir, f"table5_budget_to_95pct{suffix}.csv"), "w") as fh:
            fh.write(SW.keep95_csv(sw))
        with open(os.path.join(outdir, f"table6_sweep_cells{suffix}.csv"), "w") as fh:
            fh.write(SW.cells_csv(sw, stats))
        out.append(f"Files: `table5_budget_to_95pct{suffix}.csv`, `table6_sweep_cells{suffix}.csv`\n")
        if figures:
            figs.append(F.fig_pareto(sw, outdir, "pareto" + suffix))
            figs.append(F.fig_f1_vs_context(sw, outdir, "f1_vs_context" + suffix))
        shown += [f"### {title}: Table 5, the budget at which each method first keeps >= 95% of the full cache's F1\n",
                  k95 + "\n", f"### {title}: Table 6, cells with paired tests against the full cache\n", cells + "\n"]
    return "\n".join(out), figs, "\n".join(shown)


def write_report(runs, outdir, print_tables=False, figures=True, one_sweep=False, tables_context=None):
    os.makedirs(outdir, exist_ok=True)
    sweeps = SW.build_sweeps(runs, one_sweep=one_sweep)  # refuses conflicting cells before anything is written
    # The per-method tables and figures read a run with several budgets as one run per budget.
    table_runs = SW.expand_budgets(SW.restrict_context(runs, tables_context) if tables_context else runs)
    tables, groups = A.build_tables(table_runs)
    md = ["# dsrsq report", "",
          f"Runs: {', '.join('`' + r.name + '`' for r in runs)} ({len(runs)} file(s), "
          f"{len(groups)} group(s) after merging seeds).", ""]
    if tables_context:
        md += [f"Tables 1-4 and their figures: the cells of context size {tables_context} only "
               "(`--tables-context`); Tables 5-6 and the sweep figures: every cell.", ""]
    md.append(provenance_md(runs))
    fail = failures_md(runs)
    if fail:
        md.append(fail)
    md.append("## Tables\n")
    for t in tables:
        md.append(A.to_markdown(t))
        if t.present:
            with open(os.path.join(outdir, t.slug + ".csv"), "w") as fh:
                fh.write(A.to_csv(t))
            with open(os.path.join(outdir, t.slug + ".tex"), "w") as fh:
                fh.write(A.to_latex(t))
            md.append(f"Files: `{t.slug}.csv`, `{t.slug}.tex`\n")
    md.append(ranks_md(runs))
    sc = scaling_md(runs)
    if sc:
        md.append(sc)
    sweep_text, sweep_figs, sweep_shown = sweeps_md(sweeps, outdir, figures)
    md.append(sweep_text)
    figs = (F.make_all(table_runs, outdir) + sweep_figs) if figures else []
    md.append("## Figures\n" if figures else "## Figures\n\nNot made (--no-figures).\n")
    for f in figs:
        if f.path:
            md += [f"### {f.name}", "", f"![{f.name}]({os.path.basename(f.path)})", "", f"*{f.caption}*", ""]
        else:
            md += [f"### {f.name}", "", f"Skipped: {f.note}.", ""]
    with open(os.path.join(outdir, "report.md"), "w") as fh:
        fh.write("\n".join(md))
    if print_tables:
        for t in A.printed_tables(tables):
            print(A.to_markdown(t))
        print(sweep_shown)
        for f in sweep_figs:
            if f.path:
                print(f"figure {f.name}: {f.path}")
    return tables, figs
