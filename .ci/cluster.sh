#!/usr/bin/env bash
# .ci/cluster.sh: a simulated cluster of 3 hosts on this machine (root).
#   up | down                 make / remove it (down kills every process in it)
#   exec HOST cmd...          run cmd on HOST (node1..node3) as a login would
#   mpirun args...            Open MPI's mpirun on node1, across the hosts
#   kill HOST                 kill every process of HOST (the host is lost)
#   cut HOST | mend HOST      ip link set eth0 down / up inside HOST
#   stop-agent HOST | cont-agent HOST   SIGSTOP / SIGCONT HOST's parmap-mpi agent
#   procs HOST                the pids and command lines left on HOST
#   check                     up, the MPI specs across it, the host-failure
#                             specs, down (always: also on failure or Ctrl-C)
# Each host is a network, UTS, mount and IPC namespace (hostname nodeK, its
# own /tmp, /etc/hosts naming the hosts), held by one `sleep` process; its
# eth0 (10.77.0.K/24) is a veth into a bridge that lives in a namespace of
# its own with no other link: no traffic leaves, no route or NAT is added
# to this machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# PARMAP_CLUSTER_NAME keeps two clusters on one machine apart (its state
# directory and namespace names); PARMAP_CLUSTER_STATE overrides the state.
NAME=${PARMAP_CLUSTER_NAME:-}
STATE=${PARMAP_CLUSTER_STATE:-/run/parmap-cluster${NAME:+-$NAME}}
HOSTS="node1 node2 node3"
NS=pmc${NAME:+-$NAME}
BR=$NS-bridge

die() { echo "cluster.sh: $*" >&2; exit 1; }
holder() { cat "$STATE/$1.pid" 2>/dev/null || die "no host $1 (cluster.sh up)"; }
uts_of() { readlink "/proc/$1/ns/uts" 2>/dev/null; }

# every pid in HOST's namespaces (but its holder, unless $2 = all)
host_pids() {
  local h p ns me
  h=$(holder "$1") || return 1
  ns=$(uts_of "$h")
  [ -n "$ns" ] || return 0
  me=$$
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$h" ] && [ "${2:-}" != all ] && continue
    [ "$p" = "$me" ] && continue
    [ "$(uts_of "$p")" = "$ns" ] && echo "$p"
  done
}

