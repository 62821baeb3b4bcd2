#!/usr/bin/env bash
# Stop what slurm/start-cluster.sh started: cancel every job, stop the slurmd's, slurmctld, slurmdbd,
# MariaDB and munged (munged only if start-cluster.sh started it), all by the PIDs in their pid files,
# never by name; remove the node namespaces and the bridge, then the state folder.
# Knobs: HPC_SLURM_DIR (default /tmp/hpc-grpo-slurm); KEEP_DIR=1 keeps the folder (logs).
set -uo pipefail
D=${HPC_SLURM_DIR:-/tmp/hpc-grpo-slurm}
KEEP_DIR=${KEEP_DIR:-0}
BRIDGE=hpcslurm0
export SLURM_CONF=$D/etc/slurm.conf PATH=$PATH:/usr/sbin:/sbin
log() { printf '[stop-cluster %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
T0=$(date +%s.%N)

# alive = exists and is not a zombie: the daemons are re-parented to PID 1, which may reap them
# late, and `kill -0` succeeds on a zombie.
alive() { local s; s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
stop_pidfile() {  # pid file, program name: signals the PID only while it still runs that program
  local f=$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null); rm -f "$f"
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 0
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 100); do alive "$pid" || return 0; sleep 0.05; done
  log "$2 ($pid) still running 5 s after SIGTERM: SIGKILL"
  kill -KILL "$pid" 2>/dev/null
}

# Jobs first, so that no slurmstepd or job process outlives its slurmd.
if [ -f "$D/run/slurmctld.pid" ] && alive "$(cat "$D/run/slurmctld.pid")"; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    scancel --full $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi
for f in "$D"/run/slurmd-*.pid; do stop_pidfile "$f" slurmd; done
stop_pidfile "$D/run/slurmctld.pid" slurmctld
stop_pidfile "$D/run/slurmdbd.pid" slurmdbd
stop_pidfile "$D/run/mariadbd.pid" mariadbd
stop_pidfile "$D/run/munged.pid" munged

if [ -f "$D/run/netns.list" ]; then
  while read -r ns veth; do
    ip link del "$veth" 2>/dev/null   # removes the peer at once; `ip netns del` alone leaves it a while
    ip netns del "$ns" 2>/dev/null
  done < "$D/run/netns.list"
fi
ip link del "$BRIDGE" 2>/dev/null
if [ "$KEEP_DIR" = 1 ]; then log "kept $D (logs in $D/log)"; else rm -rf "$D"; fi
log "stopped in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s"
