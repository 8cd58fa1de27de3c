#!/usr/bin/python3
"""Did stage 1 of the long model learn retrieval? Reads a run.h5's validation losses (answer tokens of the needle
task) and exits 1 with a message when the last one is above a threshold, so that scripts/long_study.sh and
jobs/long.sbatch stop before stage 2 instead of training 45 minutes from a model that cannot retrieve.

Why a check: learning retrieval is a sudden transition whose step depends on the run's floating-point numerics
(the thread count, the BLAS kernel), not only on the seed. Measured on 2 cores (docs/RESULTS.md, "Reproducing
the long model"): 1,500 steps on 1 thread reached 0.762; the same config on 2 threads ended at 1.602 (chance
1.82); 3,000 steps on 2 threads reached 0.76 by step 2,250. Runs that learned it sat at <= 0.84 at their end,
runs that did not at >= 1.60, so the default threshold 1.2 lies between.
Usage: scripts/check_stage1.py RUN_H5 [THRESHOLD]"""
import sys

import h5py


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit("usage: check_stage1.py RUN_H5 [THRESHOLD]")
    path = argv[1]
    try:
        threshold = float(argv[2]) if len(argv) == 3 else 1.2
    except ValueError:
        sys.exit(f"check_stage1: THRESHOLD must be a number, got '{argv[2]}'")
    try:
        with h5py.File(path, "r") as f:
            loss = f["val/loss"][()]
            step = f["val/step"][()]
    except (OSError, KeyError) as e:
        sys.exit(f"check_stage1: cannot read the validation losses of '{path}': {e}")
    if len(loss) == 0:
        sys.exit(f"check_stage1: '{path}' holds no validation loss")
    last, at = float(loss[-1]), int(step[-1])
    if not last <= threshold:
        sys.exit(f"check_stage1: stage 1 did not learn retrieval: validation answer loss {last:.3f} at step {at} "
                 f"(> {threshold}; chance 1.82, a run that learned it is near 0.8) in '{path}'. Stage 2 would start "
                 "from a model that cannot retrieve. Rerun stage 1 with more --steps (docs/RESULTS.md, "
                 "'Reproducing the long model').")
    print(f"check_stage1: retrieval learned: validation answer loss {last:.3f} at step {at} (<= {threshold})")


if __name__ == "__main__":
    main(sys.argv)
