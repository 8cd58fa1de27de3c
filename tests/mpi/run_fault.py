"""Runs a 2-rank mpi_fault job and checks that it ends non-zero within 60 s.

usage: run_fault.py --mode stall|throw|exit --exe PATH -- MPIEXEC ARGS...
The launcher command (mpirun -n 2 --oversubscribe ...) comes after "--"; the
executable and mode are appended. Exit 0 when the job failed fast, as it must.
"""
import argparse
import subprocess
import sys
import time

LIMIT_S = 60.0
EXPECT = {  # text the job's output must contain, per mode
    # rank 0 names the rank that did not arrive (rank 1, SIGSTOP-like: asleep)
    "stall": ["communication timeout", "world rank 0", "all_reduce_sum(f32 x 1024)",
              "the one that did not is the other member, rank 1 (world rank 1)"],
    "throw": ["rank 1", "injected fault"],
    "exit": [],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=sorted(EXPECT))
    ap.add_argument("--exe", required=True)
    ap.add_argument("--timeout", default="3", help="rank 0's collective timeout in the stall mode (s)")
    argv = sys.argv[1:]
    if "--" not in argv:
        ap.error("the launcher command must follow --")
    cut = argv.index("--")
    a = ap.parse_args(argv[:cut])
    launcher = argv[cut + 1:]
    cmd = launcher + [a.exe, a.mode, a.timeout]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=2 * LIMIT_S)
        rc, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        rc, out = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.monotonic() - t0
    problems = []
    if rc is None:
        problems.append(f"job still running after {2 * LIMIT_S:.0f} s (killed)")
    elif rc == 0:
        problems.append("job exited 0 although a rank failed")
    if wall > LIMIT_S:
        problems.append(f"job took {wall:.1f} s, limit {LIMIT_S:.0f} s")
    for text in EXPECT[a.mode]:
        if text not in out:
            problems.append(f"output lacks {text!r}")
    print(f"mode={a.mode} rc={rc} wall={wall:.2f}s")
    if problems:
        print("FAILED: " + "; ".join(problems))
        print("---- job output ----")
        print(out)
        return 1
    print("ok: the job ended non-zero within the limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
