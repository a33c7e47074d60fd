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
vglogs=
if [ -n "${PARMAP_VALGRIND:-}" ]; then
  # one log per process, workers included (they are forked, so valgrind
  # follows them): their errors count too, not only the parent's
  vglogs=$(mktemp -d)
  runner=(valgrind --quiet --error-exitcode=99 --log-file="$vglogs/%p.log"
          --leak-check=no --track-fds=no "$lua")
fi
out=$(mktemp)
trap 'rm -f "$out"; [ -n "$vglogs" ] && rm -rf "$vglogs"' EXIT
export LUA_PATH="$PWD/lua/?.lua;$PWD/spec/?.lua;;"
export LUA_CPATH="$PWD/$build/?.so;;"
"${runner[@]}" "$busted" \
  -o TAP "$@" ${PARMAP_SPECS:-spec} 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
passed=$(grep -E '^ok [0-9]+' "$out" | grep -vc '# SKIP')
skipped=$(grep -E '^ok [0-9]+' "$out" | grep -c '# SKIP')
failed=$(grep -cE '^not ok [0-9]+' "$out")
if [ -n "$vglogs" ]; then
  # valgrind's reports, but for the deliberate crash of the fault specs
  # (testhelper.c's th_segfault) and its warnings
  vgerrors=$(for f in "$vglogs"/*.log; do
    [ -s "$f" ] && awk '
      function flush() {
        if (n && first !~ /th_segfault/) { printf "%s", block; bad++ }
        n = 0; block = ""; first = ""
      }
      /^==[0-9]+== *$/ { flush(); next }
      /^==[0-9]+== Warning:/ { next }
      { n++; block = block $0 "\n"; if (first == "" && $0 ~ / at 0x/) first = $0 }
      END { flush(); exit bad > 0 }' "$f" || true
  done)
  if [ -n "$vgerrors" ]; then
    echo "$vgerrors" | head -n 200 | sed 's/^/# /'
    echo "# valgrind found errors (above)"
    failed=$((failed + 1))
  fi
fi
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
