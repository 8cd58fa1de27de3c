"""End-to-end: the simulated device (--device sim, src/backend/sim), and the same check on a GPU
(DSRSQ_DEVICE_UNDER_TEST=cuda, run by scripts/gpu_check.sh; skipped when no GPU answers). Every device-ready method trains (when it is
trainable) and evaluates on sim with the same results as on the CPU, and a method that is not device-ready is
refused by name; mpirun --dp 2, --sp 2 and --dp 2 --sp 2 on the device equal the same on --device cpu (the
device communicator: staged over MPI on sim, NCCL on CUDA; under --sp it carries ring attention's K/V exchanges).
The device-ready list comes from the binary itself (its refusal message), so a method marked device_ready in its
MethodInfo is covered here without editing this file.

Why bit-identical: sim runs the CPU backend's own kernels, in the same order, on the same values; it only moves
host inputs (tokens, positions) into its memory and reads small results back (per-row losses, one logits row per
decode step) with copies. So every recorded number that is not a wall time must match to the bit.

On CUDA the kernels sum in other orders, so the check has tolerances (close_results): step 1's loss (a forward
before any update) within 1e-4 relative, its gradient norm within 1e-3, later steps within 2e-2 (AdamW's first
updates are about lr * sign(g), so a gradient entry near 0 whose sign rounding flips moves by 2 lr: a guard
against gross errors, not a rounding bound), greedy predictions equal on most examples, and the byte accounting
(budgets, KV bytes, FLOPs) equal wherever the predictions are.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from test_e2e import _mpi_env, ckpt_arrays  # the dp tests' launcher environment and checkpoint reader

SRC = Path(os.environ.get("DSRSQ_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BIN = Path(os.environ.get("DSRSQ_BIN", SRC / "build" / "dsrsq"))
TINY = SRC / "configs" / "tiny.ini"
DEVICE = os.environ.get("DSRSQ_DEVICE_UNDER_TEST", "sim")
assert DEVICE in ("sim", "cuda"), DEVICE
ENV = dict(os.environ, DSRSQ_DATASETS=str(SRC / "datasets"), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
           OMP_WAIT_POLICY="PASSIVE")
# Short: a few steps (two validations) and a short evaluation.
SHORT = ["--steps", "6", "--val_every", "3", "--log_every", "3", "--checkpoint_every", "6", "--num_test", "4",
         "--max_new_tokens", "4", "--no_report"]


def argv_of(tmp_path, *extra, name="r"):
    return [str(BIN), "--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--run_name", name] + \
        [str(x) for x in extra]


def run(tmp_path, *extra, name="r"):
    return subprocess.run(argv_of(tmp_path, *extra, name=name), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=240)


def listed(text, after):
    """The comma-separated names after `after` up to the closing parenthesis."""
    m = re.search(re.escape(after) + r"([^)]*)\)", text)
    assert m, text
    return [x.strip() for x in m.group(1).split(",") if x.strip()]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """(every method of the table, the device-ready ones, the trainable ones), read from the binary's messages."""
    tmp = tmp_path_factory.mktemp("lists")
    r = run(tmp, "--methods", "no_such_method")
    assert r.returncode == 2, r.stderr
    table = listed(r.stderr, "the method table holds: ")
    r = run(tmp, "--model", "full")
    assert r.returncode == 2, r.stderr
    trainable = [x.rstrip(")") for x in re.search(r"trainable methods: (.*)$", r.stderr.strip(), re.M).group(1).split(", ")]
    not_ready = None
    for m in table:
        r = run(tmp, "--device", "sim", "--methods", m, "--dry_run")
        if r.returncode == 2 and "still reads device tensors on the host" in r.stderr:
            not_ready = m
            ready = listed(r.stderr, "device-ready methods: ")
            break
    if not_ready is None:  # every method is device-ready
        ready = list(table)
    return table, ready, trainable, not_ready


def strings(g, name):
    end = g[name + "_end"][:]
    data = g[name + "_bytes"][: int(end[-1])] if end.size else np.zeros(0, np.uint8)
    start = np.concatenate([[0], end[:-1]]).astype(np.int64)
    return [bytes(data[s:e]).decode() for s, e in zip(start, end)]


