"""Reads one dsrsq results file (run.h5) into plain Python / numpy objects.

Every problem (not HDF5, truncated, foreign format, other schema version, a
missing group or dataset) raises ReportError naming the file and the group.
"""

import json
import math
import os

import numpy as np

from . import schema as S

try:
    import h5py
except ImportError as exc:  # pragma: no cover - environment problem
    raise SystemExit("dsrsq report: h5py is missing (Debian: apt-get install python3-h5py)") from exc


class ReportError(Exception):
    """A problem with an input file; printed as one line, no traceback."""

    def __init__(self, path, group, message):
        self.path = path
        self.group = group
        self.message = message
        where = f"{path}" + (f": group '{group}'" if group else "")
        super().__init__(f"{where}: {message}")


def _fixed_string(ds):
    v = ds[()]
    if isinstance(v, np.ndarray):
        v = v.tobytes()
    if isinstance(v, bytes):
        return v.rstrip(b"\0").decode("utf-8", "replace")
    return str(v)


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        if v.shape == ():
            return _attr_value(v[()])
        return [_attr_value(x) for x in v.tolist()]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


class Examples:
    """One /eval/<m> or /ablation/<v> table: numeric columns, string columns and the summary."""

    def __init__(self, cols, strings, summary, efficiency=None):
        self.cols = cols          # name -> np.ndarray (n rows)
        self.strings = strings    # name -> list[str] (n rows)
        self.summary = summary    # name -> float / int
        self.efficiency = efficiency  # for ablation variants: name -> value
        self.n = len(next(iter(cols.values()))) if cols else 0
        self._meta = None

    @property
    def meta(self):
        """Per-example meta JSON, parsed (a row that does not parse gives {})."""
        if self._meta is None:
            out = []
            for s in self.strings.get("meta", []):
                try:
                    v = json.loads(s) if s else {}
                except ValueError:
                    v = {}
                out.append(v if isinstance(v, dict) else {})
            self._meta = out
        return self._meta

    def golds(self):
        return [s.split(S.GOLD_SEPARATOR) if s else [] for s in self.strings.get("gold", [])]


class Run:
    """Everything in one run.h5."""

    def __init__(self, path):
        self.path = path
        self.name = run_name_of(path)
        self.attrs = {}
        self.config = {}
        self.resolved = ""
        self.run_state = ""
        self.end_time = ""
        self.status = {"train": {}, "eval": {}, "ablation": {}, "adaptation": {}}
        self.train = {}
        self.val = {}
        self.ranks = {}
        self.eval = {}
        self.efficiency = {}
        self.ablation = {}
        self.adaptation = {}
        self.backbones = {}  # method -> the weights it ran on (attr "backbone" of /eval/<m>)
        self.protocol = ""   # root attr "protocol" (query_aware | context_only | ...)
        # Evaluation cells (schema 3: /cells; older files: made up by _implicit_cells): a list of Cell,
        # index = the rows' `cell` value; per method, each cell's (state, message) and efficiency dict.
        self.cells = []
        self.cells_implicit = False
        self.cell_status = {}      # method -> {cell index: (state, message)}
        self.cell_efficiency = {}  # method -> {cell index: {field: value}}
        self.cell_summary = {}     # method -> {cell index: {field: value}} (schema 3)

    # Convenience -----------------------------------------------------------
    def state(self, kind, name):
        return self.status.get(kind, {}).get(name, ("missing", ""))

    @property
    def world_size(self):
        return int(self.attrs.get("world_size", 1))

    @property
    def seed(self):
        v = self.attrs.get("seed", self.config.get("seed", self.config.get("general.seed")))
        return v

    def config_value(self, key, default=None):
        """A resolved option by its bare key ("kv_budget") or "section.key"."""
        if key in self.config:
            return self.config[key]
        for k, v in self.config.items():
            if k.rsplit(".", 1)[-1] == key:
                return v
        return default


class Cell:
    """One evaluation cell: the test examples of one context size at one KV budget."""

    __slots__ = ("index", "context_size", "kv_budget", "fraction", "bytes")

    def __init__(self, index, context_size, kv_budget, fraction=math.nan, nbytes=-1):
        self.index, self.context_size, self.kv_budget = index, context_size, kv_budget
        self.fraction, self.bytes = fraction, nbytes

    def __repr__(self):
        return f"Cell({self.index}, context {self.context_size}, budget {self.kv_budget})"


def budget_fraction_bytes(text):
    """(fraction, bytes) of a --kv_budget text as KVBudget::parse reads it (NaN / -1 for the other kind)."""
    t = str(text).strip()
    try:
        return float(t), -1
    except ValueError:
        pass
    units = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "kB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                return math.nan, int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    return math.nan, -1


