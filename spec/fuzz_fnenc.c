/*
** spec/fuzz_fnenc.c: the closure decoder (src/fnenc.c) against mutated
** records, under ASan+UBSan (`make fuzz-fnenc`). src/fnenc.c is built with
** PARMAP_FNENC_FUZZ: a dumped function becomes a stand-in closure with the
** same upvalue count, since lua_load does not verify bytecode (records are
** trusted as code; the framing around the bytecode is what must be safe).
** Seeds: records of the closures below; each is mutated ITERS times (bit
** flips, random bytes, truncations, insertions, deletions, splices) with a
** fixed seed. A mutant decodes or raises "bad closure record"; it must
** never crash, leak or read out of bounds.
*/
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fnenc.h"

static const char *const SEEDS[] = {
    "return function(a, b) return a * b end",
    "local t = {1, 2, x = {y = 'b'}}; local n = 4.5\n"
    "return function() return t, n, #t end",
    "local n = 0; local function inc() n = n + 1 end\n"
    "local function get() return n end\n"
    "return function() return inc, get end",
    "local function fact(k) return k <= 1 and 1 or k * fact(k - 1) end\n"
    "return fact",
    "local t = {v = 7}; t.self = t; t.get = function() return t.v end\n"
    "setmetatable(t, {__index = t})\n"
    "return function() return t end",
    "FUZZ_G = {k = 1}; function fuzz_h(x) return x end\n"
    "local fmt = string.format\n"
    "return function(x) return fmt('%d', fuzz_h(FUZZ_G.k + x)) end",
};

static unsigned long long rng = 88172645463325252ull;
static unsigned rnd(unsigned n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return n ? (unsigned)(rng % n) : 0;
}

static int decode(lua_State *L) {
  size_t n;
  const char *s = lua_tolstring(L, 1, &n);
  parmap_fn_decode(L, s, n);
  return 1;
}

int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 20000, i, ok = 0, bad = 0;
  size_t k;
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  for (k = 0; k < sizeof SEEDS / sizeof *SEEDS; k++) {
    size_t n;
    const char *rec;
    char *m;
    if (luaL_dostring(L, SEEDS[k])) {
      fprintf(stderr, "seed %zu: %s\n", k, lua_tostring(L, -1));
      return 1;
    }
    parmap_fn_encode(L, -1, "fn");
    rec = lua_tolstring(L, -1, &n);
    m = (char *)malloc(2 * n + 16);
    for (i = 0; i < iters; i++) {
      size_t len = n, j, nm = 1 + rnd(4);
      memcpy(m, rec, n);
      for (j = 0; j < nm; j++) {
        size_t at = len ? rnd((unsigned)len) : 0;
        switch (rnd(6)) {
          case 0: if (len) m[at] ^= (char)(1 << rnd(8)); break;
          case 1: if (len) m[at] = (char)rnd(256); break;
          case 2: len = at; break;
          case 3: if (len < 2 * n) { memmove(m + at + 1, m + at, len - at); m[at] = (char)rnd(256); len++; } break;
          case 4: if (len) { memmove(m + at, m + at + 1, len - at - 1); len--; } break;
          default: if (len) m[at] = (char)(rnd(2) ? 0x7f : rnd(16)); break;
        }
      }
      lua_pushcfunction(L, decode);
      lua_pushlstring(L, m, len);
      if (lua_pcall(L, 1, 1, 0) == LUA_OK) ok++;
      else bad++;
      lua_pop(L, 1);
      if ((i & 1023) == 0) lua_gc(L, LUA_GCCOLLECT, 0);
    }
    free(m);
    lua_pop(L, 2);
  }
  lua_close(L);
  printf("fuzz_fnenc: %ld mutants decoded, %ld refused, no crash\n", ok, bad);
  return 0;
}
