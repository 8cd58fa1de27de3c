"""End-to-end: scripts/study_4k.sh, the study of docs/RESULTS.md as one command, on configs/tiny.ini (run by CTest,
see CMakeLists.txt here). A tiny standard checkpoint stands in for the long model; the script trains the control,
DSRSQ, GCA and ATSKV for two seeds, evaluates everything on the same examples and prints the tables
(scripts/study_4k_tables.py). Checked: every run finishes on the same examples, a rerun changes no result and keeps
the first logs, and a second context size reuses the trainings."""
import hashlib
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np

SRC = Path(os.environ.get("DSRSQ_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BIN = Path(os.environ.get("DSRSQ_BIN", SRC / "build" / "dsrsq"))
TINY = SRC / "configs" / "tiny.ini"
# tiny.ini with 2 layers: GCA needs a lower and an upper one (written into each test's tmp_path)
TINY2 = "tiny_2layers.ini"
SEEDS = ["1234", "2"]
N = 4
STUDY_ENV = {"STUDY_SEEDS": " ".join(SEEDS), "STUDY_N": str(N), "STUDY_CONTEXT": "64",
             "STUDY_BUDGETS": "0.5 0.125", "LONG_FT_STEPS": "3", "STUDY_ATSKV_STEPS": "3", "STUDY_JOBS": "2",
             # tests/e2e/test_e2e.py's DSRSQ_SMALL: the debug settings do not fit a 32-wide model
             "STUDY_DSRSQ_KNOBS": "--rckv_d_c 16 --sqa_clusters 4 --sqa_top_clusters 2 --hof_ramp 5",
             "DSRSQ_BIN": str(BIN)}
ENV = dict(os.environ, DSRSQ_DATASETS=str(SRC / "datasets"), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
           OMP_WAIT_POLICY="PASSIVE")
TRAININGS = [f"{m}_s{s}" for s in SEEDS for m in ("control", "dsrsq", "gca", "atskv")] + ["dsrsq_compact"]
EVALS = (["e_std", "e_std_ctx", "e_rag_original", "e_dsrsq_compact"] +
         [f"e_{m}_s{s}" for s in SEEDS for m in ("control", "dsrsq", "gca", "atskv")])


def config(tmp_path):
    p = tmp_path / TINY2
    text = TINY.read_text()
    assert "n_layers = 1\n" in text
    p.write_text(text.replace("n_layers = 1\n", "n_layers = 2\n"))
    return p


def study(tmp_path, ckpt, out, **extra):
    env = {**ENV, **STUDY_ENV, "STUDY_CONFIG": str(config(tmp_path)), **extra}
    return subprocess.run(["bash", str(SRC / "scripts" / "study_4k.sh"), str(ckpt), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def digest(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_study_4k_one_command_rerun_and_second_size(tmp_path):
    std = subprocess.run([str(BIN), "train", "--config", str(config(tmp_path)), "--steps", "4", "--checkpoint_every", "4",
                          "--output_dir", str(tmp_path / "std"), "--run_name", "long", "--no_report"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    ok(std)
    ckpt = tmp_path / "std" / "long" / "ckpt_4.h5"
    out = tmp_path / "study"
    r = ok(study(tmp_path, ckpt, out))
    assert "study_4k: done" in r.stdout
    for name in TRAININGS:
        assert (out / name / "finished").exists(), name
    ids = None
    for name in EVALS:
        assert (out / name / "finished").exists(), name
        with h5py.File(out / name / "run.h5", "r") as f:
            for m in f["eval"]:
                g = f["eval"][m]
                end = g["id_end"][:]
                data = g["id_bytes"][: int(end[-1])]
                start = np.concatenate([[0], end[:-1]]).astype(np.int64)
                these = sorted({bytes(data[a:b]).decode() for a, b in zip(start, end)})
                assert len(these) == N, (name, m)
                ids = ids or these
                assert these == ids, f"{name}/{m} scored other examples"
    tables = (out / "tables.md").read_text()
    assert "protocol query_aware (e_std)" in tables and "protocol context_only (e_std_ctx)" in tables
    assert "rag (original positions)" in tables
    assert "- control: 2 seeds" in tables and "('dsrsq', '0.125'): 2 seeds" in tables, tables[-2000:]
    assert "('gca', '0.125'): 2 seeds" in tables and "| gca seed 2 | 0.125 |" in tables, tables[-2000:]
    # GCA started from the standard checkpoint (--gca_init standard), not from its own random weights
    assert "gca starts from the standard model" in (out / "gca_s2.log").read_text()
    assert "dsrsq, compact positions, seed 1234" in tables

    # A rerun: every run is finished, nothing changes, the first logs stay.
    before = {n: digest(out / n / "run.h5") for n in TRAININGS + EVALS}
    log = (out / "dsrsq_s2.log").read_text()
    r = ok(study(tmp_path, ckpt, out))
    assert {n: digest(out / n / "run.h5") for n in TRAININGS + EVALS} == before
    again = (out / "dsrsq_s2.log").read_text()
    assert again.startswith(log) and "already finished" in again[len(log):]

    # Another context size: evaluations in their own folder, the trainings reused unchanged.
    r = ok(study(tmp_path, ckpt, out, STUDY_CONTEXT="96", STUDY_EVAL_DIR=str(out / "ctx96"),
                 STUDY_PROTOCOLS="query_aware", STUDY_METHODS="full rag"))
    assert {n: digest(out / n / "run.h5") for n in TRAININGS} == {n: before[n] for n in TRAININGS}
    assert not (out / "ctx96" / "e_std_ctx").exists()
    for name in ["e_std", "e_rag_original", "e_control_s2", "e_dsrsq_s1234", "e_gca_s2", "e_atskv_s2"]:
        with h5py.File(out / "ctx96" / name / "run.h5", "r") as f:
            assert list(f["eval"]), name
    assert "96 tokens" in (out / "ctx96" / "tables.md").read_text()

    # The table across sizes (scripts/study_sizes_table.py): one column per size, each method's row in both where
    # it ran in both, and only the asked budget.
    t = subprocess.run(["/usr/bin/python3", str(SRC / "scripts" / "study_sizes_table.py"), "--budget", "0.125",
                        "--plot", str(tmp_path / "sizes.png"), str(out), str(out / "ctx96")],
                       capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stderr
    assert (tmp_path / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = t.stdout.splitlines()
    assert f"| method | budget | 64 tokens (n = {N}) | 96 tokens (n = {N}) |" in lines
    by = {tuple(x.strip() for x in ln.split("|")[1:3]): ln.count("[") for ln in lines if ln.startswith("| ")}
    assert by[("full", "1 (all)")] == 2 and by[("rag", "0.125")] == 2 and by[("dsrsq seed 2", "0.125")] == 2
    assert by[("gca seed 1234", "0.125")] == 2
    assert by[("sliding_window", "0.125")] == 1  # not run at 96 tokens
    assert ("rag", "0.5") not in by
    # The query-agnostic runs: only the training-free methods that have that form, each against its own full cache.
    t = subprocess.run(["/usr/bin/python3", str(SRC / "scripts" / "study_sizes_table.py"), "--protocol", "context_only",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stderr
    by = {tuple(x.strip() for x in ln.split("|")[1:3]) for ln in t.stdout.splitlines() if ln.startswith("| ")}
    assert ("full", "1 (all)") in by and ("sliding_window", "0.5") in by
    assert not any(m.startswith(("rag", "dsrsq", "gca", "control")) for m, _ in by), by
    # KV bytes read per decode step beside the bytes held: GCA holds its whole memory but reads its rings and k chunks.
    assert "| KV MB held | KV MB read/step |" in tables

    # Where answers go wrong (scripts/answer_positions.py): one row per cell of the method, a column per answer
    # position, each share in [0, 1]; EM 1 implies every position right. A method the run lacks is refused by name.
    a = subprocess.run(["/usr/bin/python3", str(SRC / "scripts" / "answer_positions.py"), str(out / "e_std" / "run.h5"),
                        "rag"], capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    rows = [ln.split("|")[1:-1] for ln in a.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| context")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("64", "0.5"), ("64", "0.125")], a.stdout
    for r in rows:
        assert int(r[2]) == N and len(r) >= 6
        shares = [float(x) for x in r[5:] if x.strip() != "-"]
        assert all(0.0 <= x <= 1.0 for x in shares)
        assert float(r[3]) <= min(shares) + 1e-9, r  # an exact match has every position right
        assert 0.0 <= float(r[4]) <= 1.0 - float(r[3]) + 1e-9, r  # reordered excludes the exact matches
    a = subprocess.run(["/usr/bin/python3", str(SRC / "scripts" / "answer_positions.py"), str(out / "e_std" / "run.h5"),
                        "no_such"], capture_output=True, text=True, timeout=120)
    assert a.returncode != 0 and "no_such" in a.stderr and "rag" in a.stderr


def test_study_4k_refuses_a_missing_checkpoint(tmp_path):
    r = study(tmp_path, tmp_path / "none.h5", tmp_path / "study")
    assert r.returncode == 2 and "none.h5" in r.stderr
    assert not (tmp_path / "study").exists()