def example_context_size(meta, default=-1):
    """The context size an example was made for: meta context_size (every file since schema 3), else the task's
    target_tokens / length (synthetic tasks of older files), else `default`."""
    for k in ("context_size", "target_tokens", "length"):
        v = meta.get(k)
        if v is not None:
            try:
                return int(float(v))
            except (TypeError, ValueError):
                pass
    return default


def run_name_of(path):
    p = os.path.abspath(path)
    d, base = os.path.split(p)
    if base == "run.h5" and d:
        return os.path.basename(d)
    return os.path.splitext(base)[0]


def open_h5(path):
    """Opens a results file for reading, SWMR-safe; clear errors for the common failures."""
    if not os.path.exists(path):
        raise ReportError(path, None, "no such file")
    if os.path.isdir(path):
        raise ReportError(path, None, "is a directory, not a run.h5 file")
    if not h5py.is_hdf5(path):
        raise ReportError(path, None, "not an HDF5 file (foreign or truncated file)")
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as e:
        try:
            return h5py.File(path, "r")
        except OSError:
            pass
        msg = str(e)
        hint = ""
        if "lock" in msg.lower():
            hint = " (on a file system without locks set HDF5_USE_FILE_LOCKING=FALSE)"
        raise ReportError(path, None, f"cannot open as HDF5 (truncated or damaged?): {msg}{hint}") from None


def check_format(path, f):
    attrs = f.attrs
    if "format" not in attrs:
        raise ReportError(path, "/", "not a dsrsq results file: no root attribute 'format'")
    fmt = _attr_value(attrs["format"])
    if fmt != S.FORMAT_NAME:
        raise ReportError(path, "/", f"not a dsrsq results file: format is '{fmt}', expected '{S.FORMAT_NAME}'")
    if "schema_version" not in attrs:
        raise ReportError(path, "/", "no root attribute 'schema_version'")
    ver = _attr_value(attrs["schema_version"])
    if ver not in S.READABLE_VERSIONS:
        raise ReportError(path, "/", f"schema_version {ver}; this tool reads schema_version "
                                     f"{', '.join(str(v) for v in S.READABLE_VERSIONS)}")


class _Reader:
    def __init__(self, path, f):
        self.path = path
        self.f = f

    def group(self, name):
        try:
            obj = self.f.get(name)
        except (OSError, RuntimeError, KeyError) as e:
            raise ReportError(self.path, "/" + name, f"cannot read (truncated or damaged file?): {e}") from None
        if obj is None:
            raise ReportError(self.path, "/" + name, "missing group")
        if not isinstance(obj, h5py.Group):
            raise ReportError(self.path, "/" + name, "is not a group")
        return obj

    def dataset(self, g, name):
        try:
            obj = g.get(name)
        except (OSError, RuntimeError, KeyError) as e:
            raise ReportError(self.path, g.name, f"cannot read '{name}': {e}") from None
        if obj is None:
            raise ReportError(self.path, g.name, f"missing dataset '{name}'")
        if not isinstance(obj, h5py.Dataset):
            raise ReportError(self.path, g.name, f"'{name}' is not a dataset")
        return obj

    def read(self, ds, sl=slice(None)):
        try:
            try:
                ds.refresh()
            except (AttributeError, ValueError, OSError, RuntimeError):
                pass
            return ds[sl]
        except (OSError, RuntimeError, ValueError) as e:
            raise ReportError(self.path, ds.parent.name, f"cannot read '{ds.name}' (truncated file?): {e}") from None

    def scalar(self, g, name):
        v = self.read(self.dataset(g, name), ())
        return _attr_value(v)

    def fixed_string(self, g, name):
        ds = self.dataset(g, name)
        try:
            return _fixed_string(ds)
        except (OSError, RuntimeError) as e:
            raise ReportError(self.path, g.name, f"cannot read '{name}': {e}") from None

    def table(self, gname, num_cols, str_cols=()):
        """Complete rows of a row table: min length over columns, less rows pointing past c_bytes."""
        g = self.group(gname)
        dss = {c: self.dataset(g, c) for c in num_cols}
        sds = {c: (self.dataset(g, c + "_bytes"), self.dataset(g, c + "_end")) for c in str_cols}
        lengths = [d.shape[0] if d.shape else 0 for d in dss.values()]
        lengths += [e.shape[0] if e.shape else 0 for _, e in sds.values()]
        n = min(lengths) if lengths else 0
        ends = {}
        for c, (b, e) in sds.items():
            end = np.asarray(self.read(e, slice(0, n)), dtype=np.int64)
            nb = b.shape[0]
            ok = n
            while ok > 0 and end[ok - 1] > nb:
                ok -= 1
            n = min(n, ok)
            ends[c] = end
        cols = {c: np.asarray(self.read(d, slice(0, n))) for c, d in dss.items()}
        strings = {}
        for c, (b, _) in sds.items():
            end = ends[c][:n]
            if n and np.any(np.diff(np.concatenate([[0], end])) < 0):
                raise ReportError(self.path, g.name, f"corrupt end offsets in '{c}_end' (not increasing)")
            data = np.asarray(self.read(b, slice(0, int(end[-1]) if n else 0)), dtype=np.uint8).tobytes()
            start = np.concatenate([[0], end[:-1]]).astype(np.int64)
            strings[c] = [data[s:e].decode("utf-8", "replace") for s, e in zip(start, end)]
        return cols, strings, n

    def scalars(self, gname, names, old_names=None):
        """old_names: {name: older name or None} for fields that older files lack (read as NaN)."""
        g = self.group(gname)
        out = {}
        for k in names:
            if old_names and k in old_names and k not in g:
                old = old_names[k]
                out[k] = self.scalar(g, old) if old and old in g else math.nan
            else:
                out[k] = self.scalar(g, k)
        return out

    def status(self, gname):
        g = self.group(gname)
        return self.fixed_string(g, "state"), self.fixed_string(g, "message")

    def children(self, gname):
        g = self.group(gname)
        return sorted(k for k in g.keys() if isinstance(g.get(k, getlink=False), h5py.Group))


