#!/usr/bin/env bash
# The 4K study of docs/RESULTS.md (issue 13) on one long model, as one command (any context size: STUDY_CONTEXT):
#   training-free methods (five budgets, both protocols; RAG at original positions too), and, for each training
#   seed, the trained methods: a control (the standard model fine-tuned LONG_FT_STEPS more steps), DSRSQ
#   fine-tuned the same steps (configs/dsrsq_debug.ini's DSRSQ settings), GCA started from the long model
#   (--gca_init standard) and trained the same steps, and ATSKV's predictor on the frozen long model; DSRSQ with
#   compact positions at the first seed. Every evaluation scores the same examples
#   (--seed 1234, --num_test STUDY_N) at STUDY_CONTEXT tokens, so every cell pairs with every other.
# Then scripts/study_4k_tables.py prints the tables (bootstrap intervals, paired tests against the full cache
# and against the same seed's control).
#   scripts/study_4k.sh LONG_CKPT [OUT_DIR]       (default OUT_DIR: results/study_4k)
# Env: STUDY_SEEDS ("1234 2 3"), STUDY_N (200), STUDY_CONTEXT (4096), STUDY_BUDGETS ("0.5 0.25 0.125 0.0625
# 0.03125"), STUDY_TRAINED_BUDGET (0.125: the trained methods' budget; ATSKV is evaluated at every budget),
# LONG_FT_STEPS (400), STUDY_ATSKV_STEPS (150), STUDY_JOBS (2: runs at a time, each on
# OMP_NUM_THREADS=STUDY_THREADS, default 1), DSRSQ_BIN (build/dsrsq), STUDY_CONFIG (configs/long.ini: the data,
# model and schedule every run reads), STUDY_DSRSQ_KNOBS (configs/dsrsq_debug.ini's DSRSQ settings), STUDY_GCA_KNOBS
# ("--gca_init standard": GCA's settings; the chunk, top-k and window are the registry's), STUDY_METHODS (the training-free methods:
# "full sliding_window rag attention_rag razor pyramid dynamic_kv rocket_kv"), STUDY_PROTOCOLS ("query_aware
# context_only"), STUDY_EVAL_DIR (OUT_DIR: where the evaluations go; the trainings stay in OUT_DIR, so another
# context size reuses them: STUDY_CONTEXT=8192 STUDY_EVAL_DIR=OUT_DIR/ctx8192 scripts/study_4k.sh LONG OUT_DIR).
# Runs are named as study_4k_tables.py expects; a finished run is skipped when the script is rerun (the
# program skips a run directory whose run.h5 says done), so a killed study resumes where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ $# -ge 1 ] || { echo "usage: $0 LONG_CKPT [OUT_DIR]" >&2; exit 2; }
long="$1"
out="${2:-results/study_4k}"
bin="${DSRSQ_BIN:-build/dsrsq}"
[ -x "$bin" ] || { echo "$0: no program at $bin (./run or cmake --build build --target dsrsq)" >&2; exit 2; }
[ -f "$long" ] || { echo "$0: no long-model checkpoint '$long'" >&2; exit 2; }
edir="${STUDY_EVAL_DIR:-$out}"
read -r -a methods <<< "${STUDY_METHODS:-full sliding_window rag attention_rag razor pyramid dynamic_kv rocket_kv}"
read -r -a protocols <<< "${STUDY_PROTOCOLS:-query_aware context_only}"
read -r -a seeds <<< "${STUDY_SEEDS:-1234 2 3}"
read -r -a budgets <<< "${STUDY_BUDGETS:-0.5 0.25 0.125 0.0625 0.03125}"
tb="${STUDY_TRAINED_BUDGET:-0.125}"
ft="${LONG_FT_STEPS:-400}"
as="${STUDY_ATSKV_STEPS:-150}"
jobs="${STUDY_JOBS:-2}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" OMP_NUM_THREADS="${STUDY_THREADS:-1}"
mkdir -p "$out" "$edir"
config="${STUDY_CONFIG:-configs/long.ini}"
[ -f "$config" ] || { echo "$0: no config '$config' (STUDY_CONFIG)" >&2; exit 2; }
# DSRSQ's settings: configs/dsrsq_debug.ini's [dsrsq] section, as options.
read -r -a dsrsq_knobs <<< "${STUDY_DSRSQ_KNOBS:---dsr_d_r 32 --dsr_base_budget 0.25 --dsr_alpha 0.5 --dsr_span 8 \
--dsr_lambda 0.1 --sqa_clusters 8 --sqa_top_clusters 4 --rckv_d_c 32 --rckv_buffer 0 --rckv_window 16 \
--hof_weights 1.0 0.5 0.3 0.2 --hof_ramp 300}"
read -r -a gca_knobs <<< "${STUDY_GCA_KNOBS:---gca_init standard}"
ev=(eval --config "$config" --seed 1234 --eval_context_sizes "${STUDY_CONTEXT:-4096}" --num_test "${STUDY_N:-200}"
  --output_dir "$edir" --no_report)
