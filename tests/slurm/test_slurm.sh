#!/usr/bin/env bash
# A real one-node Slurm test of the job scripts in jobs/ (CTest: slurm_jobs,
# labels slurm and e2e). It brings up a private cluster with
# scripts/slurm_local.sh (its own folder and ports, so a cluster a developer
# keeps up is not touched), then:
#   1. jobs/experiment.sbatch  on configs/debug.ini with small overrides;
#   2. jobs/sweep_array.sbatch as a 2-task array over kv_budget;
#   3. preemption: a longer experiment job gets SIGUSR1 in its batch shell
#      (scancel --signal=USR1 --batch, what --signal=B:USR1@N delivers); the
#      script forwards it to srun, the program checkpoints and exits 3, the
#      script requeues the job, and the requeued job resumes and completes;
# and checks each job's state and exit code and that each results file is
# complete (every status "done", one row per test example, the Slurm job id
# recorded). The cluster is always taken down (trap EXIT).
# Exit 77 (CTest SKIP_RETURN_CODE) with the reason when Slurm, munge, root or
# h5py is missing.
#   DSRSQ_BIN         the program (default <source>/build/dsrsq)
#   DSRSQ_SOURCE_DIR  the repository (default: two folders up from this script)
#   DSRSQ_SLURM_TEST_KEEP=1  keep the work folder (logs, results) even when the test passes
set -uo pipefail

SRC="$(cd "${DSRSQ_SOURCE_DIR:-$(dirname "$0")/../..}" && pwd)"
BIN="${DSRSQ_BIN:-$SRC/build/dsrsq}"
PY=/usr/bin/python3
T0=$SECONDS

log() { echo "[test_slurm +$((SECONDS - T0))s] $*"; }
skip() { echo "SKIP: $*"; exit 77; }

