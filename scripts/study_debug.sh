#!/bin/bash
# The study of issue 13 scaled down to the debug model (docs/RESULTS.md): every
# method of the registry at the debug model's trained context lengths, KV
# budgets 1/2 .. 1/16 of the full cache's bytes, under the query-aware and the
# query-agnostic (context_only) protocol, on the same test examples, then the
# report (Tables 5 and 6, Pareto and F1-by-length figures, needle heat-maps).
#
#   scripts/study_debug.sh STANDARD_CKPT DSRSQ_CKPT [OUT_DIR]
#
# STANDARD_CKPT: the debug standard model (`./run` writes
# results/standard_needle/ckpt_1800.h5); DSRSQ_CKPT: DSRSQ fine-tuned from it
# (`./run --config configs/dsrsq_debug.ini`, ckpt_1200.h5). OUT_DIR (default
# results/study_debug) receives one run per (model, protocol) and report/.
# The ATSKV predictor is trained here first (backbone frozen) unless
# OUT_DIR/atskv_train already holds its last checkpoint.
# Env: STUDY_SIZES (default "64 128 192 256"), STUDY_BUDGETS (default
# "0.5 0.25 0.125 0.0625"), STUDY_CONFIG (the model's config, default
# configs/debug.ini; configs/long.ini for the long model), STUDY_PER_SIZE (test examples per context size,
# default 200), STUDY_ATSKV_STEPS (default 300), STUDY_PROTOCOLS (default
# "query_aware context_only"), STUDY_METHODS (the training-free methods, default
# all of them with standard, the full cache under the paper's name, as a check), DSRSQ_BIN (default build/dsrsq), STUDY_NICE (5).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 STANDARD_CKPT DSRSQ_CKPT [OUT_DIR]" >&2; exit 2; }
std_ckpt="$1" dsrsq_ckpt="$2" out="${3:-results/study_debug}"
# The DSRSQ checkpoint is checked when its evaluation comes (it may still be training).
[ -f "$std_ckpt" ] || { echo "$0: no checkpoint '$std_ckpt'" >&2; exit 2; }
bin="${DSRSQ_BIN:-build/dsrsq}"
[ -x "$bin" ] || { echo "$0: no program at $bin (cmake --build build --target dsrsq)" >&2; exit 2; }
read -ra sizes <<<"${STUDY_SIZES:-64 128 192 256}"
read -ra budgets <<<"${STUDY_BUDGETS:-0.5 0.25 0.125 0.0625}"
read -ra protocols <<<"${STUDY_PROTOCOLS:-query_aware context_only}"
per_size="${STUDY_PER_SIZE:-200}"
atskv_steps="${STUDY_ATSKV_STEPS:-300}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
run() { echo "[$(date -u +%H:%M:%S)] $*"; nice -n "${STUDY_NICE:-5}" "$bin" "$@"; }

# Every evaluation shares these: the same config, seed, eval sizes and example
# count, so every run scores the same test examples (make_split spreads
# --num_test evenly over --eval_context_sizes); the report refuses otherwise.
config="${STUDY_CONFIG:-configs/debug.ini}"
common=(--config "$config" --eval_context_sizes "${sizes[@]}" --num_test $((per_size * ${#sizes[@]}))
        --kv_budget "${budgets[@]}" --output_dir "$out" --no_report)
# DSRSQ's own settings, as configs/dsrsq_debug.ini trained it (its training
# options, steps and learning rate, are not repeated: this is evaluation).
dsrsq_knobs=(--dsr_d_r 32 --dsr_base_budget 0.25 --dsr_alpha 0.5 --dsr_span 8 --dsr_lambda 0.1 --sqa_clusters 8
             --sqa_top_clusters 4 --rckv_d_c 32 --rckv_buffer 0 --rckv_window 16 --hof_weights 1.0 0.5 0.3 0.2
             --hof_ramp 300)
# "standard" is the full cache under the paper's name (the same policy): kept as a check.
read -ra training_free <<<"${STUDY_METHODS:-full standard sliding_window rag attention_rag razor pyramid dynamic_kv rocket_kv}"

# 1. The ATSKV predictor on the frozen standard backbone.
atskv_ckpt="$out/atskv_train/ckpt_${atskv_steps}.h5"
if [ ! -f "$atskv_ckpt" ]; then
  t0=$(date +%s)
  run train --config "$config" --model atskv --init_from "$std_ckpt" --steps "$atskv_steps" \
    --checkpoint_every "$atskv_steps" --output_dir "$out" --run_name atskv_train --no_report
  echo "ATSKV predictor: $atskv_steps steps in $(($(date +%s) - t0)) s"
fi

# 2. The evaluations: training-free methods on the standard checkpoint, each
# trained method on its own checkpoint (query-agnostic: only methods that have
# a query-agnostic form; the program's table says which).
for p in "${protocols[@]}"; do
  methods=()
  for m in "${training_free[@]}"; do
    if [ "$p" = query_aware ] || "$bin" --dry_run --protocol "$p" --methods "$m" >/dev/null 2>&1; then methods+=("$m"); fi
  done
  run eval "${common[@]}" --protocol "$p" --init_from "$std_ckpt" --methods "${methods[@]}" --run_name "std_$p"
  run eval "${common[@]}" --protocol "$p" --model atskv --init_from "$atskv_ckpt" --methods atskv --run_name "atskv_$p"
  if [ "$p" = query_aware ]; then  # DSRSQ's retriever reads the question: no query-agnostic form
    [ -f "$dsrsq_ckpt" ] || { echo "$0: no checkpoint '$dsrsq_ckpt'" >&2; exit 2; }
    run eval "${common[@]}" --protocol "$p" --model dsrsq --init_from "$dsrsq_ckpt" "${dsrsq_knobs[@]}" \
      --methods dsrsq --run_name "dsrsq_$p"
  fi
done

# 3. The report: one sweep per protocol (the runs of a protocol merge).
runs=()
for r in std_query_aware std_context_only atskv_query_aware atskv_context_only dsrsq_query_aware; do
  [ -f "$out/$r/run.h5" ] && runs+=("$out/$r/run.h5")
done
/usr/bin/python3 analysis/report.py "${runs[@]}" -o "$out/report"
echo "report: $out/report/report.md"
