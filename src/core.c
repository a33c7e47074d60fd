/*
** core.c: luaopen_parmap_core, the C half of parmap. The Lua front module
** (lua/parmap.lua) checks arguments and gives the API its shape; this
** module runs maps (map.c) and offers a few small helpers.
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <lauxlib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "child.h"
#include "engine.h"
#include "fnenc.h"
#include "map.h"
#include "parmap.h"
#include "proc.h"
#include "process.h"
#include "range.h"
#include "spec.h"

/* call(item, index, protect), a closure of core.caller: fn's results for
   one item, following the call table (N = 1). Unprotected, errors
   propagate untouched. Protected, returns
   "ok", results... | "error", err, message, traceback | "shape", message.
   Upvalues: the CallSpec (a userdata), fn, args, kwargs. */
static int core_call(lua_State *L) {
  CallSpec cs = *(const CallSpec *)lua_touserdata(L, lua_upvalueindex(1));
  int n, base, fnpos, protect = lua_toboolean(L, 3);
  lua_Integer index = luaL_checkinteger(L, 2);
  lua_settop(L, 1); /* the item */
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_pushvalue(L, lua_upvalueindex(3));
  lua_pushvalue(L, lua_upvalueindex(4));
  cs.fn = 2;
  cs.args = 3;
  cs.kw = 4;
  if (protect) {
    lua_pushliteral(L, "ok");
    lua_pushcfunction(L, parmap_msgh);
  }
  base = lua_gettop(L);
  n = parmap_push_call(L, &cs, 1, index);
  if (n < 0) {
    if (!protect) return lua_error(L);
    lua_pushliteral(L, "shape");
    lua_insert(L, -2);
    return 2;
  }
  fnpos = lua_gettop(L) - n; /* scratch values may sit below fn */
  if (!protect) {
    lua_call(L, n, LUA_MULTRET);
    return lua_gettop(L) - fnpos + 1;
  }
  if (lua_pcall(L, n, LUA_MULTRET, base) == LUA_OK) {
    lua_pushvalue(L, base - 1); /* "ok" just below the results */
    lua_replace(L, fnpos - 1);   /* fnpos - 1 >= base, the handler */
    return lua_gettop(L) - fnpos + 2;
  }
  parmap_unbox(L, lua_gettop(L)); /* err, message, traceback */
  lua_pushliteral(L, "error");
  lua_replace(L, base - 1);
  lua_remove(L, base); /* the handler */
  return 4;
}

/* core.caller(spec): the call function of spec's fn (star, kwstar, args,
   nargs, has_kw, kwargs as in a map's spec), read and checked once. */
static int core_caller(lua_State *L) {
  CallSpec *cs;
  luaL_checktype(L, 1, LUA_TTABLE);
  cs = (CallSpec *)lua_newuserdatauv(L, sizeof *cs, 0);
  parmap_read_call(L, 1, cs);
  parmap_push_callvalues(L, 1, "fn", cs->nargs);
  lua_pushcclosure(L, core_call, 4);
  return 1;
}

static int core_ncpu(lua_State *L) {
  lua_pushinteger(L, parmap_ncpu());
  return 1;
}

static int core_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)parmap_now_ns() / 1e9);
  return 1;
}

static int core_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* termwidth(fd): the terminal's columns (TIOCGWINSZ), else $COLUMNS, else
   80. Cheap enough for every redraw of a progress bar. */
static int core_termwidth(lua_State *L) {
  struct winsize ws;
  int fd = (int)luaL_checkinteger(L, 1);
  const char *env = getenv("COLUMNS");
  long cols = 0;
  if (ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
    cols = ws.ws_col;
  else if (env != NULL)
    cols = strtol(env, NULL, 10);
  if (cols <= 0 || cols > 100000) cols = 80;
  lua_pushinteger(L, (lua_Integer)cols);
  return 1;
}

static int core_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

/* ---------------------------------------------------------------- memory

Large blocks of the Lua state's allocator are advised for transparent huge
pages. Where a page fault is expensive (a VM exit on some hypervisors), a
50 MB result string or a million-entry result table costs 12,000 faults of
4 KiB, most of the time a large result takes; in 2 MiB pages, 25. The
allocator of the state is wrapped, not replaced: every block still comes
from it and goes back to it; a new or grown block of 4 MiB or more only gets
madvise(MADV_HUGEPAGE) on its whole pages (the advice glibc itself gives
with GLIBC_TUNABLES=glibc.malloc.hugetlb=1). PARMAP_HUGEPAGES=0 in the
environment turns it off. */

#define HUGE_BLOCK ((size_t)4 << 20)

typedef struct Wrapped {
  lua_Alloc f;
  void *ud;
} Wrapped;

static void *huge_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  const Wrapped *w = (const Wrapped *)ud;
  void *p = w->f(w->ud, ptr, osize, nsize);
#ifdef MADV_HUGEPAGE
  if (p != NULL && nsize >= HUGE_BLOCK && (ptr == NULL || nsize > osize)) {
    uintptr_t page = 4096, a = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t b = ((uintptr_t)p + nsize) & ~(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_HUGEPAGE); /* advice only */
  }
#endif
  return p;
}

/* The wrapper must outlive the state: lua_close runs the finalizer that
   unloads C modules before it frees the last blocks. So this module stays
   loaded once the wrapper is in (dlclose then leaves it). 1 if pinned. */
static int pin_module(void) {
  Dl_info info;
  if (!dladdr((void *)huge_alloc, &info) || info.dli_fname == NULL) return 0;
  return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE) != NULL;
}

static void wrap_allocator(lua_State *L) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  const char *env = getenv("PARMAP_HUGEPAGES");
  Wrapped *w;
  if (f == huge_alloc || (env != NULL && strcmp(env, "0") == 0)) return;
  if (!pin_module()) return;
  w = (Wrapped *)malloc(sizeof *w); /* lives as long as the state: never
                                       freed, 16 bytes a state */
  if (w == NULL) return;
  w->f = f;
  w->ud = ud;
  lua_setallocf(L, huge_alloc, w);
}

/* worker(): this process's worker number and its map's worker count, or
   nil outside a map's worker. */
static int core_worker(lua_State *L) {
  int n, id = parmap_worker_id(&n);
  if (id == 0) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushinteger(L, id);
  lua_pushinteger(L, n);
  return 2;
}

PARMAP_API int luaopen_parmap_core(lua_State *L) {
  static const luaL_Reg funcs[] = {{"caller", core_caller},
                                   {"ncpu", core_ncpu},
                                   {"now", core_now},
                                   {"isatty", core_isatty},
                                   {"termwidth", core_termwidth},
                                   {"pid", core_pid},
                                   {"worker", core_worker},
                                   {NULL, NULL}};
  wrap_allocator(L);
  luaL_newlib(L, funcs);
  parmap_map_register(L);
  parmap_process_register(L);
  parmap_fnenc_register(L); /* closures by value (issue 13) */
  parmap_range_register(L);
  return 1;
}
