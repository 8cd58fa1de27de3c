"""report --compare and report --check."""

import re

import h5py
import numpy as np

from conftest import run_report
from h5direct import scalar
import synthetic_fixtures as syn


def _ratios(stdout):
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"\| (\S[^|]*?) \| [^|]* \| [^|]* \| ([^|]+) \|$", line)
        if m and m.group(1) != "figure":
            out[m.group(1)] = m.group(2).strip()
    return out


def test_compare_ratios(real_runs):
    a, b = real_runs["tiny"], real_runs["b25"]  # same machine, same task split, other KV budget
    res = run_report("--compare", a, b)
    assert res.returncode == 0, res.stderr
    r = _ratios(res.stdout)
    assert len(r) > 30  # every figure of Tables 1, 2, 2b and training
    for key, ds in (("table2/sliding_window/throughput_tok_s", "efficiency/sliding_window/throughput_tok_s"),
                    ("table2/full/peak_mem_mb", "efficiency/full/peak_mem_bytes")):
        want = float(scalar(b, ds)) / float(scalar(a, ds))
        assert abs(float(r[key]) - want) < 5e-5 * max(1, want), (key, r[key], want)
    want = float(np.mean(h5py.File(b, "r")["eval/sliding_window/kv_budget_requested_bytes"][()])) / float(
        np.mean(h5py.File(a, "r")["eval/sliding_window/kv_budget_requested_bytes"][()]))
    assert abs(float(r["table2b/sliding_window/kv_budget_requested_mb"]) - want) < 1e-4
    assert abs(want - 0.5) < 0.1  # budget 0.25 against 0.5
    same = _ratios(run_report("--compare", a, a).stdout)
    assert all(v in ("1.0000", "n/a") for v in same.values()), same


def test_compare_refuses_other_hardware(real_runs, copy_run):
    a = real_runs["tiny"]
    b = copy_run(a, "otherhost.h5")
    with h5py.File(b, "r+") as f:
        f.attrs["hostname"] = "another-machine"
    res = run_report("--compare", a, b)
    assert res.returncode == 3 and "hostname" in res.stderr and "--force" in res.stderr
    assert "Traceback" not in res.stderr
    forced = run_report("--compare", a, b, "--force")
    assert forced.returncode == 0 and "warning" in forced.stderr and "| B/A |" in forced.stdout


def test_compare_refuses_other_task_split(real_runs):
    res = run_report("--compare", real_runs["tiny"], real_runs["seed2"])  # another seed: another test split
    assert res.returncode == 3 and "dataset_hash" in res.stderr and "task split" in res.stderr


def test_compare_refuses_other_device(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    syn.write_run(str(a))
    syn.write_run(str(b))
    with h5py.File(b, "r+") as f:
        f.attrs["device"] = "cuda"
    res = run_report("--compare", a, b)
    assert res.returncode == 3 and "device" in res.stderr


def test_check_ok_and_missing(real_runs, copy_run):
    ok = run_report("--check", real_runs["tiny"])
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout
    assert "/ablation: no variants" in ok.stdout  # says what is absent
    assert run_report("--check", real_runs["fs"]).returncode == 0
    bad = copy_run(real_runs["tiny"], "bad.h5")
    with h5py.File(bad, "r+") as f:
        del f["efficiency/full"]
        del f["train/grad_norm"]
        del f["status/eval/sliding_window/message"]
        f.attrs["format"] = "something-else"
    res = run_report("--check", bad)
    assert res.returncode == 1
    for needle in ("/efficiency/full: missing group", "/train/grad_norm: missing dataset",
                   "/status/eval/sliding_window/message: missing dataset", "'format'", "INVALID"):
        assert needle in res.stdout, (needle, res.stdout)


def test_check_uneven_columns_and_bad_state(tmp_path):
    p = tmp_path / "synthetic.h5"
    syn.write_run(str(p), ablation=("full_model",), adaptation=("full",))
    assert run_report("--check", p).returncode == 0
    with h5py.File(p, "r+") as f:
        f["eval/full/f1"].resize((5,))
        f["status/eval/full/state"][...] = np.array(b"weird", dtype="S16")
        del f["adaptation/full/retention_by_age"]
        f["adaptation/full/retention_by_age"] = np.zeros(7)
    res = run_report("--check", p)
    assert res.returncode == 1
    assert "/eval/full: column lengths differ" in res.stdout
    assert "'weird'" in res.stdout
    assert "/adaptation/full/retention_by_age: shape (7,)" in res.stdout


def test_check_not_hdf5(tmp_path):
    p = tmp_path / "x.h5"
    p.write_bytes(b"\0" * 100)
    res = run_report("--check", p)
    assert res.returncode == 1 and "INVALID" in res.stdout and "Traceback" not in res.stderr
