#!/usr/bin/env bash
# The debug-size main job: the paper's experiment as a pipeline of runs on the
# same data and examples (what `./run` does with no arguments).
#   1. configs/debug.ini        trains the standard model, evaluates the
#                               training-free methods on it (full cache,
#                               sliding window, RAG, AttentionRAG, Razor, PyramidKV)
#   2. configs/gca_debug.ini    trains GCA (its own model) on the same data and
#                               steps, evaluates it
#   3. configs/dsrsq_debug.ini  fine-tunes DSRSQ from run 1's checkpoint,
#                               evaluates it and its ablation
#   4. the report over the three run.h5 files: Tables 1, 2 and 4 printed,
#      everything else in results/main_report/
# Every run uses the same KV budget (fraction of the full cache) and the same
# test examples (same seed, data and context sizes). A finished run is skipped
# when the job is rerun; a killed one resumes from its last checkpoint.
# Usage: scripts/main_job.sh [BUILD_DIR]   (./run calls it after building)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/build}/dsrsq"
cd "$ROOT"
[ -x "$BIN" ] || { echo "main_job: $BIN not found (build first: ./run or ./test)" >&2; exit 2; }

t0=$SECONDS
stage() {  # name, config: one run, timed
  local s=$SECONDS
  echo "== main job: $1 ($2)"
  "$BIN" --config "$2" --no_report
  echo "== main job: $1 took $((SECONDS - s)) s"
}
stage "standard model + training-free baselines" configs/debug.ini
stage "GCA" configs/gca_debug.ini
stage "DSRSQ from the standard checkpoint + ablation" configs/dsrsq_debug.ini

echo "== main job: report (Tables 1, 2 and 4; figures in results/main_report)"
/usr/bin/python3 analysis/report.py results/standard_needle/run.h5 results/gca_needle/run.h5 \
  results/dsrsq_needle/run.h5 -o results/main_report --print
echo "== main job: done in $((SECONDS - t0)) s"
