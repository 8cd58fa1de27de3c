#!/usr/bin/env bash
# A private one-node Slurm cluster on this machine, for trying the job scripts
# in jobs/ and for the CTest test tests/slurm (root, no systemd, no cgroups).
#
#   scripts/slurm_local.sh up       start munged, slurmctld and slurmd; wait until the node is idle
#   scripts/slurm_local.sh down     cancel the cluster's jobs, stop the three daemons (by their recorded PIDs only)
#   scripts/slurm_local.sh status   what runs, the node state and the queue
#   scripts/slurm_local.sh env      print `export SLURM_CONF=...` (use: eval "$(scripts/slurm_local.sh env)")
#
# Everything lives under one folder; nothing under /etc is touched:
#   DSRSQ_SLURM_DIR      the folder (default /tmp/dsrsq-slurm): slurm.conf, cgroup.conf, a private munge
#                        socket and key, state, spool, logs, PID files
#   DSRSQ_SLURM_PORT     slurmctld's TCP port (default 6817); slurmd uses the next one
#   DSRSQ_SLURM_TIMEOUT  seconds to wait for a daemon or the node (default 60)
#   DSRSQ_SLURM_MEM_HEADROOM_MB  memory kept back from Slurm (default: 10% of RAM, at least 512)
#   DSRSQ_SLURM_PARTITION        partition name (default ci)
# The client commands (sbatch, squeue, scontrol, sinfo, srun) find the cluster through SLURM_CONF.
# `up` is idempotent: a cluster that is already up is left as it is. A fresh `up` starts with an empty
# queue (slurmctld -c). Needs: slurmctld slurmd slurm-client munge (Debian), and root.
set -uo pipefail

DIR="${DSRSQ_SLURM_DIR:-/tmp/dsrsq-slurm}"
PORT="${DSRSQ_SLURM_PORT:-6817}"
TIMEOUT="${DSRSQ_SLURM_TIMEOUT:-60}"
PARTITION="${DSRSQ_SLURM_PARTITION:-ci}"
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
HOST="$(hostname -s 2>/dev/null || hostname)"
export SLURM_CONF="$CONF"

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

