"""SYNTHETIC TEST FIXTURES, only used by the tests.

Writes small run.h5 files that follow results/README.md (format dsrsq-results, schema version 1) for the
code paths the current dsrsq binary cannot produce yet: /ablation variants, multi-rank /ranks tables, scaling
studies and failed methods. Every value here is made up; none of it is a measurement.
"""

import json

import h5py
import numpy as np

EX_FLOAT = ("f1", "em", "rouge_l", "bleu", "ttft_s", "itl_s")
EX_INT = ("context_tokens", "attended_tokens", "kv_budget_requested_bytes", "kv_budget_achieved_bytes",
          "kv_resident_bytes", "kv_peak_prefill_bytes", "kv_read_per_step_bytes", "kv_total_bytes")


def _rows(g, name, data, dtype):
    g.create_dataset(name, data=np.asarray(data, dtype=dtype), maxshape=(None,), chunks=(64,))


def _strings(g, name, values):
    enc = [v.encode() for v in values]
    data = np.frombuffer(b"".join(enc), dtype=np.uint8) if enc else np.zeros(0, np.uint8)
    _rows(g, name + "_bytes", data, np.uint8)
    _rows(g, name + "_end", np.cumsum([len(e) for e in enc]) if enc else [], np.int64)


def _fixed(g, name, text, n):
    g.create_dataset(name, data=np.array(text.encode(), dtype=f"S{n}"))


def _status(g, state, message=""):
    _fixed(g, "state", state, 16)
    _fixed(g, "message", message, 2048)