up() {
  command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
    || die "needs ip (iproute2), nsenter and unshare (util-linux)"
  [ "$(id -u)" = 0 ] || die "needs root"
  [ -e "$STATE/up" ] && down
  mkdir -p "$STATE/shared"
  chmod 1777 "$STATE/shared"
  {
    echo "127.0.0.1 localhost"
    for k in 1 2 3; do echo "10.77.0.$k node$k"; done
  } > "$STATE/hosts"
  printf '%s slots=1\n' $HOSTS > "$STATE/hostfile"
  ip netns add $BR || die "ip netns add failed"
  ip -n $BR link add br0 type bridge
  ip -n $BR link set lo up
  ip -n $BR link set br0 up
  for k in 1 2 3; do
    local h=node$k ns=$NS-node$k
    ip netns add $ns
    ip -n $BR link add "v$k" type veth peer name eth0 netns $ns
    ip -n $BR link set "v$k" master br0 up
    ip -n $ns addr add "10.77.0.$k/24" dev eth0
    ip -n $ns link set lo up
    ip -n $ns link set eth0 up
    rm -f "$STATE/$h.pid"
    # the host: its own hostname, /tmp and /etc/hosts, kept by a sleep
    # (in a subshell: no job of this shell, whose end down reports)
    # A checkout under /tmp (a CI clone may be one) stays visible there:
    # bound aside before the private /tmp hides it, then bound back.
    local keep=: back=:
    case "$repo/" in /tmp/*)
      mkdir -p "$STATE/repo-$h"
      keep="mount --bind '$repo' '$STATE/repo-$h'"
      back="mkdir -p '$repo' && mount --bind '$STATE/repo-$h' '$repo'" ;;
    esac
    (setsid ip netns exec $ns unshare --uts --mount --ipc --propagation private \
      sh -c "hostname $h && $keep && mount -t tmpfs -o size=512m tmpfs /tmp &&
             $back && mount --bind '$STATE/hosts' /etc/hosts &&
             echo \$\$ > '$STATE/$h.pid' && exec sleep infinity" \
      </dev/null >/dev/null 2>&1 &)
  done
  for h in $HOSTS; do
    for _ in $(seq 100); do [ -s "$STATE/$h.pid" ] && break; sleep 0.1; done
    [ -s "$STATE/$h.pid" ] || { down; die "host $h did not come up"; }
  done
  touch "$STATE/up"
  echo "cluster up: $(for h in $HOSTS; do printf '%s=%s ' $h "$(in_host $h hostname)"; done)"
}

down() {
  local h pids k
  for h in $HOSTS; do
    [ -s "$STATE/$h.pid" ] || continue
    pids=$(host_pids $h all)
    [ -n "$pids" ] && kill -CONT $pids 2>/dev/null
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    rm -f "$STATE/$h.pid"
  done
  for k in 1 2 3; do ip netns del $NS-node$k 2>/dev/null; done
  ip netns del $BR 2>/dev/null
  rm -rf "$STATE"
  return 0
}

# run a command in HOST's namespaces, with a login's environment (as ssh
# would give: not this shell's)
in_host() {
  local h=$1; shift
  local pid; pid=$(holder "$h") || exit 1
  nsenter -t "$pid" --net --uts --mount --ipc -- \
    env -i HOME="${HOME:-/root}" USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# The flags that make Open MPI's mpirun use the simulated hosts: rank r on
# host r + 1, this script as its rsh agent, TCP on the bridge only; and
# the daemons' keepalive, which notices a cut link in ~6 s (the default:
# 300 s + 9 x 20 s), before parmap's bound: once mpirun has sent a cut
# daemon anything (an abort), it waits on TCP's retransmissions instead.
MPI_FLAGS="--hostfile $STATE/hostfile --mca plm_rsh_agent $here/cluster-rsh
  --mca plm_rsh_no_tree_spawn 1 --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24
  --mca oob_tcp_if_include 10.77.0.0/24 --mca btl_vader_single_copy_mechanism none
  --mca oob_tcp_keepalive_time 3 --mca oob_tcp_keepalive_intvl 1 --mca oob_tcp_keepalive_probes 3"

cluster_mpirun() {
  # mpirun's own environment is this one (the specs' LUA_PATH ...), on node1
  local pid; pid=$(holder node1) || exit 1
  # shellcheck disable=SC2086
  exec nsenter -t "$pid" --net --uts --mount --ipc --wd="$PWD" -- \
    mpirun $MPI_FLAGS "$@"
}

agent_pid() { # the parmap-mpi whose parent is orted, on HOST
  local p
  for p in $(host_pids "$1"); do
    [ "$(cat /proc/$p/comm 2>/dev/null)" = parmap-mpi ] || continue
    [ "$(cat /proc/$(awk '{print $4}' /proc/$p/stat 2>/dev/null)/comm 2>/dev/null)" = orted ] && echo "$p"
  done
}

check() {
  cd "$repo" || exit 1
  local runner=
  trap 'down' EXIT
  # the specs run in a session of their own, killed whole on Ctrl-C or
  # TERM (busted would go on, and mpirun waits for a second Ctrl-C)
  trap '[ -n "$runner" ] && kill -KILL -- -"$runner" 2>/dev/null; exit 130' INT TERM
  up || exit 1
  local st=0
  make --no-print-directory WERROR=-Werror all testhelper mpi >/dev/null || exit 1
  # the MPI specs, rank r on host r + 1; then the host failures
  PARMAP_CLUSTER="$here/cluster.sh" PARMAP_MPI_BIN="$repo/build/parmap-mpi" \
    MPIRUN="$here/cluster.sh mpirun" MPIRUN_FLAGS="--allow-run-as-root --bind-to none" \
    PARMAP_SPEC_SHARED="$STATE/shared" CI="${CI:-1}" \
    PARMAP_SPECS="spec/mpi_backend_spec.lua spec/mpi_trust_spec.lua spec/mpi_liveness_spec.lua spec/mpi_retry_spec.lua spec/mpi_journal_spec.lua spec/cluster_spec.lua" \
    setsid bash spec/run.sh "${BUSTED:-busted}" ${BUSTED_FLAGS:-} &
  runner=$!
  wait "$runner"
  st=$?
  runner=
  for h in $HOSTS; do
    local left; left=$(host_pids $h)
    [ -n "$left" ] && { echo "# processes left on $h:"; ps -o pid,args -p $left | sed 's/^/# /'; }
  done
  return "$st"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up) up ;;
  down) down ;;
  exec) h=$1; shift; in_host "$h" "$@" ;;
  mpirun) cluster_mpirun "$@" ;;
  kill) pids=$(host_pids "$1"); [ -n "$pids" ] && kill -KILL $pids; true ;;
  cut) ip -n "$NS-${1}" link set eth0 down ;;
  mend) ip -n "$NS-${1}" link set eth0 up ;;
  stop-agent) p=$(agent_pid "$1"); [ -n "$p" ] || die "no agent on $1"; kill -STOP $p; echo "$p" ;;
  cont-agent) p=$(agent_pid "$1"); [ -n "$p" ] && kill -CONT $p; true ;;
  procs) for p in $(host_pids "$1"); do echo "$p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)"; done ;;
  check) check ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
