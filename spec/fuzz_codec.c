/*
** fuzz_codec.c: a libFuzzer target for the value decoder (src/codec.c).
** The decoder reads what workers send: it must turn any byte string into
** values or a clean PARMAP_ECORRUPT, never crash, over-read, recurse or
** leave its scratch table dirty.
**
**   make fuzz [FUZZ_TIME=60]      run it on spec/corpus (clang, ASan+UBSan)
**
** For every input: decode records one after another from the start (as
** the parent reads a slot), and for each record that decodes, encode its
** values again and decode that (it must round-trip to the same count and
** length); the one-scalar fast path must agree with the general decoder,
** and parmap_skip must end every record the decoder takes where it does.
**
** Built with -DPARMAP_FUZZ_SEEDS instead, it is a program that writes the
** seed corpus: `fuzz_seeds DIR` (see spec/corpus/README). Built with
** -DPARMAP_FUZZ_REPLAY, a program that runs the target once on each file
** named (`make fuzz-replay`: the corpus under gcc's ASan+UBSan, no clang).
*/
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "codec.h"

#define SCRATCH 1

static void check(int ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "fuzz_codec: %s\n", what);
    abort();
  }
}

static void scratch_empty(lua_State *L) {
  lua_pushnil(L);
  check(lua_next(L, SCRATCH) == 0, "the scratch table was left dirty");
}

static int same_scalar(lua_State *L, int a, int b) {
  if (lua_type(L, a) == LUA_TNUMBER && lua_type(L, b) == LUA_TNUMBER &&
      !lua_isinteger(L, a) && !lua_isinteger(L, b)) {
    double x = (double)lua_tonumber(L, a), y = (double)lua_tonumber(L, b);
    return (isnan(x) && isnan(y)) || memcmp(&x, &y, sizeof x) == 0;
  }
  return lua_rawequal(L, a, b);
}

/* Decode, re-encode, decode again: the n values at top - n + 1. */
static void round_trip(lua_State *L, int n) {
  parmap_buf b = PARMAP_BUF_INIT;
  const char *what = NULL, *err = NULL;
  int first = lua_gettop(L) - n + 1, m;
  size_t q = 0;
  check(parmap_encode(L, first, n, &b, SCRATCH, &what) == PARMAP_OK,
        "decoded values do not encode");
  scratch_empty(L);
  m = parmap_decode(L, b.p, b.len, &q, SCRATCH, &err);
  check(m == n, "a re-encoded record decodes to another count");
  check(q == b.len, "a re-encoded record decodes to another length");
  scratch_empty(L);
  parmap_buf_free(&b);
}

static int one_input(lua_State *L) {
  const char *p = (const char *)lua_touserdata(L, 2);
  size_t len = (size_t)lua_tointeger(L, 3), pos = 0, spos = 0;
  int top;
  lua_settop(L, 1); /* the scratch table */
  top = lua_gettop(L);
  /* the fast path and the general decoder agree */
  if (parmap_decode_scalar(L, p, len, &spos) == 1) {
    const char *err = NULL;
    size_t gpos = 0;
    check(parmap_decode(L, p, len, &gpos, SCRATCH, &err) == 1,
          "the scalar fast path took what the decoder refuses");
    check(gpos == spos, "the scalar fast path ends elsewhere");
    check(same_scalar(L, top + 1, top + 2), "the scalar fast path differs");
    lua_settop(L, top);
  }
  check(spos == 0 || spos <= len, "the fast path moved past the end");
  while (pos < len) {
    const char *err = NULL;
    size_t before = pos, kpos = pos;
    int skipped = parmap_skip(p, len, &kpos) == 0;
    int n = parmap_decode(L, p, len, &pos, SCRATCH, &err);
    scratch_empty(L);
    /* the MPI agent's skip (it relays records unread) ends where the
       decoder does on every record the decoder takes */
    check(skipped ? kpos > before && kpos <= len : kpos == before,
          "parmap_skip moved wrongly");
    if (n >= 0)
      check(skipped && kpos == pos, "parmap_skip ends elsewhere than the decoder");
    if (n < 0) {
      check(err != NULL, "an error without a reason");
      check(pos == before, "a failed decode moved the position");
      check(lua_gettop(L) == top, "a failed decode left values");
      break;
    }
    check(pos > before && pos <= len, "a decode did not move forward");
    check(lua_gettop(L) == top + n, "a decode pushed another count");
    round_trip(L, n);
    lua_settop(L, top);
  }
  return 0;
}

