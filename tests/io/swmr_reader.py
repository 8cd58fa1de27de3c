#!/usr/bin/python3
"""h5py side of test_swmr: follow a live dsrsq results file, or check a file
whose writer was killed.

  swmr_reader.py live  PATH MIN_ROWS TIMEOUT_S   -> waits until it has seen the
      /train row count grow at least 3 times and reach MIN_ROWS, checking every
      visible row; prints "rows N" and exits 0 (1 on timeout or a bad row).
  swmr_reader.py final PATH MIN_ROWS [STATE]     -> opens the file once, checks
      every row, that at least MIN_ROWS are there and that /status/train/state
      is STATE (default running); prints "rows N".

The writer (test_swmr.cpp) writes train row i with step=i, loss_total=0.5*i,
and every 4th step one /eval/full example with id "q<i>", prediction
"pred <i> café ✓" and golds ["a<i>", "b<i>"].
"""
import sys
import time

import h5py
import numpy as np

SEP = b"\x1f"


def strings(g, name, n):
    """Row strings of a byte-stream column: <name>_bytes + <name>_end."""
    ends = g[name + "_end"][:n]
    data = g[name + "_bytes"][: int(ends[-1])] if n else np.zeros(0, np.uint8)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [bytes(data[s:e]).decode("utf-8") for s, e in zip(starts, ends)]


def rows(g, cols):
    return min(g[c].shape[0] for c in cols)


def check(f, min_rows, states=(b"running",)):
    root_format = f.attrs["format"]
    root_format = root_format.decode() if isinstance(root_format, bytes) else root_format
    assert root_format == "dsrsq-results", root_format
    assert int(f.attrs["schema_version"]) == 3
    t = f["train"]
    for name in ("step", "loss_total", "lr"):
        t[name].refresh()
    n = rows(t, ("step", "loss_total", "lr"))
    step = t["step"][:n]
    loss = t["loss_total"][:n]
    assert np.array_equal(step, np.arange(n)), "steps are not 0..n-1"
    assert np.array_equal(loss, 0.5 * np.arange(n)), "loss_total is not 0.5*step"
    e = f["eval/full"]
    for name in ("id_end", "id_bytes", "prediction_end", "prediction_bytes", "gold_end", "gold_bytes", "f1"):
        e[name].refresh()
    m = rows(e, ("id_end", "prediction_end", "gold_end", "f1"))
    # Rows whose bytes are not visible yet are not complete rows.
    while m and (e["prediction_end"][m - 1] > e["prediction_bytes"].shape[0]
                 or e["gold_end"][m - 1] > e["gold_bytes"].shape[0]
                 or e["id_end"][m - 1] > e["id_bytes"].shape[0]):
        m -= 1
    ids = strings(e, "id", m)
    preds = strings(e, "prediction", m)
    golds = [s.split(SEP.decode()) for s in strings(e, "gold", m)]
    for k in range(m):
        i = 4 * k
        assert ids[k] == "q%d" % i, ids[k]
        assert preds[k] == "pred %d café ✓" % i, preds[k]
        assert golds[k] == ["a%d" % i, "b%d" % i], golds[k]
        assert e["f1"][k] == i / 1000.0
    st = f["status/train/state"]
    st.refresh()
    assert st[()].rstrip(b"\0") in states, st[()]
    assert n >= min_rows or min_rows < 0, "only %d rows, expected >= %d" % (n, min_rows)
    return n, m


def open_swmr(path, deadline):
    while True:
        try:
            return h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            # The writer may not have switched to SWMR yet.
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def live(path, min_rows, timeout):
    deadline = time.time() + timeout
    f = open_swmr(path, deadline)
    seen = []
    while time.time() < deadline:
        n, m = check(f, -1)
        if not seen or n > seen[-1]:
            seen.append(n)
        if len(seen) >= 4 and n >= min_rows:
            print("rows %d examples %d growth %s" % (n, m, seen[:6]))
            return 0
        time.sleep(0.03)
    print("timeout: saw row counts %s" % seen)
    return 1


def final(path, min_rows, state):
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        n, m = check(f, min_rows, (state.encode(),))
    print("rows %d examples %d" % (n, m))
    return 0


if __name__ == "__main__":
    mode, path, min_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "live":
        sys.exit(live(path, min_rows, float(sys.argv[4])))
    sys.exit(final(path, min_rows, sys.argv[4] if len(sys.argv) > 4 else "running"))
