#!/usr/bin/env bash
# bench/profile.sh [table|iter|map ...]: instructions per item on the hot
# path, from callgrind, for the parent (inside core.next / core.collect) and
# the workers (inside parmap_worker_main), by function. Each mode runs with
# 100,000 and 300,000 items; the difference over 200,000 items cancels every
# fixed cost (start-up, forks, the first chunks). Needs valgrind; run from the
# repository root after `make`. Output: bench/out/profile-MODE.txt.
set -eu
cd "$(dirname "$0")/.."
build=${PARMAP_BUILD:-build}
lua=${LUA:-lua5.4}
out=bench/out
mkdir -p "$out"
export LUA_PATH="$PWD/lua/?.lua;;" LUA_CPATH="$PWD/$build/?.so;;"
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(table iter map)

# The flat per-function list of one callgrind file: "count name" lines.
flat() {
  callgrind_annotate --threshold=100 --auto=no "$1" 2>/dev/null | awk '
    /file:function/ { sec = 1; next }
    sec == 1 && /^--/ { sec = 2; next }
    sec == 2 && (/^--/ || /^ *$/) { exit }
    sec == 2 {
      n = $1; gsub(",", "", n)
      name = $0; sub(/^ *[0-9,]+ \([ 0-9.]+%\) +/, "", name)
      sub(/ \[.*\]$/, "", name); sub(/.*:/, "", name); sub(/'"'"'[0-9]+$/, "", name)
      print n, name
    }'
}

for mode in "${modes[@]}"; do
  for n in 100000 300000; do
    d="$out/cg-$mode-$n"
    rm -rf "$d"
    mkdir -p "$d"
    valgrind --tool=callgrind --collect-atstart=no \
      --toggle-collect=parmap_worker_main --toggle-collect=map_next \
      --toggle-collect=map_collect --callgrind-out-file="$d/cg.%p" \
      "$lua" bench/profile_case.lua "$mode" "$n" >/dev/null 2>&1
  done
  {
    for role in parent workers; do
      for n in 100000 300000; do
        # the lowest pid is the parent
        files=$(ls "$out/cg-$mode-$n"/cg.* | sort -t. -k2 -n)
        if [ $role = parent ]; then files=$(echo "$files" | head -1)
        else files=$(echo "$files" | tail -n +2); fi
        for f in $files; do flat "$f" | sed "s/^/$n /"; done
      done | awk -v role="$role" -v mode="$mode" '
        { c[$3] += ($1 == 300000 ? $2 : -$2) }
        END {
          for (k in c) tot += c[k] / 200000
          printf "%s %s: %.0f instructions per item\n", mode, role, tot
          fflush()
          for (k in c) { v = c[k] / 200000; if (v >= 3) printf "%7.0f  %s\n", v, k | "sort -rn" }
          close("sort -rn")
          print ""
        }'
    done
  } | tee "$out/profile-$mode.txt"
done