def read_run(path):
    """Reads a whole run.h5; raises ReportError on any problem."""
    f = open_h5(path)
    try:
        check_format(path, f)
        return _read(path, f)
    except ReportError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ReportError(path, None, f"cannot read (truncated or damaged file?): {e}") from None
    finally:
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a damaged file must not mask the real error
            pass


def _read(path, f):
    r = _Reader(path, f)
    run = Run(path)
    for k in S.ROOT_ATTRS:
        if k not in f.attrs:
            raise ReportError(path, "/", f"missing root attribute '{k}'")
    run.attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    for g in S.TOP_GROUPS:
        r.group(g)

    cfg = r.group("config")
    run.config = {k: str(_attr_value(v)) for k, v in cfg.attrs.items()}
    run.resolved = r.fixed_string(cfg, "resolved")

    st = r.group("status")
    run.run_state = r.fixed_string(st, "run_state")
    run.end_time = r.fixed_string(st, "end_time")
    run.status["train"]["train"] = r.status("status/train")

    cols, _, _ = r.table("train", S.TRAIN_INT + S.TRAIN_FLOAT)
    run.train = cols
    cols, _, _ = r.table("val", S.VAL_INT + S.VAL_FLOAT)
    run.val = cols
    cols, _, _ = r.table("ranks", S.RANKS_INT + S.RANKS_FLOAT)
    run.ranks = cols

    # The run's method order (root attr method_order, from the method table);
    # HDF5 lists groups by name.
    names = r.children("eval")
    order = str(run.attrs.get("method_order", "")).split()
    if sorted(order) == sorted(names):
        names = order
    run.protocol = str(run.attrs.get("protocol", ""))
    version = int(run.attrs.get("schema_version", 0))
    if version >= 3:
        g = r.group("cells")
        cs = np.asarray(r.read(r.dataset(g, "context_size")), dtype=np.int64)
        fr = np.asarray(r.read(r.dataset(g, "kv_budget_fraction")), dtype=np.float64)
        by = np.asarray(r.read(r.dataset(g, "kv_budget_bytes")), dtype=np.int64)
        texts = str(_attr_value(g.attrs.get("kv_budget", ""))).split()
        if not (len(cs) == len(fr) == len(by) == len(texts)):
            raise ReportError(path, "/cells", f"columns of different lengths ({len(cs)}, {len(fr)}, {len(by)}, "
                                              f"{len(texts)} budget texts)")
        run.cells = [Cell(k, int(cs[k]), texts[k], float(fr[k]), int(by[k])) for k in range(len(cs))]
    for m in names:
        bb = r.group(f"eval/{m}").attrs.get("backbone")
        if bb is not None:
            run.backbones[m] = str(_attr_value(bb))
        run.status["eval"][m] = r.status(f"status/eval/{m}")
        run.eval[m] = _examples(r, f"eval/{m}", version)
        run.efficiency[m] = r.scalars(f"efficiency/{m}", _EFF_FIELDS, S.EFFICIENCY_OLD_NAMES)
        if version >= 3:
            run.cell_status[m], run.cell_efficiency[m], run.cell_summary[m] = {}, {}, {}
            for c in run.cells:
                cg = f"eval/{m}/cells/{c.index}"
                run.cell_status[m][c.index] = r.status(cg)
                run.cell_summary[m][c.index] = r.scalars(cg + "/summary", S.SUMMARY_FLOAT + S.SUMMARY_INT)
                run.cell_efficiency[m][c.index] = r.scalars(cg + "/efficiency", _EFF_FIELDS, S.EFFICIENCY_OLD_NAMES)
    for m in r.children("efficiency"):
        if m not in run.eval:
            raise ReportError(path, f"/eval/{m}", "missing group (present under /efficiency)")
    variants = r.children("ablation")
    vorder = str(run.attrs.get("ablation_order", "")).split()
    if sorted(vorder) == sorted(variants):
        variants = vorder
    for v in variants:
        run.status["ablation"][v] = r.status(f"status/ablation/{v}")
        ex = _examples(r, f"ablation/{v}", version)
        ex.efficiency = r.scalars(f"ablation/{v}/efficiency", _EFF_FIELDS, S.EFFICIENCY_OLD_NAMES)
        run.ablation[v] = ex
    bins = int(run.attrs["retention_bins"])
    for a in r.children("adaptation"):
        run.status["adaptation"][a] = r.status(f"status/adaptation/{a}")
        g = r.group(f"adaptation/{a}")
        d = {k: np.asarray(r.read(r.dataset(g, k))) for k in S.ADAPTATION_ARRAYS}
        if d["retention_by_age"].shape != (bins,) or d["age_bin_edges"].shape != (bins + 1,):
            raise ReportError(path, g.name, f"retention_by_age / age_bin_edges do not match retention_bins={bins}")
        d.update({k: r.scalar(g, k) for k in S.ADAPTATION_FLOAT + S.ADAPTATION_INT})
        run.adaptation[a] = d
    if version < 3:
        _implicit_cells(run)
    else:
        for kind in (run.eval, run.ablation):
            for name, ex in kind.items():
                bad = [int(c) for c in set(ex.cols["cell"].tolist()) if not 0 <= c < len(run.cells)]
                if bad:
                    raise ReportError(path, f"/{'eval' if kind is run.eval else 'ablation'}/{name}",
                                      f"rows with cell {bad[0]}, but /cells has {len(run.cells)} cells")
    return run


