#!/usr/bin/env bash
# Start a real Slurm 22.05 cluster on ONE Debian 12 machine that looks like a multi-node GPU cluster:
#   * slurmctld (+ slurmdbd and a private MariaDB with ACCOUNTING=1) in the root network namespace,
#   * one slurmd per node, each in its own network namespace (own IP on a private bridge with no
#     uplink), UTS namespace (hostname = node name) and mount namespace (a private /etc/hosts that
#     maps every node name to its IP, so MASTER_ADDR=<first node> works inside jobs),
#   * typed GPU GRES (gpu:h800:8 ...) on fake character devices, so Slurm allocates GPUs by type
#     and sets CUDA_VISIBLE_DEVICES.
# Every node sees the host's filesystems (mount namespaces are copies), so the repository, the
# Python installation and submitit's log folders are at the same path on every node.
# Installs slurm-wlm and munge (and slurmdbd + mariadb-server) with apt-get when they are missing.
# Must run as root. A running instance from the same folder is stopped first.
#
# Usage: bash slurm/start-cluster.sh && source slurm/env.sh        stop: bash slurm/stop-cluster.sh
# Environment knobs:
#   HPC_SLURM_DIR   config/state/log folder, wiped on start (default /tmp/hpc-grpo-slurm)
#   NODES           "type:count ..." (default "h800:2 h20:2 h100:2 cpu:2"); type cpu has no GPUs
#   ACCOUNTING      1 (default): slurmdbd + MariaDB, so sacct works (submitit reads job states from
#                   it: without it a task that dies is never reported). 0: no accounting, faster.
#   SUBNET          first three octets of the node network (default 10.77.0): bridge .1, nodes .11..
#   INSTALL         1 (default): apt-get install missing packages; 0: fail instead
#   START_TIMEOUT   seconds to wait for every node to be idle (default 60)
set -euo pipefail

