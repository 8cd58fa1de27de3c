# shellcheck shell=bash
# Shared by the Slurm job scripts in jobs/ (sourced, not run). Module-free: it
# needs only bash, the dsrsq binary and, under Slurm, srun (or Open MPI's mpirun).
#
# Settings (environment variables; sbatch passes the submitting shell's
# environment to the job, so `DSRSQ_X=... sbatch jobs/...` works):
#   DSRSQ_ROOT         the repository (default: found from the job's submit directory)
#   DSRSQ_BIN          the program (default $DSRSQ_ROOT/build/dsrsq)
#   DSRSQ_OUTPUT_DIR   where run directories go (default $DSRSQ_ROOT/results), unless --output_dir is given
#   DSRSQ_LAUNCHER     auto (default) | srun | mpirun | direct
#   DSRSQ_SRUN_MPI     srun's --mpi type (default pmix, used when `srun --mpi=list` lists it)
#   DSRSQ_MPIRUN       the mpirun to fall back on (default mpirun)
#   DSRSQ_MPIRUN_ARGS  extra mpirun arguments
#   DSRSQ_SRUN_ARGS    extra srun arguments
#   DSRSQ_MAX_REQUEUES how often a job may requeue itself after the program checkpointed (default 20)
#   DSRSQ_THREADS      OpenMP/OpenBLAS threads per rank (default SLURM_CPUS_PER_TASK, else the
#                      node's CPUs shared by its tasks; OMP_NUM_THREADS outside Slurm)
#
# What the program's exit codes mean here: 0 done; 3 it checkpointed and
# stopped (SIGUSR1/SIGTERM or --stop_after) and the same command resumes it, so
# the job requeues itself (`scontrol requeue`), except after a SIGTERM to the
# batch shell (scancel, time limit, preemption: a cancelled job stays
# cancelled); anything else is a failure.

# ---- the repository and the binary ----
# sbatch runs a copy of the script from Slurm's spool folder, so BASH_SOURCE of
# the job script does not point into the repository; the scripts find it from
# DSRSQ_ROOT or the submit directory (or a parent of it) before sourcing this file.
DSRSQ_ROOT="$(cd "${DSRSQ_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)"
export DSRSQ_ROOT
export DSRSQ_BIN="${DSRSQ_BIN:-$DSRSQ_ROOT/build/dsrsq}"
export DSRSQ_OUTPUT_DIR="${DSRSQ_OUTPUT_DIR:-$DSRSQ_ROOT/results}"
DSRSQ_MAX_REQUEUES="${DSRSQ_MAX_REQUEUES:-20}"

dsrsq_log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] dsrsq-job: $*"; }
dsrsq_die() { dsrsq_log "error: $*" >&2; exit 2; }

if [ ! -x "$DSRSQ_BIN" ]; then
  dsrsq_die "no program at $DSRSQ_BIN (build it: cmake --build $DSRSQ_ROOT/build --target dsrsq, or set DSRSQ_BIN)"
fi
# Relative paths in configs (datasets/, configs/) are relative to the repository.
cd "$DSRSQ_ROOT" || dsrsq_die "cannot enter $DSRSQ_ROOT"

