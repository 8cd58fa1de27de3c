"""SYNTHETIC SWEEP FIXTURES, only used by the tests.

Writes schema 3 run.h5 files (results/README.md: /cells, the row column `cell`, /eval/<m>/cells/<k>) whose
per-example values are chosen by the test, so the budget-to-95% table, the paired tests and the Pareto data have
known answers. Every value is made up; none of it is a measurement.
"""

import json

import h5py
import numpy as np

from synthetic_fixtures import _fixed, _rows, _status, _strings

EX_FLOAT = ("f1", "em", "rouge_l", "bleu", "ttft_s", "itl_s")
EX_INT = ("context_tokens", "attended_tokens", "kv_budget_requested_bytes", "kv_budget_achieved_bytes",
          "kv_resident_bytes", "kv_peak_prefill_bytes", "kv_read_per_step_bytes", "kv_total_bytes")
EFF_INT = ("peak_mem_bytes", "avg_mem_bytes", "process_peak_rss_bytes", "decode_examples")
EFF_FLOAT = ("throughput_tok_s", "context_tokens_per_s", "latency_s", "itl_s", "token_efficiency", "flops",
             "tokens_run", "context_tokens_served", "serve_s")


class CellSpec:
    """One (method, cell): per-example F1 and EM (n values), KV bytes held, infeasible flags, or failed."""

    def __init__(self, f1=None, em=None, kv_bytes=1000, infeasible=False, failed=False, eff=None):
        self.f1, self.em, self.kv_bytes, self.infeasible, self.failed = f1, em, kv_bytes, infeasible, failed
        self.eff = eff or {}


