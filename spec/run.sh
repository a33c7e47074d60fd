#!/usr/bin/env bash
# spec/run.sh [busted] [busted options...]: run the specs with Lua 5.4 and
# end with the line "N passed, N failed" counted from busted's TAP output.
# PARMAP_BUILD picks the build directory (build-asan for the ASan build),
# PARMAP_VALGRIND=1 runs the whole suite under valgrind; PARMAP_SPECS picks
# spec files or directories (default: spec).
set -u
cd "$(dirname "$0")/.."
build=${PARMAP_BUILD:-build}
lua=${LUA:-lua5.4}
busted=$(command -v "${1:-busted}") || { echo "busted not found"; echo "0 passed, 1 failed"; exit 1; }
[ $# -gt 0 ] && shift
runner=("$lua")
if [ -n "${PARMAP_VALGRIND:-}" ]; then
  runner=(valgrind --quiet --error-exitcode=99 --child-silent-after-fork=yes
          --leak-check=no --track-fds=no "$lua")
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
export LUA_PATH="$PWD/lua/?.lua;$PWD/spec/?.lua;;"
export LUA_CPATH="$PWD/$build/?.so;;"
"${runner[@]}" "$busted" \
  -o TAP "$@" ${PARMAP_SPECS:-spec} 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
passed=$(grep -E '^ok [0-9]+' "$out" | grep -vc '# SKIP')
skipped=$(grep -E '^ok [0-9]+' "$out" | grep -c '# SKIP')
failed=$(grep -cE '^not ok [0-9]+' "$out")
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
  echo "# busted exited with status $status"
  failed=1
fi
if [ "$skipped" != 0 ]; then
  echo "$passed passed, $failed failed, $skipped skipped"
else
  echo "$passed passed, $failed failed"
fi
[ "$failed" = 0 ]