tr=(train --config "$config" --init_from "$long" --steps "$ft" --checkpoint_every "$ft" --learning_rate 1e-3
  --output_dir "$out" --no_report)
t0=$SECONDS
failed=0
# One run in the background, its output in DIR/NAME.log (DIR: its --output_dir); at most STUDY_JOBS at a time.
run() {
  local name="$1" dir="$2"; shift 2
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || failed=1; done
  echo "== study_4k [$(date -u +%H:%M:%S)]: $name"
  "$bin" "$@" --run_name "$name" >> "$dir/$name.log" 2>&1 &  # appended: a rerun keeps the first log
}
drain() { while [ -n "$(jobs -rp)" ]; do wait -n || failed=1; done; }

# 1. Training-free methods on the long model; the trainings beside them.
has() { local x; for x in "${@:2}"; do [ "$x" = "$1" ] && return 0; done; return 1; }
for p in "${protocols[@]}"; do
  name=e_std; [ "$p" = query_aware ] || name=e_std_ctx
  ms=()  # under the query-agnostic protocol only the methods that have that form (the program's table says which)
  for m in "${methods[@]}"; do
    if [ "$p" = query_aware ] || "$bin" --dry_run --protocol "$p" --methods "$m" >/dev/null 2>&1; then ms+=("$m"); fi
  done
  run "$name" "$edir" "${ev[@]}" --init_from "$long" --protocol "$p" --kv_budget "${budgets[@]}" --methods "${ms[@]}"
done
if has rag "${methods[@]}"; then
  run e_rag_original "$edir" "${ev[@]}" --init_from "$long" --protocol query_aware --kv_budget "$tb" --methods rag \
    --rag_positions original
fi
for s in "${seeds[@]}"; do
  run "control_s$s" "$out" "${tr[@]}" --seed "$s"
  run "dsrsq_s$s" "$out" "${tr[@]}" --seed "$s" --model dsrsq "${dsrsq_knobs[@]}"
  run "gca_s$s" "$out" "${tr[@]}" --seed "$s" --model gca "${gca_knobs[@]}"
  run "atskv_s$s" "$out" train --config "$config" --model atskv --init_from "$long" --steps "$as" \
    --checkpoint_every "$as" --seed "$s" --output_dir "$out" --no_report
done
run dsrsq_compact "$out" "${tr[@]}" --seed "${seeds[0]}" --model dsrsq "${dsrsq_knobs[@]}" --dsr_positions compact
drain
[ "$failed" = 0 ] || { echo "$0: a run failed (its log is in $out or $edir)" >&2; exit 1; }

# 2. The trained methods, each on its own checkpoint, at the same examples.
for s in "${seeds[@]}"; do
  run "e_control_s$s" "$edir" "${ev[@]}" --init_from "$out/control_s$s/ckpt_$ft.h5" --kv_budget "$tb" --methods full
  run "e_dsrsq_s$s" "$edir" "${ev[@]}" --model dsrsq --init_from "$out/dsrsq_s$s/ckpt_$ft.h5" "${dsrsq_knobs[@]}" \
    --kv_budget "$tb" --methods dsrsq
  run "e_gca_s$s" "$edir" "${ev[@]}" --model gca --init_from "$out/gca_s$s/ckpt_$ft.h5" "${gca_knobs[@]}" \
    --kv_budget "$tb" --methods gca
  run "e_atskv_s$s" "$edir" "${ev[@]}" --model atskv --init_from "$out/atskv_s$s/ckpt_$as.h5" --kv_budget "${budgets[@]}" \
    --methods atskv
done
run e_dsrsq_compact "$edir" "${ev[@]}" --model dsrsq --init_from "$out/dsrsq_compact/ckpt_$ft.h5" "${dsrsq_knobs[@]}" \
  --dsr_positions compact --kv_budget "$tb" --methods dsrsq
drain
[ "$failed" = 0 ] || { echo "$0: a run failed (its log is in $out or $edir)" >&2; exit 1; }
/usr/bin/python3 scripts/study_4k_tables.py "$edir" > "$edir/tables.md"
echo "== study_4k: done in $((SECONDS - t0)) s; tables: $edir/tables.md"