# PID recorded in $1 if that process is alive and is the program named $2.
alive_pid() {
  local file="$1" name="$2" pid comm
  [ -s "$file" ] || return 1
  pid="$(tr -dc '0-9' 2>/dev/null <"$file")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
  [ "$comm" = "$name" ] || return 1
  # A zombie (exited, not yet reaped by a parent that is not ours) is gone.
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.25 s until it succeeds.
wait_for() {
  local secs="$1" what="$2"; shift 2
  local deadline=$((SECONDS + secs))
  while ! "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "slurm_local: error: timed out after ${secs}s waiting for $what" >&2
      return 1
    fi
    sleep 0.25
  done
}

port_busy() {  # something accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

show_logs() {
  local f
  for f in "$MUNGE_DIR/munged.log" "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
    [ -s "$f" ] || continue
    echo "---- last lines of $f" >&2
    tail -n 15 "$f" >&2
  done
}

need_binaries() {
  local b missing=()
  for b in munged munge unmunge slurmctld slurmd sinfo scontrol squeue scancel sbatch; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  ((${#missing[@]} == 0)) || die "missing programs: ${missing[*]} (Debian: apt-get install slurmctld slurmd slurm-client munge)"
}

sbin() { command -v "$1" 2>/dev/null || echo "/usr/sbin/$1"; }

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n 1; }
node_idle() { case "$(node_state)" in idle | mix | alloc) return 0 ;; *) return 1 ;; esac; }
munge_ok() { munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

mpi_default() {  # pmix when Slurm has the plugin (Debian's Open MPI direct-launches only through PMIx)
  local d
  for d in /usr/lib/*/slurm-wlm /usr/lib/slurm-wlm /usr/lib64/slurm /usr/lib/slurm /usr/local/lib/slurm; do
    [ -e "$d/mpi_pmix.so" ] && { echo pmix; return; }
  done
  echo none
}

write_config() {
  local mem_kb mem_mb headroom topo
  mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  mem_mb=$((mem_kb / 1024))
  headroom="${DSRSQ_SLURM_MEM_HEADROOM_MB:-$((mem_mb / 10))}"
  ((headroom < 512)) && headroom=512
  mem_mb=$((mem_mb - headroom))
  ((mem_mb < 256)) && mem_mb=256
  # Topology as slurmd sees it (sockets, cores, threads), else just the CPU count.
  topo="$("$(sbin slurmd)" -C 2>/dev/null | head -n 1 | grep -o 'CPUs=[0-9]* .*ThreadsPerCore=[0-9]*')"
  [ -n "$topo" ] || topo="CPUs=$(nproc)"
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a private one-node cluster (no systemd, no cgroups, no accounting).
ClusterName=dsrsq
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=$(mpi_default)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 $topo RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  # Read only by cgroup plugins, which this configuration does not load; kept so a
  # system-wide cgroup.conf is never picked up instead.
  cat >"$DIR/cgroup.conf" <<EOF
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
}

start_munged() {
  local pid
  if pid="$(alive_pid "$MUNGE_DIR/munged.pid" munged)" && munge_ok; then
    say "munged already running (pid $pid)"
    return 0
  fi
  mkdir -p "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    if [ -r /etc/munge/munge.key ]; then
      cp /etc/munge/munge.key "$MUNGE_DIR/munge.key"
    else
      dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
  fi
  local user=root
  id munge >/dev/null 2>&1 && user=munge
  chown -R "$user:" "$MUNGE_DIR" 2>/dev/null || chown -R "$user" "$MUNGE_DIR"
  chmod 0700 "$MUNGE_DIR"
  chmod 0400 "$MUNGE_DIR/munge.key"
  if [ "$user" = munge ] && ! runuser -u munge -- test -x "$MUNGE_DIR"; then
    die "the munge user cannot enter $MUNGE_DIR: a parent folder is not searchable by others (chmod o+x it, or choose another DSRSQ_SLURM_DIR)"
  fi
  rm -f "$MUNGE_DIR/munged.pid"
  local cmd=("$(sbin munged)" --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key"
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed")
  # munged forks into the background itself and writes its PID file.
  if [ "$user" = munge ]; then
    runuser -u munge -- "${cmd[@]}" </dev/null || { show_logs; die "munged did not start"; }
  else
    "${cmd[@]}" </dev/null || { show_logs; die "munged did not start"; }
  fi
  wait_for "$TIMEOUT" "munged to answer on $MUNGE_SOCKET" munge_ok || { show_logs; die "munged is not answering"; }
  say "munged started (pid $(alive_pid "$MUNGE_DIR/munged.pid" munged))"
}

# start_daemon NAME COMMAND...: run a Slurm daemon in the foreground mode (-D) as a detached
# background process and record its PID in $DIR/NAME.pid.
start_daemon() {
  local name="$1"; shift
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  local pid=$!
  echo "$pid" >"$DIR/$name.pid"
  sleep 0.2
  if ! alive_pid "$DIR/$name.pid" "$name" >/dev/null; then
    show_logs
    tail -n 5 "$DIR/log/$name.out" >&2
    die "$name exited at start"
  fi
  say "$name started (pid $pid)"
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as their owner); run as root or with sudo"
  need_binaries
  local ctld slurmd_pid munged_pid
  ctld="$(alive_pid "$DIR/slurmctld.pid" slurmctld)"
  slurmd_pid="$(alive_pid "$DIR/slurmd.pid" slurmd)"
  munged_pid="$(alive_pid "$MUNGE_DIR/munged.pid" munged)"
  if [ -n "$ctld" ] && [ -n "$slurmd_pid" ] && [ -n "$munged_pid" ]; then
    if wait_for "$TIMEOUT" "node $HOST to become idle" node_idle; then
      say "already up (slurmctld $ctld, slurmd $slurmd_pid, munged $munged_pid); export SLURM_CONF=$CONF"
      return 0
    fi
    die "the daemons run but node $HOST is '$(node_state)'; try: $0 down && $0 up"
  fi
  if [ -n "$ctld$slurmd_pid$munged_pid" ]; then
    say "a partial cluster is running; stopping it first"
    cmd_down
  fi
  local p
  for p in "$PORT" "$((PORT + 1))"; do
    port_busy "$p" && die "TCP port $p is in use by another program; choose others with DSRSQ_SLURM_PORT=<port> (slurmd uses port+1)"
  done
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" || die "cannot create $DIR"
  chmod 0755 "$DIR"
  write_config
  start_munged
  start_daemon slurmctld "$(sbin slurmctld)" -D -c -i -f "$CONF"
  wait_for "$TIMEOUT" "slurmctld to answer" scontrol ping || { show_logs; cmd_down >/dev/null 2>&1; die "slurmctld is not answering"; }
  start_daemon slurmd "$(sbin slurmd)" -D -f "$CONF" -N "$HOST"
  if ! wait_for "$TIMEOUT" "node $HOST to become idle (state now: $(node_state))" node_idle; then
    show_logs
    cmd_down >/dev/null 2>&1
    die "node $HOST did not become idle"
  fi
  say "up: node $HOST $(sinfo -h -n "$HOST" -o '%c CPUs, %m MB, state %t'), MpiDefault=$(mpi_default)"
  say "use it with: export SLURM_CONF=$CONF"
}

# stop_pid FILE NAME: TERM the recorded process, KILL it after the timeout.
stop_pid() {
  local file="$1" name="$2" pid
  if ! pid="$(alive_pid "$file" "$name")"; then
    rm -f "$file"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  local deadline=$((SECONDS + TIMEOUT))
  while alive_pid "$file" "$name" >/dev/null; do
    if ((SECONDS >= deadline)); then
      say "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null
      break
    fi
    sleep 0.2
  done
  rm -f "$file"
  say "$name (pid $pid) stopped"
}

cmd_down() {
  # Cancel this cluster's jobs first, so no job step outlives the daemons.
  if alive_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && [ -f "$CONF" ]; then
    local jobs=()
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
    if ((${#jobs[@]})); then
      say "cancelling jobs: ${jobs[*]}"
      scancel --full "${jobs[@]}" 2>/dev/null
      local deadline=$((SECONDS + 40))
      while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && ((SECONDS < deadline)); do sleep 0.5; done
    fi
  fi
  stop_pid "$DIR/slurmd.pid" slurmd
  stop_pid "$DIR/slurmctld.pid" slurmctld
  stop_pid "$MUNGE_DIR/munged.pid" munged
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  return 0
}

cmd_status() {
  local name pid rc=0
  for name in munged slurmctld slurmd; do
    local file="$DIR/$name.pid"
    [ "$name" = munged ] && file="$MUNGE_DIR/munged.pid"
    if pid="$(alive_pid "$file" "$name")"; then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"
      rc=1
    fi
  done
  if ((rc == 0)); then
    echo "SLURM_CONF=$CONF"
    timeout 10 sinfo -N -o '%N %t %c CPUs %m MB' || rc=1
    timeout 10 squeue -o '%.10i %.9P %.24j %.8T %.10M %R' || rc=1
  fi
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 up|down|status|env   (folder: $DIR; see the comments at the top of this script)" >&2
    exit 2
    ;;
esac