# ---- (1) prerequisites ----
missing=()
for b in munged munge slurmctld slurmd sbatch squeue scontrol scancel sinfo srun; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
((${#missing[@]} == 0)) || skip "Slurm/munge programs missing: ${missing[*]} (apt-get install slurmctld slurmd slurm-client munge)"
[ "$(id -u)" -eq 0 ] || skip "needs root to run slurmd"
if ! "$PY" -c 'import h5py' 2>/dev/null; then skip "$PY with h5py is missing (apt-get install python3-h5py)"; fi
[ -x "$BIN" ] || { echo "FAIL: no program at $BIN"; exit 1; }

WORK="$(mktemp -d /tmp/dsrsq-slurm-test.XXXXXX)"
chmod 0755 "$WORK"  # munged runs as the munge user and must reach its socket folder
export DSRSQ_SLURM_DIR="$WORK/slurm"
export DSRSQ_SLURM_TIMEOUT=60
LOGS="$WORK/logs"
OUT="$WORK/results"
mkdir -p "$LOGS" "$OUT"
FAILED=0

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  log "taking the cluster down"
  "$SRC/scripts/slurm_local.sh" down || true
  if ((rc != 0)) || ((FAILED)); then
    for f in "$LOGS"/*; do
      [ -f "$f" ] || continue
      echo "---- $f"
      tail -n 40 "$f"
    done
    for f in "$DSRSQ_SLURM_DIR"/log/*.log; do
      [ -f "$f" ] || continue
      echo "---- $f (errors)"
      grep -iE 'error|fatal' "$f" | tail -n 20
    done
    echo "work folder kept: $WORK"
  elif [ "${DSRSQ_SLURM_TEST_KEEP:-0}" = 1 ]; then
    echo "work folder kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  log "end (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL: $*"; FAILED=1; }

# ---- (2) the cluster, on free ports ----
up=0
for try in 1 2 3 4 5; do
  export DSRSQ_SLURM_PORT=$((20000 + (RANDOM % 20000)))
  if "$SRC/scripts/slurm_local.sh" up; then up=1; break; fi
  log "slurm_local.sh up failed (try $try); trying other ports"
done
((up)) || { echo "FAIL: could not bring up the local Slurm"; exit 1; }
eval "$("$SRC/scripts/slurm_local.sh" env)"

# Environment of the submitted jobs (sbatch exports the submitting environment).
export DSRSQ_BIN="$BIN"
export DSRSQ_CONFIG=configs/debug.ini
export DSRSQ_OUTPUT_DIR="$OUT"
unset DSRSQ_ROOT DSRSQ_RUN_NAME DSRSQ_THREADS DSRSQ_LAUNCHER
SMALL=(--steps 40 --batch_size 8 --num_train 200 --num_val 16 --num_test 8 --no-report)

# submit NAME ARGS...: sbatch from the repository (the scripts find it from the
# submit directory), print the job id.
submit() {
  local name="$1"; shift
  (cd "$SRC" && sbatch --parsable --job-name="$name" --output="$LOGS/%x-%j.out" "$@") | cut -d';' -f1
}

# field JOB KEY: a field of `scontrol show job` (the first, for an array's first task).
field() { scontrol -o show job "$1" 2>/dev/null | head -n 1 | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

# wait_done SECONDS JOB...: wait until no task of the jobs is pending, running or
# completing (squeue lists them; sacct is off), then every task must be COMPLETED
# with exit code 0:0.
wait_done() {
  local secs="$1"; shift
  local deadline=$((SECONDS + secs)) j
  for j in "$@"; do
    while [ -n "$(squeue -h -j "$j" -o %i 2>/dev/null)" ]; do
      if ((SECONDS >= deadline)); then
        fail "job $j still queued or running after ${secs}s"
        squeue -j "$j"
        scancel "$j"
        return 1
      fi
      sleep 1
    done
  done
  local ok=0 line state code
  for j in "$@"; do
    while read -r line; do
      state="$(tr ' ' '\n' <<<"$line" | sed -n 's/^JobState=//p')"
      code="$(tr ' ' '\n' <<<"$line" | sed -n 's/^ExitCode=//p')"
      log "job $(tr ' ' '\n' <<<"$line" | sed -n 's/^JobId=//p') $(tr ' ' '\n' <<<"$line" | sed -n 's/^JobName=//p'): $state, exit code $code, restarts $(tr ' ' '\n' <<<"$line" | sed -n 's/^Restarts=//p')"
      if [ "$state" != COMPLETED ] || [ "$code" != 0:0 ]; then
        fail "job $j: $state with exit code $code"
        ok=1
      fi
    done < <(scontrol -o show job "$j")
  done
  return $ok
}

# steps_alive JOB: a slurmstepd of JOB still runs (its title is "slurmstepd: [JOB.STEP]").
steps_alive() {
  local f
  for f in /proc/[0-9]*/comm; do
    [ "$(cat "$f" 2>/dev/null)" = slurmstepd ] || continue
    tr '\0' ' ' <"${f%comm}cmdline" 2>/dev/null | grep -qF "[$1." && return 0
  done
  return 1
}

# check_h5 FILE CHECK...: the results file is complete (every status "done", one
# eval row per test example, training ran to its last step). A CHECK is
# KEY=VALUE: a /config attribute, or with a leading @ a root attribute.
check_h5() {
  "$PY" - "$@" <<'PY' || fail "results file $1 is incomplete"
import sys, h5py
path = sys.argv[1]
checks = dict(a.split("=", 1) for a in sys.argv[2:])
def s(d):
    v = d[()]
    return v.rstrip(b"\0").decode() if isinstance(v, bytes) else str(v)
def a(v):
    return v.decode() if isinstance(v, bytes) else str(v)
bad = []
with h5py.File(path, "r", libver="latest", swmr=True) as f:
    if s(f["status/run_state"]) != "done":
        bad.append("run_state " + s(f["status/run_state"]))
    if not s(f["status/end_time"]):
        bad.append("no end_time")
    states = {}
    f["status"].visititems(lambda n, o: states.__setitem__(n, s(o)) if n.endswith("/state") else None)
    bad += ["%s = %s" % (n, v) for n, v in states.items() if v != "done"]
    methods = list(f["eval"])
    if not methods:
        bad.append("no evaluated method")
    ntest = int(a(f["config"].attrs["num_test"]))
    for m in methods:
        n = f["eval/%s/f1" % m].shape[0]
        if n != ntest:
            bad.append("eval/%s: %d rows, %d test examples" % (m, n, ntest))
    steps = int(a(f["config"].attrs["steps"]))
    if f["train/step"].shape[0] == 0 or int(f["train/step"][-1]) != steps:
        bad.append("train/step does not end at %d" % steps)
    for k, want in checks.items():
        attrs = f.attrs if k.startswith("@") else f["config"].attrs
        got = a(attrs.get(k.lstrip("@"), "<missing>"))
        if got != want:
            bad.append("%s = %r, expected %r" % (k, got, want))
    print("%s: %s; %d train rows; %s%s" % (
        path, ", ".join("%s %s" % (m, s(f["status/eval/%s/state" % m])) for m in methods),
        f["train/step"].shape[0], ", ".join("%s=%s" % kv for kv in checks.items()),
        "; PROBLEMS: " + "; ".join(bad) if bad else ""))
sys.exit(1 if bad else 0)
PY
}

# ---- (3) submit the experiment and the sweep (2 array tasks) ----
exp="$(submit exp --cpus-per-task=1 jobs/experiment.sbatch "${SMALL[@]}" --run_name exp)"
sweep="$(DSRSQ_SWEEP_PARAM=kv_budget DSRSQ_SWEEP_VALUES="0.25 0.5" \
  submit sweep --cpus-per-task=1 --array=0-1 jobs/sweep_array.sbatch "${SMALL[@]}")"
if [ -z "$exp" ] || [ -z "$sweep" ]; then echo "FAIL: sbatch failed (experiment '$exp', sweep '$sweep')"; exit 1; fi
log "submitted experiment job $exp and sweep array $sweep"

# ---- (4) wait ----
wait_done 150 "$exp" "$sweep"

# ---- (5) results ----
check_h5 "$OUT/exp/run.h5" steps=40 @slurm_job_id="$exp"
check_h5 "$OUT/sweep_kv_budget_0.25/run.h5" kv_budget=0.25 @env.SLURM_ARRAY_JOB_ID="$sweep" @slurm_array_task_id=0
check_h5 "$OUT/sweep_kv_budget_0.5/run.h5" kv_budget=0.5 @env.SLURM_ARRAY_JOB_ID="$sweep" @slurm_array_task_id=1
if grep -q "launcher srun" "$LOGS/exp-$exp.out"; then
  log "the experiment ran through srun --mpi=pmix"
else
  log "note: the experiment did not use srun (no PMIx?): $(grep -o 'launcher [a-z]*' "$LOGS/exp-$exp.out")"
fi

# ---- (6) preemption: SIGUSR1 to the batch shell -> checkpoint, exit 3, requeue, resume ----
# Small steps, many of them: the signal arrives after step 5, long before step 150.
PRE_STEPS=150
pre="$(submit pre --cpus-per-task=1 jobs/experiment.sbatch --steps $PRE_STEPS --batch_size 8 --num_train 200 \
  --num_val 16 --num_test 8 --no-report --log_every 5 --checkpoint_every 1000 --run_name pre)"
[ -n "$pre" ] || { echo "FAIL: sbatch of the preemption job failed"; exit 1; }
log "submitted preemption job $pre ($PRE_STEPS steps)"
# Signal it once it is training (a progress line is out), long before it ends.
deadline=$((SECONDS + 90))
until grep -qE '^step +[0-9]+/' "$LOGS/pre-$pre.out" 2>/dev/null; do
  if ((SECONDS >= deadline)) || [ -z "$(squeue -h -j "$pre" -o %i)" ]; then
    fail "preemption job $pre did not start training within 90s"
    break
  fi
  sleep 0.5
done
if ((!FAILED)); then
  log "job $pre is training: sending SIGUSR1 to its batch shell"
  scancel --signal=USR1 --batch "$pre"
  # The job requeues itself. Slurm holds a requeued job for 120 s (BeginTime); release it now.
  deadline=$((SECONDS + 90))
  while [ "$(field "$pre" Restarts)" = 0 ] || [ "$(field "$pre" JobState)" != PENDING ]; do
    state="$(field "$pre" JobState)"
    if ((SECONDS >= deadline)) || [ "$state" = COMPLETED ] || [ "$state" = FAILED ]; then
      fail "job $pre was not requeued after SIGUSR1 (state $state, restarts $(field "$pre" Restarts))"
      break
    fi
    sleep 0.5
  done
  if ((!FAILED)); then
    log "job $pre requeued (restarts $(field "$pre" Restarts), reason $(field "$pre" Reason))"
    # Slurm holds a requeued job ~120 s. Release it once the first attempt's step
    # daemons are gone: a step started while they still clean up collides with
    # their PMIx socket (jobs/common.sh retries that once, but the test should
    # not depend on it).
    deadline=$((SECONDS + 30))
    while steps_alive "$pre" && ((SECONDS < deadline)); do sleep 0.5; done
    log "releasing job $pre"
    scontrol update JobId="$pre" StartTime=now ||
      log "note: could not release job $pre early; it starts when Slurm's 120 s hold ends"
    wait_done 200 "$pre"
    [ "$(field "$pre" Restarts)" = 1 ] || fail "job $pre restarted $(field "$pre" Restarts) times, expected 1"
    grep -q "got SIGUSR1; forwarding" "$LOGS/pre-$pre.out" || fail "the batch shell did not forward SIGUSR1"
    grep -qE "stopped at step [0-9]+ of $PRE_STEPS" "$LOGS/pre-$pre.out" || fail "the program did not stop at a step boundary"
    grep -q "requeueing job $pre" "$LOGS/pre-$pre.out" || fail "the script did not requeue the job"
    grep -qE "resuming .*run.h5 from step [1-9]" "$LOGS/pre-$pre.out" || fail "the requeued job did not resume from the checkpoint"
    log "$(grep -E "stopped at step|resuming .*from step" "$LOGS/pre-$pre.out" | tr '\n' ';')"
    check_h5 "$OUT/pre/run.h5" steps=$PRE_STEPS @slurm_job_id="$pre"
  fi
fi

if ((FAILED)); then
  echo "FAILED"
  exit 1
fi
log "PASSED"
exit 0
