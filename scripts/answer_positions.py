"""Where answers go wrong: per evaluation cell (context size x KV budget) of one method in a run.h5, the share of
examples whose prediction has the gold answer's character at each position (the 4-digit needle: digit 1..4), and
the share whose prediction has the gold's characters in another order ("reordered": the model found the needle but
did not copy it in sequence). A model that found the needle gets every position or none; one that copies from a
neighbouring digit gets the middle positions and guesses the ends (docs/RESULTS.md, "Reproducing the long model").
Golds of unequal length: positions up to the longest, each over the examples whose gold is that long.
Usage: /usr/bin/python3 scripts/answer_positions.py RUN_H5 [METHOD]   (METHOD: default full)"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "analysis"))
from dsrsq_report.reader import ReportError, read_run

if len(sys.argv) not in (2, 3):
    sys.exit("usage: answer_positions.py RUN_H5 [METHOD]")
path, method = sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "full"
try:
    run = read_run(path)
except ReportError as e:
    sys.exit(f"answer_positions.py: {e}")
if method not in run.eval:
    sys.exit(f"answer_positions.py: {path} has no evaluation of method '{method}' (it has: {', '.join(sorted(run.eval))})")
ex = run.eval[method]
cell = np.asarray(ex.cols["cell"])
pred = [p.strip() for p in ex.strings["prediction"]]
gold = [g.split("\x1f")[0].strip() for g in ex.strings["gold"]]
width = max((len(g) for g in gold), default=0)
print(f"# {path}: method {method}; per position of the gold answer, the share of examples predicting its character")
print("| context | budget | n | EM | reordered | " + " | ".join(f"pos {i + 1}" for i in range(width)) + " |")
print("|---|---|---|---|---|" + "---|" * width)
for c in run.cells:
    idx = np.nonzero(cell == c.index)[0]
    if len(idx) == 0:
        continue
    em = float(np.mean([pred[i] == gold[i] for i in idx]))
    reordered = float(np.mean([pred[i] != gold[i] and sorted(pred[i]) == sorted(gold[i]) for i in idx]))
    shares = []
    for j in range(width):
        have = [i for i in idx if len(gold[i]) > j]
        shares.append(f"{np.mean([len(pred[i]) > j and pred[i][j] == gold[i][j] for i in have]):.3f}" if have else "-")
    print(f"| {c.context_size} | {c.kv_budget} | {len(idx)} | {em:.3f} | {reordered:.3f} | " + " | ".join(shares) + " |")