def write_sweep_run(path, cells, specs, *, n_examples=10, seed=1, config_extra=None, ids=None, methods=None):
    """cells: [(context_size, budget text)]; specs: {(method, cell index): CellSpec}.

    ids: {context_size: [example ids]} (default: "c<size>-<i>"). The rows of each method are written cell by cell.
    """
    methods = methods or sorted({m for m, _ in specs}, key=lambda m: (m != "full", m))
    with h5py.File(path, "w", libver="latest") as f:
        a = f.attrs
        a["format"] = "dsrsq-results"
        a["schema_version"] = np.int64(3)
        for k in ("world_size", "dp", "sp"):
            a[k] = np.int64(1)
        a["retention_bins"] = np.int64(4)
        a["git_sha"] = "synthetic"
        a["hostname"] = "synthetic-host"
        a["device"] = "cpu"
        a["dataset_hash"] = "synthetic"
        a["method_order"] = " ".join(methods)
        a["ablation_order"] = ""
        a["protocol"] = "query_aware"
        budgets = []
        for _, b in cells:
            if b not in budgets:
                budgets.append(b)
        cfg_kv = {"seed": str(seed), "dataset": "needle", "kv_budget": " ".join(budgets), "methods": " ".join(methods),
                  "eval_context_sizes": " ".join(str(c) for c in sorted({c for c, _ in cells})), "steps": "20",
                  "run_name": f"sweep-{seed}"}
        cfg_kv.update(config_extra or {})
        cfg = f.create_group("config")
        for k, v in cfg_kv.items():
            cfg.attrs[k] = v
        text = "".join(f"{k} = {v}\n" for k, v in sorted(cfg_kv.items()))
        _fixed(cfg, "resolved", text, max(1, len(text)))
        st = f.create_group("status")
        _fixed(st, "run_state", "done", 16)
        _fixed(st, "end_time", "2026-01-01T00:00:00Z", 64)
        _fixed(st, "run_message", "", 2048)
        _status(st.create_group("train"), "done")
        for name, ints, floats in (("train", ("step", "epoch"), ("loss_total", "loss_task", "loss_retrieval",
                                                                 "loss_compression", "loss_compute",
                                                                 "selected_fraction", "lr", "grad_norm",
                                                                 "tokens_per_s", "step_time_s")),
                                   ("val", ("step",), ("loss",)),
                                   ("ranks", ("step", "rank", "bytes_sent"), ("step_time_s", "comm_time_s"))):
            g = f.create_group(name)
            for c in ints:
                _rows(g, c, [], np.int64)
            for c in floats:
                _rows(g, c, [], np.float64)
        cg = f.create_group("cells")
        cg.create_dataset("context_size", data=np.array([c for c, _ in cells], dtype=np.int64))
        fr = []
        for _, b in cells:
            try:
                fr.append(float(b))
            except ValueError:
                fr.append(np.nan)
        cg.create_dataset("kv_budget_fraction", data=np.array(fr, dtype=np.float64))
        cg.create_dataset("kv_budget_bytes", data=np.full(len(cells), -1, dtype=np.int64))
        cg.attrs["kv_budget"] = " ".join(b for _, b in cells)
        ev, ef = f.create_group("eval"), f.create_group("efficiency")
        se = st.create_group("eval")
        for m in methods:
            g = ev.create_group(m)
            cols = {c: [] for c in EX_FLOAT + EX_INT + ("cell",)}
            strs = {c: [] for c in ("id", "task", "prediction", "gold", "meta")}
            any_failed = False
            for k, (c, b) in enumerate(cells):
                spec = specs.get((m, k))
                cgp = g.create_group(f"cells/{k}")
                if spec is None or spec.failed:
                    any_failed = any_failed or (spec is not None and spec.failed)
                    _status(cgp, "failed" if spec is not None else "pending",
                            f"synthetic failure of {m} at {c}/{b}" if spec is not None else "")
                    _scalars(cgp.create_group("summary"), {}, summary=True)
                    _scalars(cgp.create_group("efficiency"), {})
                    continue
                n = n_examples
                f1 = np.asarray(spec.f1, dtype=np.float64)
                em = np.asarray(spec.em if spec.em is not None else (f1 > 0.5), dtype=np.float64)
                assert f1.shape == (n,) and em.shape == (n,)
                exid = (ids or {}).get(c, [f"c{c}-{i}" for i in range(n)])
                depths = [0.1, 0.5, 0.9]
                for i in range(n):
                    strs["id"].append(exid[i])
                    strs["task"].append("needle")
                    strs["prediction"].append(f"p{i}")
                    strs["gold"].append(f"g{c}-{i}")
                    meta = {"task": "needle", "depth": str(depths[i % 3]), "target_tokens": str(c),
                            "context_size": str(c)}
                    if spec.infeasible:
                        meta["kv_infeasible"] = "true"
                    strs["meta"].append(json.dumps(meta))
                    cols["f1"].append(f1[i]), cols["em"].append(em[i])
                    for x in ("rouge_l", "bleu"):
                        cols[x].append(f1[i])
                    cols["ttft_s"].append(1e-3), cols["itl_s"].append(1e-4)
                    cols["context_tokens"].append(c), cols["attended_tokens"].append(c)
                    kvb = spec.kv_bytes[i] if np.ndim(spec.kv_bytes) else spec.kv_bytes
                    for x in ("kv_budget_requested_bytes", "kv_budget_achieved_bytes", "kv_resident_bytes",
                              "kv_peak_prefill_bytes", "kv_read_per_step_bytes", "kv_total_bytes"):
                        cols[x].append(int(kvb))
                    cols["cell"].append(k)
                _status(cgp, "done")
                _scalars(cgp.create_group("summary"), {"f1_mean": f1.mean(), "em_mean": em.mean(), "n_examples": n},
                         summary=True)
                eff = {"peak_mem_bytes": 1000 + k, "avg_mem_bytes": 500, "process_peak_rss_bytes": 10 ** 7,
                       "decode_examples": n, "throughput_tok_s": 100.0, "context_tokens_per_s": 90.0,
                       "latency_s": 1e-3, "itl_s": 1e-4, "token_efficiency": 0.5, "flops": 1e6,
                       "tokens_run": 100.0 * n, "context_tokens_served": 90.0 * n, "serve_s": float(n)}
                eff.update(spec.eff)
                _scalars(cgp.create_group("efficiency"), eff)
            for c in ("id", "task", "prediction", "gold", "meta"):
                _strings(g, c, strs[c])
            for c in EX_FLOAT:
                _rows(g, c, cols[c], np.float64)
            for c in EX_INT + ("cell",):
                _rows(g, c, cols[c], np.int64)
            f1s = np.asarray(cols["f1"])
            _scalars(g.create_group("summary"), {"f1_mean": f1s.mean() if f1s.size else np.nan,
                                                 "em_mean": np.mean(cols["em"]) if f1s.size else np.nan,
                                                 "n_examples": f1s.size}, summary=True)
            _scalars(ef.create_group(m), {"peak_mem_bytes": 2000, "throughput_tok_s": 100.0})
            _status(se.create_group(m), "failed" if any_failed else "done",
                    f"synthetic failure of {m}" if any_failed else "")
        for name in ("ablation", "adaptation"):
            f.create_group(name)
            st.create_group(name)


def _scalars(g, vals, summary=False):
    if summary:
        ints, floats = ("n_examples",), ("f1_mean", "em_mean", "rouge_l_mean", "bleu_mean", "corpus_bleu")
    else:
        ints, floats = EFF_INT, EFF_FLOAT
    for k in ints:
        g.create_dataset(k, data=np.int64(vals.get(k, -1)))
    for k in floats:
        g.create_dataset(k, data=np.float64(vals.get(k, np.nan)))