# ---- threads ----
# One rank's OpenMP (and OpenBLAS) threads: DSRSQ_THREADS if set, else the CPUs
# Slurm gave each task (SLURM_CPUS_PER_TASK, or the node's CPUs shared by its
# tasks), else OMP_NUM_THREADS, else all cores. Inside a job Slurm's figure wins
# over an OMP_NUM_THREADS inherited from the submitting shell.
dsrsq_threads() {
  if [ -n "${DSRSQ_THREADS:-}" ]; then
    echo "$DSRSQ_THREADS"
  elif [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    echo "$SLURM_CPUS_PER_TASK"
  elif [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
    local per_node="${SLURM_NTASKS_PER_NODE:-}"
    per_node="${per_node%%(*}"  # "2(x3)" -> 2
    [ -n "$per_node" ] || per_node=$(((${SLURM_NTASKS:-1} + ${SLURM_JOB_NUM_NODES:-1} - 1) / ${SLURM_JOB_NUM_NODES:-1}))
    local t=$((SLURM_CPUS_ON_NODE / (per_node > 0 ? per_node : 1)))
    echo $((t > 0 ? t : 1))
  elif [ -n "${OMP_NUM_THREADS:-}" ]; then
    echo "$OMP_NUM_THREADS"
  else
    nproc
  fi
}
OMP_NUM_THREADS="$(dsrsq_threads)"
export OMP_NUM_THREADS
export OPENBLAS_NUM_THREADS="$OMP_NUM_THREADS"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Slurm 22.05's srun does not inherit sbatch's --cpus-per-task; this passes it on.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
# Open MPI in containers: shared-memory copies without CMA/ptrace permissions.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

# ---- arguments ----
# dsrsq_has_opt OPT ARGS...: ARGS holds OPT (as "OPT value" or "OPT=value").
dsrsq_has_opt() {
  local opt="$1" a; shift
  for a in "$@"; do
    [ "$a" = "$opt" ] && return 0
    [ "${a%%=*}" = "$opt" ] && return 0
  done
  return 1
}

# dsrsq_world: ranks of this job (SLURM_NTASKS; 1 outside Slurm unless DSRSQ_NP).
dsrsq_world() { echo "${DSRSQ_NP:-${SLURM_NTASKS:-1}}"; }

# dsrsq_begin ARGS...: ARGS are the job script's own arguments (they go to the
# program last). Starts DSRSQ_ARGS with the command (DSRSQ_COMMAND, default
# run), --config (DSRSQ_CONFIG, or the script's default passed in
# DSRSQ_DEFAULT_CONFIG), --output_dir and, with several ranks, --dp, each only
# where ARGS do not already give it.
dsrsq_begin() {
  DSRSQ_USER_ARGS=("$@")
  DSRSQ_ARGS=()
  dsrsq_has_opt --command "$@" || DSRSQ_ARGS+=("${DSRSQ_COMMAND:-run}")
  local config="${DSRSQ_CONFIG:-${DSRSQ_DEFAULT_CONFIG:-configs/paper.ini}}"
  dsrsq_has_opt --config "$@" || DSRSQ_ARGS+=(--config "$config")
  dsrsq_has_opt --output_dir "$@" || DSRSQ_ARGS+=(--output_dir "$DSRSQ_OUTPUT_DIR")
  local world
  world="$(dsrsq_world)"
  if ((world > 1)) && ! dsrsq_has_opt --dp "$@" && ! dsrsq_has_opt --sp "$@"; then
    DSRSQ_ARGS+=(--dp "$world")
  fi
}

# dsrsq_add OPT VALUE...: add "OPT VALUE..." to DSRSQ_ARGS unless the script's
# arguments give OPT themselves (then theirs win).
dsrsq_add() {
  local opt="$1"; shift
  if dsrsq_has_opt "$opt" "${DSRSQ_USER_ARGS[@]}"; then
    dsrsq_log "note: $opt from the job's arguments replaces the script's '$opt $*'"
  else
    DSRSQ_ARGS+=("$opt" "$@")
  fi
}

# dsrsq_pick LIST INDEX: the INDEX-th (from 0) word of LIST (words separated by
# spaces or commas); fails when out of range.
dsrsq_pick() {
  local list="${1//,/ }" i=0 w
  for w in $list; do
    if [ "$i" -eq "$2" ]; then echo "$w"; return 0; fi
    i=$((i + 1))
  done
  return 1
}

# dsrsq_array_index: this array task's index into a list: SLURM_ARRAY_TASK_ID
# itself, counted from 0 (--array=0-3 covers four entries; --array=2 reruns the
# third alone). DSRSQ_INDEX overrides it, e.g. to try a script outside Slurm.
dsrsq_array_index() {
  if [ -n "${DSRSQ_INDEX:-}" ]; then echo "$DSRSQ_INDEX"; return; fi
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || dsrsq_die "not an array task: submit with sbatch --array=... (or set DSRSQ_INDEX)"
  echo "$SLURM_ARRAY_TASK_ID"
}

# A name fit for a run directory: "0.25" stays, "64 128" -> "64-128".
dsrsq_slug() { echo "$*" | tr -cs 'A-Za-z0-9._' '-' | sed 's/^-*//; s/-*$//'; }

# ---- launching ----
DSRSQ_STEP_PID=""
DSRSQ_SIGNALLED=0
DSRSQ_GOT_TERM=0

# Slurm delivers --signal=B:USR1@N (and preemption's SIGTERM) to this batch
# shell; the program runs in the job step, so forward it as SIGUSR1 to srun or
# mpirun, which pass it on to every rank (both forward SIGUSR1 to their tasks;
# SIGTERM would make mpirun kill the ranks). The program then checkpoints at the
# next step boundary and exits with 3.
_dsrsq_forward() {
  DSRSQ_SIGNALLED=1
  [ "$1" = TERM ] && DSRSQ_GOT_TERM=1
  dsrsq_log "got SIG$1; forwarding SIGUSR1 to the job step (pid ${DSRSQ_STEP_PID:-none})"
  [ -n "$DSRSQ_STEP_PID" ] && kill -USR1 "$DSRSQ_STEP_PID" 2>/dev/null
  return 0
}

# The launcher: srun with PMIx when Slurm offers it, else mpirun inside the
# allocation, else (outside Slurm, one rank) the program itself.
dsrsq_launcher() {
  local l="${DSRSQ_LAUNCHER:-auto}"
  if [ "$l" != auto ]; then echo "$l"; return; fi
  if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1 &&
    srun --mpi=list 2>&1 | grep -qw -- "${DSRSQ_SRUN_MPI:-pmix}"; then
    echo srun
  elif [ -n "${SLURM_JOB_ID:-}" ] || [ "$(dsrsq_world)" -gt 1 ]; then
    echo mpirun
  else
    echo direct
  fi
}

# launch ARGS...: run the program (ARGS: its arguments) on every rank of the
# job, forward stop signals, and turn exit code 3 into a requeue. Exits the
# batch script with the program's status.
launch() {
  local np launcher cmd=()
  np="$(dsrsq_world)"
  launcher="$(dsrsq_launcher)"
  case "$launcher" in
    srun)
      # --kill-on-bad-exit: a rank that dies takes the others down (no hung collectives).
      # shellcheck disable=SC2206
      cmd=(srun --mpi="${DSRSQ_SRUN_MPI:-pmix}" --ntasks="$np" --kill-on-bad-exit=1 ${DSRSQ_SRUN_ARGS:-}
        "$DSRSQ_BIN" "$@")
      ;;
    mpirun)
      local extra=()
      [ "$(id -u)" -eq 0 ] && extra+=(--allow-run-as-root)
      # More ranks than the allocation's task slots (or, outside Slurm, than cores).
      local slots="${SLURM_NTASKS:-$(nproc)}"
      ((np > slots)) && extra+=(--oversubscribe)
      # --bind-to none: each rank runs OMP_NUM_THREADS threads (mpirun would pin a rank to one core).
      # shellcheck disable=SC2206
      cmd=("${DSRSQ_MPIRUN:-mpirun}" -np "$np" --bind-to none "${extra[@]}"
        -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS -x OMP_WAIT_POLICY ${DSRSQ_MPIRUN_ARGS:-}
        "$DSRSQ_BIN" "$@")
      ;;
    direct)
      ((np == 1)) || dsrsq_die "DSRSQ_LAUNCHER=direct runs one rank, but $np were asked for"
      cmd=("$DSRSQ_BIN" "$@")
      ;;
    *) dsrsq_die "DSRSQ_LAUNCHER=$launcher: expected auto, srun, mpirun or direct" ;;
  esac

  dsrsq_log "job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}, restart ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-$(hostname -s)}, $np rank(s) x $OMP_NUM_THREADS thread(s), launcher $launcher"
  dsrsq_log "command: ${cmd[*]}"
  trap '_dsrsq_forward USR1' USR1
  trap '_dsrsq_forward TERM' TERM
  local rc attempt=1 errlog
  errlog="$(mktemp "${TMPDIR:-/tmp}/dsrsq-job-${SLURM_JOB_ID:-local}.XXXXXX")" || errlog=/dev/null
  while :; do
    # The launcher's stderr also goes to a file: srun can exit 0 after a step that
    # never started ("task 0 launch failed"), and only its messages tell.
    : >"$errlog" 2>/dev/null
    # (tee ignores the TERM that scancel sends to every process of the batch step.)
    "${cmd[@]}" 2> >(trap '' TERM USR1; exec tee -a "$errlog" >&2) &
    DSRSQ_STEP_PID=$!
    while :; do
      DSRSQ_SIGNALLED=0
      wait "$DSRSQ_STEP_PID"
      rc=$?
      # A trapped signal interrupts `wait` (status > 128) while the step still runs:
      # wait again (bash keeps the status of a step that ended meanwhile).
      ((DSRSQ_SIGNALLED)) || break
    done
    DSRSQ_STEP_PID=""
    sleep 0.5  # let tee drain
    if [ "$launcher" = srun ] && grep -qE 'launch failed|aborted before step completely launched' "$errlog" 2>/dev/null; then
      # Seen when a requeued job restarts within seconds: the previous step's PMIx
      # socket is still in use. The program did not run; try once more.
      if ((attempt < 2)) && ((!DSRSQ_GOT_TERM)); then
        dsrsq_log "srun could not start the job step (exit code $rc); retrying in 15 s"
        attempt=$((attempt + 1))
        sleep 15
        continue
      fi
      dsrsq_log "srun could not start the job step (exit code $rc)" >&2
      ((rc == 0)) && rc=1
    fi
    break
  done
  trap - USR1 TERM
  [ "$errlog" != /dev/null ] && rm -f "$errlog"

  case "$rc" in
    0) dsrsq_log "finished" ;;
    3)
      if [ -z "${SLURM_JOB_ID:-}" ]; then
        dsrsq_log "checkpointed and stopped; rerun the same command to resume"
      elif ((DSRSQ_GOT_TERM)); then
        # SIGTERM: scancel, a time limit or preemption; Slurm requeues preempted jobs itself
        # (PreemptMode=REQUEUE). A job the user cancelled must stay cancelled.
        dsrsq_log "checkpointed and stopped on SIGTERM (scancel, time limit or preemption): not requeueing; submit the same job again to resume"
      elif ((${SLURM_RESTART_COUNT:-0} >= DSRSQ_MAX_REQUEUES)); then
        dsrsq_log "checkpointed and stopped, but the job was already requeued ${SLURM_RESTART_COUNT} times (DSRSQ_MAX_REQUEUES); not requeueing"
      else
        # Log first: slurmctld ends this batch shell as soon as the requeue is accepted.
        dsrsq_log "checkpointed and stopped; requeueing job $SLURM_JOB_ID (the next start resumes from the checkpoint)"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        dsrsq_log "checkpointed and stopped; 'scontrol requeue $SLURM_JOB_ID' failed (submit with --requeue); resubmit the same job to resume"
      fi
      ;;
    *) dsrsq_log "the program failed with exit code $rc" >&2 ;;
  esac
  exit "$rc"
}
