"""report --check: validates a run.h5 against the documented layout and lists every problem."""

import numpy as np

from . import schema as S
from .reader import ReportError, open_h5, _attr_value, _fixed_string

import h5py


def _kind(ds):
    k = ds.dtype.kind
    return "int" if k in "iu" else "float" if k == "f" else "string" if k in "SUO" else k


def check_file(path):
    """Returns (problems, notes): lists of strings. Raises ReportError when the file cannot be opened."""
    f = open_h5(path)
    problems, notes = [], []
    P = problems.append
    try:
        a = f.attrs
        fmt = _attr_value(a["format"]) if "format" in a else None
        if fmt != S.FORMAT_NAME:
            P(f"/: root attribute 'format' is {fmt!r}, expected '{S.FORMAT_NAME}'")
        ver = _attr_value(a["schema_version"]) if "schema_version" in a else None
        if ver not in S.READABLE_VERSIONS:
            P(f"/: root attribute 'schema_version' is {ver!r}, this tool checks versions "
              f"{', '.join(str(v) for v in S.READABLE_VERSIONS)}")
        elif ver < S.SCHEMA_VERSION:
            notes.append(f"/: schema_version {ver} (older layout, read without evaluation cells)")
        v3 = isinstance(ver, int) and ver >= 3
        for k in S.ROOT_ATTRS:
            if k not in a:
                P(f"/: missing root attribute '{k}'")
        for k in ("git_sha", "hostname", "device", "dataset_hash", "start_time", "command_line"):
            if k not in a:
                notes.append(f"/: provenance attribute '{k}' absent")
        for g in S.TOP_GROUPS:
            if not isinstance(f.get(g), h5py.Group):
                P(f"/{g}: missing group")

        def ds(path_, kind=None, shape=None):
            obj = f.get(path_)
            if obj is None:
                P(f"/{path_}: missing dataset")
                return None
            if not isinstance(obj, h5py.Dataset):
                P(f"/{path_}: not a dataset")
                return None
            if kind and _kind(obj) != kind:
                P(f"/{path_}: type {obj.dtype} ({_kind(obj)}), expected {kind}")
            if shape is not None and obj.shape != shape:
                P(f"/{path_}: shape {obj.shape}, expected {shape}")
            return obj

        def state(path_, allowed):
            d = ds(path_ + "/state", "string")
            ds(path_ + "/message", "string")
            if d is not None:
                v = _fixed_string(d)
                if v not in allowed:
                    P(f"/{path_}/state: value {v!r}, expected one of {', '.join(allowed)}")
                return v
            return None

        if isinstance(f.get("config"), h5py.Group):
            ds("config/resolved", "string")
            if not f["config"].attrs:
                notes.append("/config: no option attributes")
        if isinstance(f.get("status"), h5py.Group):
            d = ds("status/run_state", "string")
            if d is not None and _fixed_string(d) not in S.RUN_STATES:
                P(f"/status/run_state: value {_fixed_string(d)!r}, expected one of {', '.join(S.RUN_STATES)}")
            ds("status/end_time", "string")
            state("status/train", S.STATES)

        def table(g, ints, floats, strs=()):
            if not isinstance(f.get(g), h5py.Group):
                return
            lens = []
            for c in ints:
                d = ds(f"{g}/{c}", "int")
                if d is not None:
                    lens.append(d.shape[0] if d.ndim == 1 else -1)
                    if d.ndim != 1:
                        P(f"/{g}/{c}: not 1-D")
            for c in floats:
                d = ds(f"{g}/{c}", "float")
                if d is not None:
                    lens.append(d.shape[0] if d.ndim == 1 else -1)
            for c in strs:
                b = ds(f"{g}/{c}_bytes")
                e = ds(f"{g}/{c}_end", "int")
                if b is not None and b.dtype != np.uint8:
                    P(f"/{g}/{c}_bytes: type {b.dtype}, expected uint8")
                if e is not None:
                    lens.append(e.shape[0])
                    end = e[:]
                    if end.size and (np.any(np.diff(np.concatenate([[0], end])) < 0)):
                        P(f"/{g}/{c}_end: end offsets not increasing")
                    if b is not None and end.size and end[-1] > b.shape[0]:
                        notes.append(f"/{g}/{c}_end: last row points past {c}_bytes (live or interrupted append)")
            if lens and max(lens) - min(lens) > 1:
                P(f"/{g}: column lengths differ by more than one row ({min(lens)}..{max(lens)})")
            elif lens and max(lens) != min(lens):
                notes.append(f"/{g}: one column a row longer (live run); complete rows {min(lens)}")
            return min(lens) if lens else 0

        n_cells = None
        if v3:
            cg = f.get("cells")
            if not isinstance(cg, h5py.Group):
                P("/cells: missing group (schema 3)")
            else:
                lens = []
                for c in S.CELLS_INT + S.CELLS_FLOAT:
                    d = ds(f"cells/{c}", "int" if c in S.CELLS_INT else "float")
                    if d is not None:
                        lens.append(d.shape[0] if d.ndim == 1 else -1)
                texts = str(_attr_value(cg.attrs.get("kv_budget", ""))).split()
                lens.append(len(texts))
                if len(set(lens)) > 1:
                    P(f"/cells: columns and the kv_budget attribute differ in length ({lens})")
                n_cells = lens[0] if lens else 0
        n = table("train", S.TRAIN_INT, S.TRAIN_FLOAT)
        if n == 0:
            notes.append("/train: no rows")
        table("val", S.VAL_INT, S.VAL_FLOAT)
        if table("ranks", S.RANKS_INT, S.RANKS_FLOAT) == 0:
            notes.append("/ranks: no rows (single-rank run or not recorded)")

        def children(g):
            obj = f.get(g)
            return sorted(k for k in obj if isinstance(obj[k], h5py.Group)) if isinstance(obj, h5py.Group) else []

        def scalars(g, ints, floats):
            for k in ints:
                ds(f"{g}/{k}", "int", ())
            for k in floats:
                ds(f"{g}/{k}", "float", ())

        methods = children("eval")
        if not methods:
            notes.append("/eval: no methods")
        for m in methods:
            table(f"eval/{m}", S.EXAMPLE_INT + (("cell",) if v3 else ()), S.EXAMPLE_FLOAT, S.EXAMPLE_STR)
            scalars(f"eval/{m}/summary", S.SUMMARY_INT, S.SUMMARY_FLOAT)
            for k in range(n_cells or 0):
                cg = f"eval/{m}/cells/{k}"
                state(cg, S.CELL_STATES)
                scalars(f"{cg}/summary", S.SUMMARY_INT, S.SUMMARY_FLOAT)
                scalars(f"{cg}/efficiency", S.EFFICIENCY_INT + S.EFFICIENCY_MERGE_INT,
                        S.EFFICIENCY_FLOAT + S.EFFICIENCY_MERGE_FLOAT)
            if not isinstance(f.get(f"efficiency/{m}"), h5py.Group):
                P(f"/efficiency/{m}: missing group (method {m} is in /eval)")
            else:
                scalars(f"efficiency/{m}", S.EFFICIENCY_INT, S.EFFICIENCY_FLOAT)
            state(f"status/eval/{m}", S.STATES)
        for m in children("efficiency"):
            if m not in methods:
                P(f"/eval/{m}: missing group (method {m} is in /efficiency)")
        variants = children("ablation")
        if not variants:
            notes.append("/ablation: no variants (Table 4 and the ablation figure will be skipped)")
        for v in variants:
            table(f"ablation/{v}", S.EXAMPLE_INT + (("cell",) if v3 else ()), S.EXAMPLE_FLOAT, S.EXAMPLE_STR)
            scalars(f"ablation/{v}/summary", S.SUMMARY_INT, S.SUMMARY_FLOAT)
            scalars(f"ablation/{v}/efficiency", S.EFFICIENCY_INT, S.EFFICIENCY_FLOAT)
            state(f"status/ablation/{v}", S.STATES)
        ad = children("adaptation")
        if not ad:
            notes.append("/adaptation: no methods (Table 3 and the retention figure will be skipped)")
        bins = _attr_value(a["retention_bins"]) if "retention_bins" in a else None
        for m in ad:
            g = f"adaptation/{m}"
            ds(f"{g}/age_bin_edges", "float", (bins + 1,) if isinstance(bins, int) else None)
            ds(f"{g}/retention_by_age", "float", (bins,) if isinstance(bins, int) else None)
            ds(f"{g}/queries_per_bin", "int", (bins,) if isinstance(bins, int) else None)
            scalars(g, S.ADAPTATION_INT, S.ADAPTATION_FLOAT)
            state(f"status/adaptation/{m}", S.STATES)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        P(f"cannot read (truncated or damaged file?): {e}")
    finally:
        f.close()
    return problems, notes


def run_check(path, out):
    try:
        problems, notes = check_file(path)
    except ReportError as e:
        print(f"{path}: INVALID: {e.message}" + (f" (group {e.group})" if e.group else ""), file=out)
        return 1
    for n in notes:
        print(f"{path}: note: {n}", file=out)
    for p in problems:
        print(f"{path}: missing/invalid: {p}", file=out)
    if problems:
        print(f"{path}: INVALID ({len(problems)} problem(s))", file=out)
        return 1
    try:
        with open_h5(path) as f:
            ver = _attr_value(f.attrs.get("schema_version"))
    except ReportError:
        ver = "?"
    print(f"{path}: OK (format {S.FORMAT_NAME}, schema_version {ver})", file=out)
    return 0
