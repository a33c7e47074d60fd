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

#include "journal.h"
#include "child.h"
#include "engine.h"
#include "fnenc.h"
#include "map.h"
#include "parmap.h"
#include "proc.h"
#include "process.h"
#include "range.h"
#include "spec.h"

/* One item's call, for core.caller's and core.stepper's closures. */
typedef struct Call {
  CallSpec cs;
  int shape; /* set when the item has not the shape its mode needs */
} Call;

/* call_body(call, fn, args, kw, item, index, from_table): fn's results for
   the item (items[index] of the table at 5 when from_table), or with
   call->shape set the shape's message. Everything an item's run may raise
   (its items[index], its vals' metamethods, fn) raises in here, so a
   protected call catches all of it, as a worker's pcall does. */
static int call_body(lua_State *L) {
  Call *c = (Call *)lua_touserdata(L, 1);
  lua_Integer index = lua_tointeger(L, 6);
  int n, fnpos;
  c->cs.fn = 2;
  c->cs.args = 3;
  c->cs.kw = 4;
  if (lua_toboolean(L, 7)) lua_geti(L, 5, index);
  else lua_pushvalue(L, 5);
  n = parmap_push_call(L, &c->cs, 8, index);
  if (n < 0) {
    c->shape = 1;
    return 1;
  }
  fnpos = lua_gettop(L) - n; /* scratch values may sit below fn */
  lua_call(L, n, LUA_MULTRET);
  return lua_gettop(L) - fnpos + 1;
}

/* Push call_body and its arguments for the item at 1 (its index at 2),
   with the call values of the running closure's upvalues 2..4. */
static void push_body(lua_State *L, Call *c, int from_table) {
  lua_pushcfunction(L, call_body);
  lua_pushlightuserdata(L, c);
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_pushvalue(L, lua_upvalueindex(3));
  lua_pushvalue(L, lua_upvalueindex(4));
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_pushboolean(L, from_table);
}

/* call(item, index, protect), a closure of core.caller: fn's results for
   one item, following the call table (init and finish of the serial
   path). Unprotected, errors propagate untouched. Protected, returns
   "ok", results... | "error", err, message, traceback | "shape", message.
   Upvalues: the CallSpec (a userdata), fn, args, kwargs. */
