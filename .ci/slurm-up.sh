#!/usr/bin/env bash
# .ci/slurm-up.sh: a one-node Slurm on this machine, for trying parmap-mpi
# under srun/sbatch by hand (CI does not run it). Idempotent: installs
# slurm-wlm and munge if missing, writes /etc/slurm/slurm.conf and
# cgroup.conf if absent (or if SLURM_UP_FORCE=1), starts munged, slurmctld
# and slurmd (as root) unless they run, and waits until sinfo shows the node
# idle. Everything on localhost; NodeName is this host's short name, CPUs
# are nproc's. Processes are tracked without cgroups (proctrack/linuxproc)
# and bound to their CPUs by task/affinity, as on a cluster: `srun -n 3`
# on 2 CPUs needs -O (--overcommit), and then shares ONE CPU unless -c 2.
# Stop it: .ci/slurm-up.sh stop (kills the three daemons by their pid
# files).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
RUN=/run/slurm-up            # pid files
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOG=/var/log/slurm

pidfile() { if [ "$1" = munged ]; then echo /run/munge/munged.pid; else echo "$RUN/$1.pid"; fi; }
pidalive() { local f; f=$(pidfile "$1"); [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
stop() {  # stop these daemons (by their pid files) and wait until gone
  local f pid
  for f in "$@"; do
    pidalive "$f" || continue
    pid=$(cat "$(pidfile "$f")")
    $SUDO kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped $f"
  done
}

if [ "${1:-}" = stop ]; then
  stop slurmd slurmctld munged
  exit 0
fi

# 1. packages (openmpi/mpich for the parmap-mpi builds, slurm-wlm + munge)
missing=""
for p in slurm-wlm munge openmpi-bin libopenmpi-dev mpich libmpich-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
# shellcheck disable=SC2086
[ -z "$missing" ] || sh .ci/apt-install $missing

# 2. configuration
$SUDO mkdir -p /etc/slurm "$RUN" "$STATE" "$SPOOL" "$LOG"
if [ ! -f "$CONF" ] || [ "${SLURM_UP_FORCE:-0}" = 1 ]; then
  $SUDO tee "$CONF" >/dev/null <<EOF
# written by parmap's .ci/slurm-up.sh: one node on localhost, all as root
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
InactiveLimit=0
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  echo "wrote $CONF"
  stop slurmd slurmctld  # started again below, with it
fi
if [ ! -f /etc/slurm/cgroup.conf ] || [ "${SLURM_UP_FORCE:-0}" = 1 ]; then
  # Not used for tracking or confinement (proctrack/linuxproc, task/none:
  # a container's cgroups are not Slurm's to manage), but slurmd 22.05
  # loads a cgroup plugin anyway ("disabled" comes only in 23.x).
  cg=cgroup/v1
  [ -f /sys/fs/cgroup/cgroup.controllers ] && cg=cgroup/v2
  printf 'CgroupPlugin=%s\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' "$cg" |
    $SUDO tee /etc/slurm/cgroup.conf >/dev/null
fi

# 3. munge
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mkdir -p /etc/munge
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
$SUDO chmod 0400 /etc/munge/munge.key
$SUDO chmod 0755 /run/munge
if ! pidalive munged; then
  if [ -z "$SUDO" ]; then runuser -u munge -- /usr/sbin/munged; else sudo -u munge /usr/sbin/munged; fi
  echo "started munged"
fi
munge -n | unmunge >/dev/null

# 4. slurmctld, slurmd
if ! pidalive slurmctld; then
  $SUDO /usr/sbin/slurmctld
  echo "started slurmctld"
fi
if ! pidalive slurmd; then
  $SUDO /usr/sbin/slurmd
  echo "started slurmd"
fi

# 5. wait for the node to be idle (60 s at most)
for _ in $(seq 1 120); do
  st=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  case "$st" in
    idle*|mix*|alloc*) sinfo; exit 0 ;;
    down*|drain*) $SUDO scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
echo "slurm-up: node $NODE not idle after 60 s (state: ${st:-none}); see $LOG/" >&2
sinfo >&2 || true
exit 1