D=${HPC_SLURM_DIR:-/tmp/hpc-grpo-slurm}
NODES=${NODES:-"h800:2 h20:2 h100:2 cpu:2"}
ACCOUNTING=${ACCOUNTING:-1}
SUBNET=${SUBNET:-10.77.0}
INSTALL=${INSTALL:-1}
START_TIMEOUT=${START_TIMEOUT:-60}
DB_PORT=3307
BRIDGE=hpcslurm0
NS_PREFIX=hpcslurm-
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[start-cluster %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it creates network namespaces and starts daemons)"
case "$D" in /*) ;; *) die "HPC_SLURM_DIR=$D must be an absolute path" ;; esac
T0=$(date +%s.%N)

# ------------------------------------------------------------------------------------ install
need="slurmctld slurmd munged sinfo ip nsenter unshare"
pkgs="slurmctld slurmd slurm-client munge iproute2"
if [ "$ACCOUNTING" = 1 ]; then need="$need slurmdbd mariadbd mariadb-install-db"; pkgs="$pkgs slurmdbd mariadb-server"; fi
missing=""
for b in $need; do command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || missing="$missing $b"; done
if [ -n "$missing" ]; then
  [ "$INSTALL" = 1 ] || die "missing:$missing (INSTALL=0)"
  log "installing $pkgs (missing:$missing)"
  # The packages' postinst scripts start the daemons through invoke-rc.d unless policy-rc.d says no.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed $(slurmctld -V)"
fi
export PATH=$PATH:/usr/sbin:/sbin

# --------------------------------------------------------------- stop a previous instance
if [ -d "$D/run" ]; then
  log "stopping the previous instance in $D"
  HPC_SLURM_DIR=$D bash "$HERE/stop-cluster.sh" || true
fi
# leftovers of an instance whose folder is gone: our own bridge and namespace names only
for l in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
  ip link del "$l" 2>/dev/null || true
done
ip link del "$BRIDGE" 2>/dev/null || true
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do ip netns del "$ns" || true; done
ports="6817"; [ "$ACCOUNTING" = 1 ] && ports="6817 6819 $DB_PORT"
for port in $ports; do
  if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
    die "TCP port $port is taken by a process this script did not start: $(ss -Hltnp "sport = :$port" | head -1)"
  fi
done
rm -rf "$D"
mkdir -p "$D"/{etc,state,spool,log,run,dev}
CONF=$D/etc/slurm.conf
export SLURM_CONF=$CONF

# -------------------------------------------------------------------------------- munge
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  mungekey --create --force --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "using the munged that is already running"
else
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not start"
  cp /run/munge/munged.pid "$D/run/munged.pid"   # we started it, so stop-cluster.sh stops it
fi

# ------------------------------------------------------------------------ nodes and config
CTL_HOST=$(hostname -s)
CTL_ADDR=$SUBNET.1
names=(); types=(); addrs=()
i=0
for spec in $NODES; do
  t=${spec%%:*}; c=${spec##*:}
  for k in $(seq 1 "$c"); do names+=("$t-$k"); types+=("$t"); addrs+=("$SUBNET.$((11 + i))"); i=$((i + 1)); done
done
N=${#names[@]}
# Fake GPUs: gres.conf needs File= entries that are character devices (major 195 as nvidia's; no
# driver behind them, nothing opens them). Plain files leave CUDA_VISIBLE_DEVICES empty; no File=
# at all makes slurmd report 0 typed GPUs and the node goes INVAL.
for g in 0 1 2 3 4 5 6 7; do mknod "$D/dev/nvidia$g" c 195 "$g"; done
GPU_FILES="$D/dev/nvidia[0-7]"
FIRST_JOB_ID=$(( ($(date +%s) % 6000000) * 10 + 1000 ))

cat > "$CONF" <<EOF
# generated by slurm/start-cluster.sh: local test cluster, every node on this machine
ClusterName=hpclocal
SlurmctldHost=$CTL_HOST($CTL_ADDR)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd and no cgroup enforcement: track job processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
# start batch jobs at once (the default batch_sched_delay=3 adds ~3 s to every sbatch)
SchedulerParameters=batch_sched_delay=0
GresTypes=gpu
# node sizes come from this file, not from the 2-core host
SlurmdParameters=config_overrides
# for preemption: signal the job's tasks (not only the batch shell) before it is preempted
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
MaxJobCount=10000
JobRequeue=1
MailProg=/bin/true
# job ids differ from one start to the next (the state is wiped), so a per-job-id folder of an
# earlier run (submitit's %j) is never mistaken for this run's
FirstJobId=$FIRST_JOB_ID
# reject at submission a job its partition can never run (more nodes, GPUs or time than it has)
EnforcePartLimits=ALL
EOF
if [ "$ACCOUNTING" = 1 ]; then
  tres="gres/gpu"; for t in $(printf '%s\n' "${types[@]}" | grep -vx cpu | sort -u); do tres="$tres,gres/gpu:$t"; done
  cat >> "$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_ADDR
AccountingStoragePort=6819
AccountingStorageTRES=$tres
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
  # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF
  cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$CTL_HOST
DbdAddr=$CTL_ADDR
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
else
  printf 'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n' >> "$CONF"
fi

HOSTS=$D/etc/hosts
printf '127.0.0.1 localhost\n%s %s\n' "$CTL_ADDR" "$CTL_HOST" > "$HOSTS"
echo "AutoDetect=off" > "$D/etc/gres.conf"
for idx in $(seq 0 $((N - 1))); do
  n=${names[$idx]}; t=${types[$idx]}
  if [ "$t" = cpu ]; then
    # CPU nodes: no GPUs, scheduled first (lower weight) in the cpu partition
    echo "NodeName=$n NodeAddr=${addrs[$idx]} CPUs=32 Sockets=2 CoresPerSocket=16 ThreadsPerCore=1 RealMemory=128000 Weight=1 Feature=cpu State=UNKNOWN" >> "$CONF"
  else
    echo "NodeName=$n NodeAddr=${addrs[$idx]} CPUs=64 Sockets=2 CoresPerSocket=32 ThreadsPerCore=1 RealMemory=512000 Weight=10 Gres=gpu:$t:8 Feature=$t State=UNKNOWN" >> "$CONF"
    echo "NodeName=$n Name=gpu Type=$t File=$GPU_FILES" >> "$D/etc/gres.conf"
  fi
  echo "${addrs[$idx]} $n" >> "$HOSTS"
done
# One partition per GPU type (with a time limit, as sites have) and a default "cpu" partition over
# every node: CPU jobs land on the CPU nodes first and spill over to idle cores of the GPU nodes.
declare -A maxtime=([h800]=2-00:00:00 [h20]=1-00:00:00 [h100]=12:00:00)
for t in $(printf '%s\n' "${types[@]}" | awk '!seen[$0]++'); do
  [ "$t" = cpu ] && continue
  members=""
  for idx in $(seq 0 $((N - 1))); do [ "${types[$idx]}" = "$t" ] && members="$members${members:+,}${names[$idx]}"; done
  echo "PartitionName=$t Nodes=$members Default=NO MaxTime=${maxtime[$t]:-1-00:00:00} State=UP" >> "$CONF"
done
echo "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"

# ------------------------------------------------------------------------------ network
ip link add "$BRIDGE" type bridge
ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for idx in $(seq 0 $((N - 1))); do
  n=${names[$idx]}; ns=$NS_PREFIX$n; veth=hs$idx-$n; veth=${veth:0:15}
  echo "$ns $veth" >> "$D/run/netns.list"
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" addr add "${addrs[$idx]}/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done

# ------------------------------------------------------------------- MariaDB + slurmdbd
if [ "$ACCOUNTING" = 1 ]; then
  # a private, throw-away server: own data folder, TCP on 127.0.0.1 only, no grant tables
  mariadb-install-db --no-defaults --datadir="$D/mysql" --user=root --auth-root-authentication-method=normal \
    --skip-test-db > "$D/log/mariadb-install-db.log" 2>&1 || die "mariadb-install-db failed: see $D/log"
  setsid /usr/sbin/mariadbd --no-defaults --datadir="$D/mysql" --socket="$D/run/mysqld.sock" --port=$DB_PORT \
    --bind-address=127.0.0.1 --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadbd.log" --user=root \
    --skip-grant-tables --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
  for _ in $(seq 300); do mariadb-admin --no-defaults -h127.0.0.1 -P$DB_PORT -uroot ping >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb-admin --no-defaults -h127.0.0.1 -P$DB_PORT -uroot ping >/dev/null 2>&1 || { tail "$D/log/mariadbd.log" >&2; die "mariadbd did not start"; }
  /usr/sbin/slurmdbd
  for _ in $(seq 300); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.1; done
  sacctmgr -n show cluster >/dev/null 2>&1 || { tail "$D/log/slurmdbd.log" >&2; die "slurmdbd did not start"; }
  sacctmgr -i -Q add cluster hpclocal >/dev/null 2>&1 || true
fi

# ----------------------------------------------------------------------------- slurmctld
# Start the controller before the nodes: a slurmd that finds no controller retries only every ~10 s.
/usr/sbin/slurmctld -f "$CONF" -i
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || { tail -20 "$D/log/slurmctld.log" >&2; die "slurmctld did not start"; }

# -------------------------------------------------------------------------------- slurmd
for idx in $(seq 0 $((N - 1))); do
  n=${names[$idx]}
  mkdir -p "$D/spool/$n"
  # nsenter --net, not `ip netns exec`: the latter remounts /sys, which hides /sys/fs/cgroup, and
  # slurmd 22.05 then fails with "Unable to initialize cgroup plugin".
  nsenter --net="/run/netns/$NS_PREFIX$n" unshare --uts --mount --propagation slave \
    sh -c "mount --bind '$HOSTS' /etc/hosts && hostname '$n' && exec /usr/sbin/slurmd -f '$CONF' -N '$n'"
done

deadline=$(( $(date +%s) + START_TIMEOUT ))
while :; do
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)
  [ "$(awk '{print $1}' <<<"$states" | sort -u | wc -l)" = "$N" ] && [ "$(awk '{print $2}' <<<"$states" | sort -u)" = idle ] && break
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sinfo -N -o '%N %T %E' >&2; tail -n 5 "$D"/log/slurmd-*.log >&2
    die "nodes not idle after ${START_TIMEOUT}s"
  fi
  sleep 0.1
done
log "$N nodes idle in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s (accounting=$ACCOUNTING); SLURM_CONF=$CONF"
sinfo -o '%P %a %l %D %T %N %G' >&2
