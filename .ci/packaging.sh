#!/usr/bin/env bash
# .ci/packaging.sh: the three ways to install parmap, each checked on this
# machine, offline (no rocks server is reachable):
#   (a) make install PREFIX=... (and DESTDIR=...), the smoke spec against
#       that prefix alone, make uninstall leaves no file behind;
#   (b) luarocks make of the scm rockspec into a tree, the smoke spec
#       against it; luarocks lint of both rockspecs; luarocks pack of the
#       release rockspec into a .src.rock (from a local git+file:// copy of
#       the sources, tagged v<version>, since the real URL cannot be
#       fetched here), and luarocks build of that .src.rock, smoke-tested;
#   (c) examples/host.c compiled against the installed libparmap.a and
#       parmap.h, run with and without a SIGCHLD handler.
# Installs what it needs with apt-get (root or sudo). Every check and every
# smoke spec test counts; the last line is "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
lua=lua5.4
pass=0 fail=0

ok() { echo "ok - $*"; pass=$((pass + 1)); }
notok() { echo "not ok - $*"; fail=$((fail + 1)); }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log=$tmp/log

# check NAME CMD...: run CMD, quietly unless it fails.
check() {
  local what=$1; shift
  if "$@" >"$log" 2>&1; then
    ok "$what"
  else
    notok "$what"
    tail -n 40 "$log" | sed 's/^/#   /'
  fi
}

# ---------------------------------------------------------------- setup

need=""
command -v $lua >/dev/null 2>&1 || need="$need lua5.4"
command -v pkg-config >/dev/null 2>&1 || need="$need pkg-config"
[ -f /usr/include/lua5.4/lua.h ] || need="$need liblua5.4-dev"
command -v busted >/dev/null 2>&1 || need="$need lua-busted"
command -v luarocks >/dev/null 2>&1 || need="$need luarocks"
command -v git >/dev/null 2>&1 || need="$need git"
command -v zip >/dev/null 2>&1 || need="$need zip"
command -v unzip >/dev/null 2>&1 || need="$need unzip"
command -v cc >/dev/null 2>&1 || need="$need gcc"
command -v make >/dev/null 2>&1 || need="$need make"
sh .ci/apt-install $need | sed 's/^/# /'
busted=$(command -v busted) || { echo "busted not found"; echo "0 passed, 1 failed"; exit 1; }
# luarocks keeps its own state in $HOME; keep CI's out of the real one
export HOME=$tmp/home
mkdir -p "$HOME"
rocks() { luarocks --lua-version=5.4 "$@"; }

# A copy of the working tree without build output or git metadata.
src=$tmp/src
mkdir -p "$src"
tar --exclude='./build' --exclude='./build-*' --exclude='./.git' -cf - . | tar -xf - -C "$src"

# smoke NAME LUADIR CDIR: the smoke spec with only that tree on the paths
# (plus the system's, for busted itself: the spec checks that parmap comes
# from the tree). Run from an empty directory: the repo's .busted would put
# lua/ first on the path.
smoke() {
  local what=$1 ldir=$2 cdir=$3 out=$tmp/smoke.tap st
  mkdir -p "$tmp/run"
  ( cd "$tmp/run" &&
    PARMAP_TREE_LUA=$ldir PARMAP_TREE_C=$cdir \
    LUA_PATH="$ldir/?.lua;$ldir/?/init.lua;;" LUA_CPATH="$cdir/?.so;;" \
    $lua "$busted" -o TAP "$repo/spec/installed/smoke.lua" ) >"$out" 2>&1
  st=$?
  sed "s/^\(not \)\{0,1\}ok [0-9]* - /&[$what] /" "$out"
  local p f
  p=$(grep -cE '^ok [0-9]+' "$out")
  f=$(grep -cE '^not ok [0-9]+' "$out")
  pass=$((pass + p)); fail=$((fail + f))
  if [ "$st" != 0 ] && [ "$f" = 0 ]; then notok "$what: busted exited with status $st"; fi
  if [ "$p" = 0 ] && [ "$f" = 0 ]; then notok "$what: the smoke spec ran no test"; fi
}

# files_under DIR: the files and links left under DIR, one a line.
files_under() { [ -d "$1" ] && find "$1" \( -type f -o -type l \) | sort; }

host_expected="101 104 109 116 125 136 149 164 181 200
B"

# ---------------------------------------------------------------- (a) make install

echo "# (a) make install"
prefix=$tmp/prefix
check "make install PREFIX=$prefix" make --no-print-directory install PREFIX="$prefix"
for f in share/lua/5.4/parmap.lua share/lua/5.4/parmap/process.lua \
         share/lua/5.4/parmap/progress.lua \
         lib/lua/5.4/parmap/core.so lib/libparmap.a include/parmap.h; do
  check "make install installed $f" test -f "$prefix/$f"
done
smoke "make install" "$prefix/share/lua/5.4" "$prefix/lib/lua/5.4"

stage=$tmp/stage
check "make install PREFIX=/opt/parmap DESTDIR=$stage" \
  make --no-print-directory install PREFIX=/opt/parmap DESTDIR="$stage"
check "DESTDIR install puts everything under DESTDIR/PREFIX" \
  bash -c "[ \"\$(find '$stage' -mindepth 1 -maxdepth 2 | sort)\" = '$stage/opt
