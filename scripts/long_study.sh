#!/usr/bin/env bash
# The long-context study (issue 13) as one command on one machine:
#   1. configs/long_stage1.ini  the standard model learns retrieval at 64-256 tokens
#   2. configs/long.ini         continues at 64-1024 tokens (RoPE base 500000,
#                               log-length scaling beyond 1024)
#   3. configs/long_stage3.ini  continues at 1K-4K tokens: the long model; each
#                               stage evaluates the full cache at its sizes
#   4. the long model evaluated without the log-length scaling (the recipe's
#      measure of that choice)
#   5. DSRSQ fine-tuned from the long model (configs/dsrsq_debug.ini's DSRSQ
#      settings, long.ini's data), LONG_DSRSQ_STEPS steps
#   6. scripts/study_debug.sh with STUDY_CONFIG=configs/long.ini: every method but GCA
#      of the registry (ATSKV's predictor trained first) at STUDY_SIZES and
#      STUDY_BUDGETS, under STUDY_PROTOCOLS, and the report (Tables 5 and 6,
#      Pareto, F1 by length, needle heat-maps)
# A finished run is skipped when the script is rerun; a killed one resumes.
#   scripts/long_study.sh [OUT_DIR]      (default results/long_study)
# Env: LONG_DSRSQ_STEPS (default 400) and those of scripts/study_debug.sh
# (this script's defaults: STUDY_SIZES "1024 2048 4096", STUDY_BUDGETS
# "0.5 0.25 0.125 0.0625 0.03125", STUDY_PER_SIZE 200).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
out="${1:-results/long_study}"
bin="${DSRSQ_BIN:-build/dsrsq}"
[ -x "$bin" ] || { echo "long_study: no program at $bin (./run or cmake --build build --target dsrsq)" >&2; exit 2; }
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
t0=$SECONDS
step() { echo "== long study [$(date -u +%H:%M:%S)]: $1"; }

step "stage 1 (configs/long_stage1.ini)"
"$bin" --config configs/long_stage1.ini --output_dir "$out" --no_report
steps1=$(sed -n 's/^steps *= *//p' configs/long_stage1.ini)
stage1="$out/standard_long_stage1/ckpt_${steps1}.h5"
# Stop before stage 2 when stage 1 did not learn retrieval (a transition whose step depends on the numerics).
/usr/bin/python3 scripts/check_stage1.py "$out/standard_long_stage1/run.h5"
step "stage 2 (configs/long.ini)"
"$bin" --config configs/long.ini --init_from "$stage1" --output_dir "$out" --no_report
steps2=$(sed -n 's/^steps *= *//p' configs/long.ini)
stage2="$out/standard_long/ckpt_${steps2}.h5"
[ -f "$stage2" ] || { echo "long_study: stage 2 left no $stage2" >&2; exit 1; }
step "stage 3 (configs/long_stage3.ini)"
"$bin" --config configs/long_stage3.ini --init_from "$stage2" --output_dir "$out" --no_report
steps3=$(sed -n 's/^steps *= *//p' configs/long_stage3.ini)
long_ckpt="$out/standard_long_stage3/ckpt_${steps3}.h5"
[ -f "$long_ckpt" ] || { echo "long_study: stage 3 left no $long_ckpt" >&2; exit 1; }

step "the long model without log-length scaling"
"$bin" eval --config configs/long_stage3.ini --init_from "$long_ckpt" --attn_log_scale 0 --output_dir "$out" \
  --run_name standard_long_nolog --no_report

dsteps="${LONG_DSRSQ_STEPS:-400}"
step "DSRSQ from the long model ($dsteps steps)"
"$bin" train --config configs/long.ini --model dsrsq --init_from "$long_ckpt" --steps "$dsteps" \
  --checkpoint_every "$dsteps" --learning_rate 1e-3 --dsr_d_r 32 --dsr_base_budget 0.25 --dsr_alpha 0.5 \
  --dsr_span 8 --dsr_lambda 0.1 --sqa_clusters 8 --sqa_top_clusters 4 --rckv_d_c 32 --rckv_buffer 0 \
  --rckv_window 16 --hof_weights 1.0 0.5 0.3 0.2 --hof_ramp 300 --output_dir "$out" --run_name dsrsq_long_train \
  --no_report

step "the study"
STUDY_CONFIG=configs/long.ini STUDY_SIZES="${STUDY_SIZES:-1024 2048 4096}" \
  STUDY_BUDGETS="${STUDY_BUDGETS:-0.5 0.25 0.125 0.0625 0.03125}" STUDY_PER_SIZE="${STUDY_PER_SIZE:-200}" \
  scripts/study_debug.sh "$long_ckpt" "$out/dsrsq_long_train/ckpt_${dsteps}.h5" "$out/study"

step "the long model's F1 by context length, with and without log-length scaling"
/usr/bin/python3 analysis/report.py "$out/standard_long_stage3/run.h5" -o "$out/report_long" --print
/usr/bin/python3 analysis/report.py "$out/standard_long_nolog/run.h5" -o "$out/report_long_nolog" --print
echo "== long study: done in $((SECONDS - t0)) s; study report: $out/study/report/report.md"