static lua_State *state(void) {
  static lua_State *L = NULL;
  if (L == NULL) {
    L = luaL_newstate();
    check(L != NULL, "no Lua state");
    luaL_openlibs(L);
  }
  return L;
}

#ifndef PARMAP_FUZZ_SEEDS

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = state();
  lua_settop(L, 0);
  lua_pushcfunction(L, one_input);
  lua_newtable(L); /* scratch */
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)size);
  /* a Lua error (out of memory) is fine; a crash or an abort is not */
  lua_pcall(L, 3, 0, 0);
  lua_settop(L, 0);
  return 0;
}

#ifdef PARMAP_FUZZ_REPLAY
int main(int argc, char **argv) {
  int i;
  for (i = 1; i < argc; i++) {
    FILE *f = fopen(argv[i], "rb");
    char *p;
    long n;
    check(f != NULL, argv[i]);
    check(fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0, argv[i]);
    rewind(f);
    p = (char *)malloc((size_t)n + 1);
    check(p != NULL && fread(p, 1, (size_t)n, f) == (size_t)n, argv[i]);
    fclose(f);
    LLVMFuzzerTestOneInput((const uint8_t *)p, (size_t)n);
    free(p);
    printf("ok %d - %s\n", i, argv[i]);
  }
  printf("%d passed, 0 failed\n", argc - 1);
  return 0;
}
#endif

#else /* the seed writer */

static const char *const seeds[] = {
    "return 1",
    "return 127, 128, -1, 0",
    "return nil, true, false",
    "return math.maxinteger, math.mininteger, 2^63, -0.0, 1/0, -1/0, 0/0, 1.5",
    "return 'abc', '', string.rep('x', 300), 'nul\\0byte'",
    "return {}",
    "return {1, 2, 3}",
    "return {1, nil, 3, n = 3}",
    "return {a = 1, [true] = 2, [1.5] = 3, [-7] = 4, [math.huge] = 5}",
    "local t = {} t.self = t return t",
    "local s = {} return {s, s, x = s}",
    "local a = {} return a, a, {a}",
    "return {[{}] = 1, [{2}] = {3}}",
    "local t = {} for i = 1, 40 do t = {t, i} end return t",
    "local t = {} for i = 1, 200 do t[i] = i * 1.5 end return t",
    "return {{{{{'deep'}}}}}, {x = {y = {z = {}}}}",
    "local e = {} return 'error', e, 'message', 'stack traceback:', 12345",
};

static void put(const char *dir, const char *name, const char *p, size_t n) {
  char path[512];
  FILE *f;
  snprintf(path, sizeof path, "%s/%s", dir, name);
  f = fopen(path, "wb");
  check(f != NULL, path);
  check(fwrite(p, 1, n, f) == n, "short write");
  fclose(f);
}

int main(int argc, char **argv) {
  lua_State *L = state();
  size_t i;
  check(argc == 2, "usage: fuzz_seeds DIR");
  for (i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
    parmap_buf b = PARMAP_BUF_INIT, all = PARMAP_BUF_INIT;
    const char *what = NULL;
    char name[64];
    int top, n;
    lua_settop(L, 0);
    lua_newtable(L);
    top = lua_gettop(L);
    check(luaL_dostring(L, seeds[i]) == LUA_OK, seeds[i]);
    n = lua_gettop(L) - top;
    check(parmap_encode(L, top + 1, n, &b, SCRATCH, &what) == PARMAP_OK,
          seeds[i]);
    snprintf(name, sizeof name, "seed-%02u", (unsigned)i);
    put(argv[1], name, b.p, b.len);
    /* two records back to back, and one cut in half */
    check(parmap_buf_reserve(&all, 2 * b.len) == 0, "memory");
    memcpy(all.p, b.p, b.len);
    memcpy(all.p + b.len, b.p, b.len);
    snprintf(name, sizeof name, "seed-%02u-twice", (unsigned)i);
    put(argv[1], name, all.p, 2 * b.len);
    if (b.len > 2) {
      snprintf(name, sizeof name, "seed-%02u-cut", (unsigned)i);
      put(argv[1], name, b.p, b.len / 2);
    }
    /* and the seed passes the target's own checks */
    lua_settop(L, 0);
    lua_pushcfunction(L, one_input);
    lua_newtable(L);
    lua_pushlightuserdata(L, all.p);
    lua_pushinteger(L, (lua_Integer)(2 * b.len));
    check(lua_pcall(L, 3, 0, 0) == LUA_OK, seeds[i]);
    parmap_buf_free(&b);
    parmap_buf_free(&all);
  }
  return 0;
}

#endif