def example_columns(rng, n, needle=True):
    """Per-example columns with varied values (a needle grid over depth x length in meta)."""
    depths = [0.1, 0.5, 0.9]
    lengths = [64, 128]
    cols = {c: rng.random(n) for c in ("f1", "em", "rouge_l", "bleu")}
    cols["em"] = (cols["em"] > 0.5).astype(float)
    cols["ttft_s"] = rng.uniform(1e-3, 5e-3, n)
    cols["itl_s"] = rng.uniform(1e-4, 5e-4, n)
    ctx = rng.integers(50, 130, n)
    cols["context_tokens"] = ctx
    cols["attended_tokens"] = (ctx * 0.5).astype(np.int64)
    for c in EX_INT[2:]:
        cols[c] = rng.integers(1000, 50000, n)
    meta = []
    for i in range(n):
        m = {"task": "needle" if needle else "kv_recall", "seed": str(i)}
        if needle:
            m.update({"depth": str(depths[i % 3]), "actual_depth": str(depths[i % 3] + 0.01),
                      "target_tokens": str(lengths[(i // 3) % 2]), "context_tokens": str(int(ctx[i]))})
        meta.append(json.dumps(m))
    cols["meta"] = meta
    return cols


def _examples(g, rng, n, cols=None):
    cols = cols or example_columns(rng, n)
    _strings(g, "id", [f"ex-{i}" for i in range(n)])
    _strings(g, "task", [json.loads(m)["task"] for m in cols["meta"]])
    _strings(g, "prediction", [f"pred {i}" for i in range(n)])
    _strings(g, "gold", [f"gold {i}\x1fother {i}" for i in range(n)])
    _strings(g, "meta", cols["meta"])
    for c in EX_FLOAT:
        _rows(g, c, cols[c], np.float64)
    for c in EX_INT:
        _rows(g, c, cols[c], np.int64)
    s = g.create_group("summary")
    for k in ("f1", "em", "rouge_l", "bleu"):
        s.create_dataset(k + "_mean", data=np.float64(np.mean(cols[k]) if n else np.nan))
    s.create_dataset("corpus_bleu", data=np.float64(rng.random()))
    s.create_dataset("n_examples", data=np.int64(n))
    return cols


def _efficiency(g, rng):
    vals = {"peak_mem_bytes": np.int64(rng.integers(1e6, 5e6)), "avg_mem_bytes": np.int64(rng.integers(1e5, 1e6)),
            "process_peak_rss_bytes": np.int64(rng.integers(4e7, 6e7)),
            "throughput_tok_s": np.float64(rng.uniform(1e4, 1e5)),
            "context_tokens_per_s": np.float64(rng.uniform(1e4, 1e6)),
            "latency_s": np.float64(rng.uniform(1e-3, 1e-2)), "itl_s": np.float64(rng.uniform(1e-4, 1e-3)),
            "token_efficiency": np.float64(rng.uniform(0.2, 1.0)), "flops": np.float64(rng.uniform(1e6, 1e9))}
    for k, v in vals.items():
        g.create_dataset(k, data=v)
    return vals


def write_run(path, *, seed=1, world_size=1, methods=("full", "sliding_window"), failed_methods=(),
              ablation=(), failed_variants=(), adaptation=(), rank_times=None, tokens_per_step=1024.0,
              step_time=0.01, n_examples=12, n_steps=10, hostname="synthetic-host", dataset_hash="synthetic-split",
              config_extra=None, bins=4):
    """Writes a synthetic run.h5; returns the per-example columns written, keyed by ('eval'|'ablation', name).

    rank_times: None (empty /ranks) or an array [world_size] of mean step times per rank; per-step rows are
    drawn around them, comm_time_s = 20% of the step time.
    """
    rng = np.random.default_rng(seed)
    written = {}
    with h5py.File(path, "w", libver="latest") as f:
        a = f.attrs
        a["format"] = "dsrsq-results"
        a["schema_version"] = np.int64(2)
        a["world_size"] = np.int64(world_size)
        a["dp"] = np.int64(world_size)
        a["sp"] = np.int64(1)
        a["retention_bins"] = np.int64(bins)
        a["hdf5_version"] = "1.10.8"
        a["git_sha"] = "synthetic"
        a["hostname"] = hostname
        a["device"] = "cpu"
        a["backend"] = "cpu"
        a["dataset_hash"] = dataset_hash
        a["seed"] = np.int64(seed)
        # The run's order (from the binary's method table); groups are listed by name.
        a["method_order"] = " ".join(methods)
        a["ablation_order"] = " ".join(ablation)
        a["protocol"] = "query_aware"
        cfg_kv = {"seed": str(seed), "dp": str(world_size), "sp": "1", "dataset": "needle", "kv_budget": "0.5",
                  "methods": " ".join(methods), "run_name": f"synthetic-{seed}"}
        cfg_kv.update(config_extra or {})
        cfg = f.create_group("config")
        for k, v in cfg_kv.items():
            cfg.attrs[k] = v
        text = "".join(f"{k} = {v}\n" for k, v in sorted(cfg_kv.items()))
        _fixed(cfg, "resolved", text, max(1, len(text)))

        st = f.create_group("status")
        _fixed(st, "run_state", "done", 16)
        _fixed(st, "end_time", "2026-01-01T00:00:00Z", 64)
        _status(st.create_group("train"), "done")

        t = f.create_group("train")
        steps = np.arange(1, n_steps + 1)
        _rows(t, "step", steps, np.int64)
        _rows(t, "epoch", np.zeros(n_steps), np.int64)
        _rows(t, "loss_total", 5 - 0.1 * steps, np.float64)
        _rows(t, "loss_task", 4 - 0.1 * steps, np.float64)
        _rows(t, "loss_retrieval", 0.5 + 0.01 * steps, np.float64)
        _rows(t, "loss_compression", np.zeros(n_steps), np.float64)
        _rows(t, "loss_compute", 0.2 * np.ones(n_steps), np.float64)
        _rows(t, "selected_fraction", 0.3 * np.ones(n_steps), np.float64)
        _rows(t, "lr", 1e-3 * np.ones(n_steps), np.float64)
        _rows(t, "grad_norm", np.ones(n_steps), np.float64)
        st_s = step_time * np.ones(n_steps)
        _rows(t, "step_time_s", st_s, np.float64)
        _rows(t, "tokens_per_s", tokens_per_step / st_s, np.float64)
        v = f.create_group("val")
        _rows(v, "step", [n_steps], np.int64)
        _rows(v, "loss", [4.0], np.float64)

        r = f.create_group("ranks")
        if rank_times is None:
            for c in ("step", "rank", "bytes_sent"):
                _rows(r, c, [], np.int64)
            for c in ("step_time_s", "comm_time_s"):
                _rows(r, c, [], np.float64)
        else:
            rs, rr, rt = [], [], []
            for s in steps:
                for q in range(world_size):
                    rs.append(s), rr.append(q), rt.append(rank_times[q] * (1 + 0.01 * ((s + q) % 3)))
            _rows(r, "step", rs, np.int64)
            _rows(r, "rank", rr, np.int64)
            _rows(r, "step_time_s", rt, np.float64)
            _rows(r, "comm_time_s", 0.2 * np.asarray(rt), np.float64)
            _rows(r, "bytes_sent", [1000 * (q + 1) for q in rr], np.int64)

        ev, ef = f.create_group("eval"), f.create_group("efficiency")
        se = st.create_group("eval")
        for m in methods:
            g = ev.create_group(m)
            n = 0 if m in failed_methods else n_examples
            written[("eval", m)] = _examples(g, rng, n)
            written[("eval", m)]["efficiency"] = _efficiency(ef.create_group(m), rng)
            if m in failed_methods:
                _status(se.create_group(m), "failed", f"synthetic failure of {m}: out of memory")
            else:
                _status(se.create_group(m), "done")
        ab = f.create_group("ablation")
        sa = st.create_group("ablation")
        for vname in ablation:
            g = ab.create_group(vname)
            n = 0 if vname in failed_variants else n_examples
            written[("ablation", vname)] = _examples(g, rng, n)
            written[("ablation", vname)]["efficiency"] = _efficiency(g.create_group("efficiency"), rng)
            _status(sa.create_group(vname), "failed" if vname in failed_variants else "done",
                    f"synthetic failure of {vname}" if vname in failed_variants else "")
        ad = f.create_group("adaptation")
        sd = st.create_group("adaptation")
        for m in adaptation:
            g = ad.create_group(m)
            g.create_dataset("age_bin_edges", data=np.linspace(0, 400, bins + 1))
            g.create_dataset("retention_by_age", data=np.linspace(0.9, 0.3, bins))
            g.create_dataset("queries_per_bin", data=np.full(bins, 5, dtype=np.int64))
            for k, val in (("retention_auc", rng.random()), ("temporal_consistency", rng.random()),
                           ("adaptation_speed", rng.random())):
                g.create_dataset(k, data=np.float64(val))
            g.create_dataset("n_queries", data=np.int64(5 * bins))
            _status(sd.create_group(m), "done")
    return written