_EFF_FIELDS = S.EFFICIENCY_INT + S.EFFICIENCY_FLOAT + S.EFFICIENCY_MERGE_INT + S.EFFICIENCY_MERGE_FLOAT


def _implicit_cells(run):
    """Schema 1 and 2: one budget per run (config kv_budget); a cell per context size of the examples (meta
    context_size / target_tokens / length). Each cell's state is its method's; its efficiency is the method's
    when the method has one cell, else unknown (NaN)."""
    budget = str(run.config_value("kv_budget", "")).strip() or "?"
    fr, by = budget_fraction_bytes(budget)
    sizes = []
    for tables in (run.eval, run.ablation):
        for ex in tables.values():
            for m in ex.meta:
                c = example_context_size(m)
                if c not in sizes:
                    sizes.append(c)
    sizes.sort()
    run.cells = [Cell(k, c, budget, fr, by) for k, c in enumerate(sizes)]
    run.cells_implicit = True
    index = {c: k for k, c in enumerate(sizes)}
    for tables in (run.eval, run.ablation):
        for ex in tables.values():
            ex.cols["cell"] = np.array([index[example_context_size(m)] for m in ex.meta], dtype=np.int64)
    for m, ex in run.eval.items():
        used = sorted(set(ex.cols["cell"].tolist())) if ex.n else list(range(len(sizes)))
        run.cell_status[m] = {k: run.state("eval", m) for k in used}
        eff = run.efficiency.get(m, {})
        run.cell_efficiency[m] = {k: (dict(eff) if len(used) == 1 else {f: math.nan for f in _EFF_FIELDS})
                                  for k in used}


def _examples(r, gname, version=3):
    cols, strings, _ = r.table(gname, S.EXAMPLE_FLOAT + S.EXAMPLE_INT + (("cell",) if version >= 3 else ()),
                               S.EXAMPLE_STR)
    summary = r.scalars(gname + "/summary", S.SUMMARY_FLOAT + S.SUMMARY_INT)
    ex = Examples(cols, strings, summary)
    # Examples whose KV budget the method could not meet (meta "kv_infeasible"): 1.0, else 0.0.
    ex.cols["kv_infeasible"] = np.array([1.0 if str(m.get("kv_infeasible", "")).lower() == "true" else 0.0
                                         for m in ex.meta], dtype=np.float64)
    return ex