static int core_call(lua_State *L) {
  Call c;
  int protect = lua_toboolean(L, 3);
  c.cs = *(const CallSpec *)lua_touserdata(L, lua_upvalueindex(1));
  c.shape = 0;
  luaL_checkinteger(L, 2);
  lua_settop(L, 2);
  if (protect) {
    lua_pushliteral(L, "ok");          /* 3 */
    lua_pushcfunction(L, parmap_msgh); /* 4 */
  }
  push_body(L, &c, 0);
  if (!protect) {
    lua_call(L, 7, LUA_MULTRET);
    if (c.shape) return lua_error(L);
    return lua_gettop(L) - 2;
  }
  if (lua_pcall(L, 7, LUA_MULTRET, 4) == LUA_OK) {
    if (c.shape) lua_pushliteral(L, "shape");
    else lua_pushvalue(L, 3);
    lua_replace(L, 4); /* the status just below the results */
    return lua_gettop(L) - 3;
  }
  parmap_unbox(L, 5); /* err, message, traceback */
  lua_pushliteral(L, "error");
  lua_replace(L, 4);
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

/* A serial map's step of one item (core.stepper). */
typedef struct Stepper {
  CallSpec cs;
  lua_Integer retries;
  double retry_delay, retry_delay_max; /* seconds; 0: none, no cap */
  int from_table;
} Stepper;

/* The item's outcome is the values from `first` to the top: progress
   hears of it, and they are returned after the index, where the loop
   takes them. No copy of the values: fn may return as many as the stack
   holds. */
static int step_done(lua_State *L, lua_Integer index, int first) {
  if (!lua_isnil(L, lua_upvalueindex(6))) {
    luaL_checkstack(L, 5, "too many results");
    lua_pushvalue(L, lua_upvalueindex(6));
    lua_pushinteger(L, index);
    lua_pushvalue(L, lua_upvalueindex(7));
    lua_pushboolean(L, 0);
    lua_call(L, 3, 0);
  }
  luaL_checkstack(L, 2, "too many results");
  lua_pushinteger(L, index);
  lua_rotate(L, first, 1);
  return lua_gettop(L) - first + 1;
}

/* A serial run of item `index` failed (err, message, traceback at 4..6)
   after `runs` runs, with runs left: does retry_if (upvalue 8) let it run
   again? If so, wait retry_delay first (this process has nothing else to
   do). When retry_if raised, its message replaces err and message. */
static int retry_again(lua_State *L, const Stepper *st, lua_Integer index,
                       lua_Integer runs) {
  uint64_t until;
  if (!lua_isnil(L, lua_upvalueindex(8))) {
    int rec = lua_gettop(L) + 1, again;
    luaL_checkstack(L, 6, NULL);
    lua_pushliteral(L, "error");
    lua_pushvalue(L, 4);
    lua_pushvalue(L, 5);
    lua_pushvalue(L, 6);
    again = parmap_retry_decide(L, lua_upvalueindex(8), index, rec,
                                getpid(), runs, 0);
    lua_copy(L, rec + 1, 4);
    lua_copy(L, rec + 2, 5);
    lua_settop(L, rec - 1);
    if (!again) return 0;
  }
  until = parmap_retry_delay_ns(st->retry_delay, st->retry_delay_max, runs);
  if (until == 0) return 1;
  until += parmap_now_ns();
  while (parmap_sleep_until(until) < 0)
    parmap_run_hooks(L); /* Ctrl-C: lua.c's hook raises here */
  return 1;
}

/* step(item, index, protect), a closure of core.stepper: the serial
   loop's values for one item, as a worker and the parent make them: its
   index and fn's results, or its index and what the map's failure handler
   made of its failure (retried first while runs are left, when fn or the
   item raised); `item` is the items table for table input. Unprotected
   (exception = "proc" without retries) errors propagate untouched.
   Upvalues: the Stepper, fn, args, kwargs, fail, progress, total,
   retry_check. */
static int core_step(lua_State *L) {
  const Stepper *st = (const Stepper *)lua_touserdata(L, lua_upvalueindex(1));
  lua_Integer index = luaL_checkinteger(L, 2), runs = 1;
  int protect = lua_toboolean(L, 3);
  Call c;
  c.cs = st->cs;
  lua_settop(L, 2);
  if (!protect) {
    c.shape = 0;
    push_body(L, &c, st->from_table);
    lua_call(L, 7, LUA_MULTRET);
    if (c.shape) return lua_error(L); /* the policy raises a shape's message */
    return step_done(L, index, 3);
  }
  lua_pushcfunction(L, parmap_msgh); /* 3 */
  for (;;) {
    c.shape = 0;
    push_body(L, &c, st->from_table);
    if (lua_pcall(L, 7, LUA_MULTRET, 3) == LUA_OK) {
      if (!c.shape) return step_done(L, index, 4);
      lua_pushvalue(L, lua_upvalueindex(5)); /* fail: raises its message */
      lua_pushinteger(L, index);
      lua_pushliteral(L, "shape");
      lua_pushnil(L);
      lua_pushvalue(L, 4);
      lua_pushliteral(L, "");
      lua_pushinteger(L, (lua_Integer)getpid());
      lua_call(L, 6, 1);
      return step_done(L, index, lua_gettop(L));
    }
    parmap_unbox(L, 4); /* err, message, traceback at 4..6 */
    if (runs <= st->retries && retry_again(L, st, index, runs)) {
      runs++; /* fn or the item raised: again */
      lua_settop(L, 3);
      continue;
    }
    lua_pushvalue(L, lua_upvalueindex(5));
    lua_pushinteger(L, index);
    lua_pushliteral(L, "error");
    lua_pushvalue(L, 4);
    lua_pushvalue(L, 5);
    lua_pushvalue(L, 6);
    lua_pushinteger(L, (lua_Integer)getpid());
    lua_pushinteger(L, runs);
    lua_call(L, 7, 1); /* raises, or returns the error object */
    return step_done(L, index, lua_gettop(L));
  }
}

/* core.stepper(spec): the step closure of a serial map's spec (the call
   table's fields, retries, from_table, fail, progress, total). */
static int core_stepper(lua_State *L) {
  Stepper *st;
  luaL_checktype(L, 1, LUA_TTABLE);
  st = (Stepper *)lua_newuserdatauv(L, sizeof *st, 0);
  parmap_read_call(L, 1, &st->cs);
  st->retries = parmap_countfield(L, 1, "retries", "retries", 0, 0);
  st->retry_delay = parmap_numfield(L, 1, "retry_delay", 0);
  st->retry_delay_max = parmap_numfield(L, 1, "retry_delay_max", 0);
  st->from_table = parmap_boolfield(L, 1, "from_table", 0);
  parmap_push_callvalues(L, 1, "fn", st->cs.nargs);
  parmap_pushfield(L, 1, "fail", LUA_TFUNCTION, 0);
  parmap_pushfield(L, 1, "progress", LUA_TNONE, 1);
  parmap_pushfield(L, 1, "total", LUA_TNUMBER, 1);
  parmap_pushfield(L, 1, "retry_check", LUA_TFUNCTION, 1);
  lua_pushcclosure(L, core_step, 8);
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
                                   {"stepper", core_stepper},
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
  parmap_fnenc_register(L); /* closures by value */
  parmap_range_register(L);
  parmap_journal_register(L);
  return 1;
}