# Every recorded number that is not a wall time (or derived from one).
TRAIN_COLS = ["step", "loss_total", "loss_task", "loss_retrieval", "loss_compression", "loss_compute",
              "selected_fraction", "grad_norm", "lr"]
EVAL_COLS = ["f1", "em", "rouge_l", "bleu", "context_tokens", "attended_tokens", "kv_budget_achieved_bytes",
             "kv_budget_requested_bytes", "kv_peak_prefill_bytes", "kv_read_per_step_bytes", "kv_resident_bytes",
             "kv_total_bytes"]
EFF_COLS = ["peak_mem_bytes", "flops", "token_efficiency", "tokens_run", "context_tokens_served", "decode_examples"]


def same_results(a, b, methods, train=True):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for c in TRAIN_COLS if train else []:
            assert fa["train/" + c][()].tobytes() == fb["train/" + c][()].tobytes(), "train/" + c
        if train:
            assert fa["val/loss"][()].tobytes() == fb["val/loss"][()].tobytes()
        for m in methods:
            ea, eb = fa["eval/" + m], fb["eval/" + m]
            assert ea["f1"].shape[0] > 0, m
            for c in EVAL_COLS:
                assert ea[c][()].tobytes() == eb[c][()].tobytes(), f"{m}: eval column {c}"
            for c in ("prediction", "id"):
                assert strings(ea, c) == strings(eb, c), f"{m}: {c}"
            # meta: everything but wall times (shared_prefill_s under reuse).
            untimed = lambda g: [{k: v for k, v in json.loads(x).items() if not k.endswith("_s")} for x in strings(g, "meta")]
            assert untimed(ea) == untimed(eb), f"{m}: meta"
            for c in EFF_COLS:
                assert fa[f"efficiency/{m}/{c}"][()] == fb[f"efficiency/{m}/{c}"][()], f"{m}: efficiency {c}"


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(a)), abs(float(b)), 1e-30)


