#!/usr/bin/env bash
# bench/cluster.sh: bench/mpi.lua across the simulated hosts of
# .ci/cluster.sh (root): rank 0 and the fork backend on node1, the agent on
# node2, so the MPI rows go over TCP on the hosts' bridge. Brings its own
# cluster up (PARMAP_CLUSTER_NAME, default "bench") and always down.
#   BENCH_RUNS=7 BENCH_CASES=3 bash bench/cluster.sh [extra mpirun flags]
# PARMAP_MPI_BIN: another parmap-mpi (a build to compare).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 1
export PARMAP_CLUSTER_NAME=${PARMAP_CLUSTER_NAME:-bench}
cl="$repo/.ci/cluster.sh"
trap 'bash "$cl" down' EXIT
trap 'exit 130' INT TERM
make --no-print-directory WERROR=-Werror all mpi >/dev/null || exit 1
bash "$cl" up >/dev/null || exit 1
BENCH_RUNS=${BENCH_RUNS:-7} BENCH_CASES=${BENCH_CASES:-} \
  bash "$cl" mpirun --allow-run-as-root --bind-to none -x BENCH_RUNS -x BENCH_CASES \
  "$@" -n 2 "${PARMAP_MPI_BIN:-$repo/build/parmap-mpi}" bench/mpi.lua