$stage/opt/parmap' ] && [ \"\$(cd '$prefix' && find . -type f | sort)\" = \"\$(cd '$stage/opt/parmap' && find . -type f | sort)\" ]"
smoke "make install DESTDIR" "$stage/opt/parmap/share/lua/5.4" "$stage/opt/parmap/lib/lua/5.4"
check "make uninstall PREFIX=/opt/parmap DESTDIR=$stage" \
  make --no-print-directory uninstall PREFIX=/opt/parmap DESTDIR="$stage"
check "make uninstall (DESTDIR) leaves no file behind" \
  bash -c "[ -z \"\$(find '$stage' \\( -type f -o -type l \\))\" ] && [ ! -e '$stage/opt/parmap/share/lua/5.4/parmap' ] && [ ! -e '$stage/opt/parmap/lib/lua/5.4/parmap' ]"

check "make LUA_INCDIR=/usr/include/lua5.4 PKG_CONFIG=false builds" \
  make --no-print-directory BUILD="$tmp/build-incdir" LUA_INCDIR=/usr/include/lua5.4 \
    PKG_CONFIG=false all hosts

# ---------------------------------------------------------------- (c) a C host

echo "# (c) a C host against the installed library"
check "examples/host.c compiles against $prefix/include and $prefix/lib" \
  cc -std=c99 -Wall -Wextra -Werror -O2 -o "$tmp/host" "$src/examples/host.c" \
    -I"$prefix/include" $(pkg-config --cflags lua5.4) \
    -L"$prefix/lib" -lparmap $(pkg-config --libs lua5.4) -lm -ldl -pthread
check "the installed host maps a closure with no module file on disk" \
  bash -c "out=\$(cd '$tmp' && LUA_PATH= LUA_CPATH= '$tmp/host') && [ \"\$out\" = '$host_expected' ] || { echo \"got: \$out\"; false; }"
check "the installed host with a SIGCHLD handler reaping waitpid(-1): no hang, no lost result" \
  bash -c "out=\$(cd '$tmp' && timeout 300 '$tmp/host' --sigchld '$src/examples/host_sigchld.lua') && echo \"\$out\" && [ \"\$(echo \"\$out\" | tail -n 1)\" = 'host: ok' ]"

check "make uninstall PREFIX=$prefix" make --no-print-directory uninstall PREFIX="$prefix"
check "make uninstall leaves no file behind" \
  bash -c "left=\$(find '$prefix' \\( -type f -o -type l \\)); [ -z \"\$left\" ] || { echo \"\$left\"; false; }"

# ---------------------------------------------------------------- (b) luarocks

echo "# (b) luarocks"
tree=$tmp/tree
check "luarocks make rockspec/parmap-scm-1.rockspec --tree $tree" \
  bash -c "cd '$src' && luarocks --lua-version=5.4 make rockspec/parmap-scm-1.rockspec --tree '$tree'"
smoke "luarocks make" "$tree/share/lua/5.4" "$tree/lib/lua/5.4"
check "luarocks remove leaves no module behind" \
  bash -c "luarocks --lua-version=5.4 remove parmap --tree '$tree' && [ -z \"\$(find '$tree/share' '$tree/lib/lua' -type f 2>/dev/null)\" ]"

for spec in rockspec/parmap-scm-1.rockspec rockspec/parmap-0.1.0-1.rockspec; do
  check "luarocks lint $spec" rocks lint "$spec"
done
# rockspec_get FILE EXPR: EXPR evaluated in the rockspec's variables.
rockspec_get() {
  $lua - "$1" "$2" <<'EOF'
local env = {}
assert(loadfile(arg[1], "t", env))()
print(assert(load("return " .. arg[2], "=expr", "t",
  setmetatable(env, { __index = _G })))())
EOF
}
core_src=$(make -s --no-print-directory print-core-src)
for spec in rockspec/parmap-scm-1.rockspec rockspec/parmap-0.1.0-1.rockspec; do
  check "$spec builds parmap.core from the Makefile's CORE_SRC" \
    test "$(rockspec_get "$spec" 'table.concat(build.modules["parmap.core"].sources, " ")')" = "$core_src"
done

# luarocks pack fetches source.url: here a git+file:// copy of the sources,
# tagged as the release would be.
version=$(rockspec_get rockspec/parmap-0.1.0-1.rockspec version)
gitsrc=$tmp/git/parmap
mkdir -p "$gitsrc" "$tmp/pack"
tar --exclude='./build' --exclude='./build-*' --exclude='./.git' -cf - . | tar -xf - -C "$gitsrc"
check "a local git copy tagged v${version%-*}" bash -c "cd '$gitsrc' && git init -q && git add -A &&
  git -c user.name=ci -c user.email=ci@localhost commit -qm 'parmap ${version%-*}' && git tag 'v${version%-*}'"
sed "s|^   url = .*|   url = \"git+file://$gitsrc\",|" rockspec/parmap-0.1.0-1.rockspec \
  >"$tmp/pack/parmap-$version.rockspec"
check "luarocks pack parmap-$version.rockspec makes parmap-$version.src.rock" \
  bash -c "cd '$tmp/pack' && luarocks --lua-version=5.4 pack 'parmap-$version.rockspec' && test -s 'parmap-$version.src.rock'"
tree2=$tmp/tree2
check "luarocks build parmap-$version.src.rock --tree $tree2" \
  bash -c "cd '$tmp/pack' && luarocks --lua-version=5.4 build 'parmap-$version.src.rock' --tree '$tree2'"
smoke "luarocks build .src.rock" "$tree2/share/lua/5.4" "$tree2/lib/lua/5.4"

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