def close_results(a, b, methods, train=True):
    """CUDA against the CPU: tolerances (module docstring), not bits."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        if train:
            la, lb = fa["train/loss_total"][()], fb["train/loss_total"][()]
            ga, gb = fa["train/grad_norm"][()], fb["train/grad_norm"][()]
            assert la.shape == lb.shape and la.size > 0
            assert fa["train/step"][0] == 1, "the first row must be step 1 (--log_every 1)"
            assert rel(la[0], lb[0]) <= 1e-4, ("step 1 loss", la[0], lb[0])
            assert rel(ga[0], gb[0]) <= 1e-3, ("step 1 grad norm", ga[0], gb[0])
            for i in range(1, la.size):
                assert rel(la[i], lb[i]) <= 2e-2, ("loss", i, la[i], lb[i])
        for m in methods:
            ea, eb = fa["eval/" + m], fb["eval/" + m]
            pa, pb = strings(ea, "prediction"), strings(eb, "prediction")
            assert strings(ea, "id") == strings(eb, "id"), m
            same = [x == y for x, y in zip(pa, pb)]
            assert sum(same) >= 0.75 * len(same), (m, pa, pb)
            for c in ("kv_budget_requested_bytes", "kv_budget_achieved_bytes"):
                assert ea[c][()].tobytes() == eb[c][()].tobytes(), f"{m}: eval column {c}"
            for c in ("kv_peak_prefill_bytes", "kv_resident_bytes", "kv_total_bytes", "context_tokens",
                      "attended_tokens", "kv_read_per_step_bytes"):
                x, y = ea[c][()], eb[c][()]
                for i, ok in enumerate(same):
                    if ok:
                        assert x[i] == y[i], f"{m}: eval column {c}, example {i}"


@pytest.fixture(scope="module")
def device_present(tmp_path_factory):
    """Skips the CUDA check when no GPU answers (or the build has no CUDA backend)."""
    if DEVICE == "sim":
        return
    tmp = tmp_path_factory.mktemp("probe")
    r = run(tmp, "--device", DEVICE, "--methods", "full", *SHORT)
    if r.returncode == 2 and ("no GPU answers" in r.stderr or "no CUDA backend" in r.stderr):
        pytest.skip(f"--device {DEVICE}: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_device_ready_methods_match_cpu(tmp_path, tables, device_present):
    table, ready, trainable, _ = tables
    assert "standard" in ready and "full" in ready, ready
    for m in ready:
        assert m in table, m
    # The training-free ready methods on a standard model trained on each device; then each trainable ready
    # method (other than standard) trains and evaluates itself.
    free = [m for m in ready if m not in trainable]
    # (Two layers for the trained methods: GCA needs a lower and an upper one.)
    runs = [("standard", free, [])] + [(m, [m], ["--n_layers", "2"]) for m in ready if m in trainable and m != "standard"]
    for model, methods, extra in runs:
        out = {}
        for dev in ("cpu", DEVICE):
            r = run(tmp_path, "--device", dev, "--model", model, "--methods", *methods, *TRAIN_SHORT, *extra,
                    name=f"{model}_{dev}")
            assert r.returncode == 0, f"--device {dev} --model {model}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
            out[dev] = tmp_path / "out" / f"{model}_{dev}" / "run.h5"
        compare(out["cpu"], out[DEVICE], methods)
        if model != "standard":
            continue
        # The reuse protocol (snapshot and restore of every policy's state) on the CPU run's weights, for the
        # ready methods that have a query-agnostic form without a selector.
        ckpt = tmp_path / "out" / "standard_cpu" / "ckpt_6.h5"
        reuse = [m for m in methods
                 if run(tmp_path, "--device", "sim", "--protocol", "reuse", "--methods", m, "--dry_run").returncode == 0]
        assert "full" in reuse and "sliding_window" in reuse, reuse
        out = {}
        for dev in ("cpu", DEVICE):
            name = f"reuse_{dev}"
            r = run(tmp_path, "--command", "eval", "--init_from", ckpt, "--device", dev, "--protocol", "reuse",
                    "--methods", *reuse, *SHORT, name=name)
            assert r.returncode == 0, f"reuse --device {dev}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
            out[dev] = tmp_path / "out" / name / "run.h5"
        compare(out["cpu"], out[DEVICE], reuse, train=False)


compare = same_results if DEVICE == "sim" else close_results
# On CUDA every step is logged, so step 1 (before any update) is compared tightly.
TRAIN_SHORT = SHORT if DEVICE == "sim" else [("1" if k and SHORT[k - 1] == "--log_every" else x) for k, x in enumerate(SHORT)]


def test_not_ready_method_is_refused_by_name(tmp_path, tables):
    _, ready, _, not_ready = tables
    if not_ready is None:
        pytest.skip("every method of the table is device-ready")
    for dev in ("sim", "cuda"):
        r = run(tmp_path, "--device", dev, "--methods", "full", not_ready)
        assert r.returncode == 2, r.stderr
        assert f"method '{not_ready}' still reads device tensors on the host" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()  # refused before anything was written


def parallel_on_device_matches_cpu(tmp_path, layout, what):
    """mpirun -np (dp sp) with `layout` (--dp/--sp) on the device against the same on --device cpu: the train and
    validation losses, the evaluation (predictions included) and the final checkpoint's parameters and AdamW moments
    (sim: bit for bit; CUDA: close_results' tolerances). Returns the two run directories (cpu, device)."""
    mpiexec = os.environ.get("DSRSQ_MPIEXEC", "mpirun")
    np_ = layout.get("dp", 1) * layout.get("sp", 1)
    flags = [x for k, n in layout.items() for x in (f"--{k}", n)]
    out = {}
    for dev in ("cpu", DEVICE):
        name = f"{what}_{dev}"
        argv = [mpiexec, "-np", str(np_), "--oversubscribe"] + argv_of(tmp_path, "--device", dev, *flags, "--methods",
                                                                       "full", *TRAIN_SHORT, name=name)
        r = subprocess.run(argv, cwd=tmp_path, env=_mpi_env(), capture_output=True, text=True, timeout=240)
        # (Not "--device cuda" in the reason: scripts/gpu_check.sh reads that as "no GPU answered".)
        if dev == "cuda" and r.returncode != 0 and "would share one GPU" in r.stderr:
            pytest.skip(f"the {what} GPU run needs {np_} GPUs, one per rank: " + r.stderr.strip()[-500:])
        assert r.returncode == 0, f"--device {dev} {' '.join(map(str, flags))}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
        out[dev] = tmp_path / "out" / name
        with h5py.File(out[dev] / "run.h5", "r") as f:
            for k, n in layout.items():
                assert int(f.attrs[k]) == n, k
    compare(out["cpu"] / "run.h5", out[DEVICE] / "run.h5", ["full"])
    (a, ma), (b, mb) = ckpt_arrays(out["cpu"] / "ckpt_6.h5"), ckpt_arrays(out[DEVICE] / "ckpt_6.h5")
    assert ma == mb
    for k in a:
        if DEVICE == "sim":
            assert a[k].tobytes() == b[k].tobytes(), k
        else:
            assert np.linalg.norm(a[k] - b[k]) <= 2e-2 * np.linalg.norm(a[k]), k
    return out["cpu"], out[DEVICE]


def test_sequence_parallel_on_device_matches_cpu(tmp_path, device_present):
    """mpirun -np 2 --sp 2 on the device equals --device cpu --sp 2 (parallel_on_device_matches_cpu). Ring attention's
    K/V blocks, positions and dK/dV accumulators travel on the backend's buffers through the device communicator
    of the sp ring (StagedCommunicator on sim, NCCL on CUDA) and merge with the backend's op; on sim a host read of
    any of them would fault, and the CPU run's ring does the same ops in the same order, hence bit for bit."""
    parallel_on_device_matches_cpu(tmp_path, {"sp": 2}, "sp2")


def test_data_by_sequence_parallel_on_device_matches_cpu(tmp_path, device_present):
    """mpirun -np 4 --dp 2 --sp 2 on the device equals the same on --device cpu: the gradients on the world's
    device communicator and ring attention on each replica's sp ring's, side by side."""
    parallel_on_device_matches_cpu(tmp_path, {"dp": 2, "sp": 2}, "dp2sp2")


def test_data_parallel_on_device_matches_cpu(tmp_path, device_present):
    """mpirun -np 2 --dp 2 on the device equals --device cpu --dp 2 (parallel_on_device_matches_cpu). On sim bit for
    bit: the gradient buckets, the parameter broadcasts and every other device buffer go through StagedCommunicator,
    whose host all-reduce sums the same values in the same order as the CPU run's (and a host read of a sim tensor
    would fault, so this also shows that nothing in the dp path reads device memory on the host). On CUDA (two
    GPUs, NCCL) within close_results' tolerances."""
    _, dev_out = parallel_on_device_matches_cpu(tmp_path, {"dp": 2}, "dp2")
    if DEVICE != "sim":
        return
    mpiexec = os.environ.get("DSRSQ_MPIEXEC", "mpirun")
    b, mb = ckpt_arrays(dev_out / "ckpt_6.h5")
    # Stopped at step 3 and resumed: rank 0 reads the checkpoint into its device buffers and broadcasts them
    # (and the AdamW moments) to rank 1 through the device communicator; the end equals the uninterrupted run.
    base = argv_of(tmp_path, "--device", "sim", "--dp", 2, "--methods", "full", *TRAIN_SHORT, name="dp2_resumed")
    mpi = [mpiexec, "-np", "2", "--oversubscribe"]
    r = subprocess.run(mpi + base + ["--stop_after", "3"], cwd=tmp_path, env=_mpi_env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(mpi + base, cwd=tmp_path, env=_mpi_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and re.search(r"resuming .* from step 3\b", r.stdout), r.stdout[-3000:] + r.stderr[-3000:]
    c, mc = ckpt_arrays(tmp_path / "out" / "dp2_resumed" / "ckpt_6.h5")
    assert mc == mb
    for k in b:
        assert b[k].tobytes() == c[k].tobytes(), f"{k} differs after a resume at dp 2 on sim"
