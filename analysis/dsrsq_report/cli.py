"""Command line: report RUN.h5 [...] -o DIR | --compare A B [--force] | --check RUN.h5 [...]."""

import argparse
import sys

from .reader import ReportError, read_run


def _parser():
    p = argparse.ArgumentParser(
        prog="report",
        description="Regenerate the dsrsq tables and figures from run.h5 files (results/README.md layout).")
    p.add_argument("runs", nargs="*", metavar="RUN.h5", help="results files; several merge (seeds -> intervals)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder for report.md, CSV, LaTeX and PNG files")
    p.add_argument("--print", dest="print_tables", action="store_true", help="also print Tables 1 and 2 (and Table 4 when the runs have an ablation) to stdout")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="write the tables and report.md only")
    p.add_argument("--compare", nargs=2, metavar=("A.h5", "B.h5"), help="print the ratio B/A of every figure")
    p.add_argument("--force", action="store_true", help="--compare even across hardware or task splits")
    p.add_argument("--check", action="store_true", help="validate the files against the schema; list what is missing")
    p.add_argument("--tables-context", dest="tables_context", type=int, metavar="N",
                   help="Tables 1-4 (and their figures) from the cells of context size N only (e.g. 4096: the "
                        "paper's tables at one length of a sweep); Tables 5-6 and the sweep figures keep every cell")
    p.add_argument("--one-sweep", dest="one_sweep", action="store_true",
                   help="the runs are the cells of one sweep (e.g. a Slurm array): refuse them unless they merge")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.check:
            from .check import run_check
            if not args.runs:
                print("report --check: give at least one RUN.h5", file=sys.stderr)
                return 2
            rc = 0
            for path in args.runs:
                rc = max(rc, run_check(path, sys.stdout))
            return rc
        if args.compare:
            from .compare import compare_text, incompatibilities
            a, b = (read_run(p) for p in args.compare)
            diffs = incompatibilities(a, b)
            if diffs and not args.force:
                print("report --compare: refusing to compare runs that differ in", file=sys.stderr)
                for d in diffs:
                    print("  " + d, file=sys.stderr)
                print("(pass --force to compare anyway)", file=sys.stderr)
                return 3
            for d in diffs:
                print("warning (--force): " + d, file=sys.stderr)
            text, _, _ = compare_text(a, b)
            print(text)
            return 0
        if not args.runs:
            print("report: give RUN.h5 files (see --help)", file=sys.stderr)
            return 2
        if not args.output and not args.print_tables:
            print("report: give -o DIR (and/or --print)", file=sys.stderr)
            return 2
        runs = [read_run(p) for p in args.runs]
        if args.output:
            from .report import write_report
            write_report(runs, args.output, print_tables=args.print_tables, figures=args.figures,
                         one_sweep=args.one_sweep, tables_context=args.tables_context)
            print(f"report: wrote {args.output}/report.md")
        else:
            from . import aggregate as A
            from . import sweep as SW
            SW.build_sweeps(runs, one_sweep=args.one_sweep)  # the same refusals as with -o
            at = SW.restrict_context(runs, args.tables_context) if args.tables_context else runs
            tables, _ = A.build_tables(SW.expand_budgets(at))
            for t in A.printed_tables(tables):
                print(A.to_markdown(t))
        return 0
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"report: error: {type(e).__name__}: {e} (while reading {', '.join(args.runs or args.compare or [])})",
              file=sys.stderr)
        return 2
