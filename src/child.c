/*
** child.c: the life of a forked child, shared by a map's workers
** (worker.c) and a ReturnProcess (process.c). See child.h.
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <lauxlib.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "child.h"
#include "codec.h"
#include "engine.h"
#include "proc.h"

/* ------------------------------------------------------------ the fork */

pid_t parmap_child_spawn(int *fd) {
  int sv[2];
  pid_t pid;
  if (parmap_socketpair(sv)) return -1;
  parmap_fd_register(sv[0]);
  pid = parmap_fork(sv[1]);
  if (pid < 0) {
    int e = errno;
    parmap_fd_close(sv[0]);
    close(sv[1]);
    errno = e;
    return -1;
  }
  if (pid == 0) {
    *fd = sv[1];
    return 0;
  }
  close(sv[1]);
  *fd = sv[0];
  return pid;
}

/* ------------------------------------------------------------ errors */


static const char box_key = 'b'; /* registry key of the error box metatable */

/* Frames from the worker loop down belong to the caller the worker was
   forked from: a worker's traceback stops above them. 0 in the parent. */
static int tb_floor = 0;

static int stack_depth(lua_State *L) {
  lua_Debug ar;
  int lo = 0, hi = 1;
  while (lua_getstack(L, hi, &ar)) { /* find an upper bound */
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) { /* binary search for the last valid level */
    int mid = (lo + hi) / 2;
    if (lua_getstack(L, mid, &ar)) lo = mid; else hi = mid;
  }
  return lo + 1; /* levels 0..lo exist */
}

/* Like luaL_traceback, for levels 1..last; a long one keeps its first
   TB_HEAD and last TB_TAIL levels (luaL_traceback's LEVELS1, LEVELS2). */
#define TB_HEAD 10
#define TB_TAIL 11

static void traceback(lua_State *L, int last) {
  luaL_Buffer b;
  lua_Debug ar;
  int level;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "stack traceback:");
  for (level = 1; level <= last && lua_getstack(L, level, &ar); level++) {
    if (last > TB_HEAD + TB_TAIL + 1 && level == TB_HEAD + 1) {
      lua_pushfstring(L, "\n\t...\t(skipping %d levels)",
                      last - TB_HEAD - TB_TAIL);
      luaL_addvalue(&b);
      level = last - TB_TAIL;
      continue;
    }
    lua_getinfo(L, "Slnt", &ar);
    if (ar.currentline <= 0)
      lua_pushfstring(L, "\n\t%s: in ", ar.short_src);
    else
      lua_pushfstring(L, "\n\t%s:%d: in ", ar.short_src, ar.currentline);
    luaL_addvalue(&b);
    if (*ar.namewhat != '\0')
      lua_pushfstring(L, "%s '%s'",
                      strcmp(ar.namewhat, "global") == 0 ? "function"
                                                         : ar.namewhat,
                      ar.name);
    else if (*ar.what == 'm')
      lua_pushliteral(L, "main chunk");
    else if (*ar.what != 'C')
      lua_pushfstring(L, "function <%s:%d>", ar.short_src, ar.linedefined);
    else
      lua_pushliteral(L, "?");
    luaL_addvalue(&b);
    if (ar.istailcall) luaL_addstring(&b, "\n\t(...tail calls...)");
  }
  luaL_pushresult(&b);
}

int parmap_msgh(lua_State *L) {
  const char *msg;
  if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER ||
      luaL_getmetafield(L, 1, "__tostring") != LUA_TNIL) {
    lua_settop(L, 1);
    msg = luaL_tolstring(L, 1, NULL);
  } else {
    msg = lua_pushfstring(L, "(error object is a %s value)",
                          luaL_typename(L, 1));
  }
  (void)msg;
  lua_createtable(L, 3, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, 2);
  traceback(L, stack_depth(L) - 1 - tb_floor);
  lua_rawseti(L, -2, 3);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &box_key);
  }
  lua_setmetatable(L, -2);
  return 1;
}

int parmap_unbox(lua_State *L, int idx) {
  int boxed = 0;
  lua_settop(L, idx);
  if (lua_getmetatable(L, idx)) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key);
    boxed = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (boxed) {
    lua_rawgeti(L, idx, 1);
    lua_rawgeti(L, idx, 2);
    lua_rawgeti(L, idx, 3);
  } else { /* a memory error, or an error in the message handler */
    lua_pushvalue(L, idx);
    if (lua_type(L, idx) == LUA_TSTRING)
      lua_pushvalue(L, idx);
    else
      lua_pushliteral(L, "error in error handling");
    lua_pushliteral(L, "");
  }
  lua_remove(L, idx);
  return 3;
}

/* The REC_ERR record; with prior >= 0 a sixth value: the runs the item
   had before this one (a worker's own retries). */
static void put_error(lua_State *L, parmap_buf *b, int scratch,
                      const char *kind, int err_idx, const char *message,
                      const char *traceback, pid_t pid, lua_Integer prior) {
  int top = lua_gettop(L), n = prior >= 0 ? 6 : 5;
  const char *what;
  luaL_checkstack(L, 8, NULL);
  if (parmap_buf_reserve(b, 1)) luaL_error(L, "parmap: not enough memory");
  b->p[b->len++] = (char)REC_ERR;
  lua_pushstring(L, kind);
  lua_pushvalue(L, err_idx);
  lua_pushstring(L, message);
  lua_pushstring(L, traceback);
  lua_pushinteger(L, (lua_Integer)pid);
  if (prior >= 0) lua_pushinteger(L, prior);
  if (parmap_encode(L, top + 1, n, b, scratch, &what) != PARMAP_OK) {
    lua_pushstring(L, message); /* err cannot travel: send its string form */
    lua_replace(L, top + 2);
    parmap_encode(L, top + 1, n, b, scratch, &what);
  }
  lua_settop(L, top);
}

void parmap_put_error(lua_State *L, parmap_buf *b, int scratch,
                      const char *kind, int err_idx, const char *message,
                      const char *traceback, pid_t pid) {
  put_error(L, b, scratch, kind, err_idx, message, traceback, pid, -1);
}

void parmap_put_error_after(lua_State *L, parmap_buf *b, int scratch,
                            const char *kind, int err_idx,
                            const char *message, const char *traceback,
                            pid_t pid, lua_Integer prior) {
  put_error(L, b, scratch, kind, err_idx, message, traceback, pid, prior);
}

/* ------------------------------------------------------------ retries */

uint64_t parmap_retry_delay_ns(double base, double max, lua_Integer failed) {
  double d = base;
  lua_Integer k;
  if (!(base > 0)) return 0;
  if (!(max > 0) || max > 86400.0) max = 86400.0; /* the options' bound */
  for (k = 1; k < failed && d < max; k++) d *= 2;
  if (d > max) d = max;
  return (uint64_t)(d * 1e9);
}

int parmap_retry_decide(lua_State *L, int fn, lua_Integer index, int rec,
                        pid_t pid, lua_Integer attempts, int fields) {
  int top = lua_gettop(L), k, again;
  luaL_checkstack(L, 12, NULL);
  lua_pushvalue(L, fn);
  lua_pushinteger(L, index);
  for (k = 0; k < 4; k++) lua_pushvalue(L, rec + k);
  lua_pushinteger(L, (lua_Integer)pid);
  lua_pushinteger(L, attempts);
  if (fields) lua_pushvalue(L, fields); else lua_pushnil(L);
  /* retry_check catches the predicate's errors; this pcall only memory's */
  if (lua_pcall(L, 8, 2, 0) != LUA_OK) {
    lua_settop(L, top);
    return 0;
  }
  again = lua_toboolean(L, -2);
  if (!again && lua_type(L, -1) == LUA_TSTRING) {
    lua_pushvalue(L, -1);
    lua_replace(L, rec + 2);
    lua_replace(L, rec + 1);
  }
  lua_settop(L, top);
  return again;
}

/* ------------------------------------------------------------ random */

static uint64_t mix64(uint64_t z) { /* splitmix64's finalizer */
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

/* Push package.loaded.math.randomseed (the math library's, even when the
   global `math` was replaced), or nothing: returns 1 if pushed. */
int parmap_push_randomseed(lua_State *L) {
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 4)) return 0;
  if (lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE) == LUA_TTABLE &&
      lua_getfield(L, -1, "math") == LUA_TTABLE &&
      lua_getfield(L, -1, "randomseed") == LUA_TFUNCTION) {
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);
    return 1;
  }
  lua_settop(L, top);
  return 0;
}

/* In a forked child: math.random gets a stream of its own, so workers do
   not replay the caller's stream (nor each other's). The seed mixes the
   child's pid, the clock and the count of forks so far; nothing is drawn
   from the caller's stream, which stays as it was in the caller. */
static void reseed_child(lua_State *L) {
  uint64_t a, b;
  int top = lua_gettop(L);
  if (!parmap_push_randomseed(L)) return;
  a = mix64((uint64_t)getpid() * 0x9e3779b97f4a7c15u ^ parmap_now_ns());
  b = mix64(a ^ mix64(parmap_fork_count()) ^ (uint64_t)(uintptr_t)L);
  lua_pushinteger(L, (lua_Integer)a);
  lua_pushinteger(L, (lua_Integer)b);
  (void)lua_pcall(L, 2, 0, 0); /* a replaced randomseed may raise: then so
                                   be it, the child keeps its stream */
  lua_settop(L, top);
}

/* ------------------------------------------------------------ exit */

void parmap_child_exit(int code) {
  fflush(NULL);
  _exit(code);
}

/* os.exit in a child: leave like a child does, with _exit() after
   flushing stdio, so the caller's atexit handlers and finalizers never run
   here (C exit() would run them). Same arguments as os.exit. */
static int child_os_exit(lua_State *L) {
  int code;
  if (lua_isboolean(L, 1))
    code = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
  else
    code = (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
  parmap_child_exit(code);
  return 0;
}

static void replace_os_exit(lua_State *L) {
  if (lua_getglobal(L, "os") == LUA_TTABLE) {
    lua_pushcfunction(L, child_os_exit);
    lua_setfield(L, -2, "exit");
  }
  lua_pop(L, 1);
}

/* The exit guard. os.exit(code, true) closes the state before it calls
   exit(): it runs every pending __close of the main thread and then every
   __gc, the caller's included. replace_os_exit covers the global os.exit,
   not a reference taken before the fork (`local exit = os.exit`). So a
   child keeps a to-be-closed guard in the frame of its outermost C
   function, above every frame of the caller: lua_close closes the newest
   first, and finalizes the newest marked first, so the guard runs before
   any of the caller's __close and __gc, and leaves with _exit(). The code
   given to os.exit is out of reach by then: the child exits with
   EXIT_FAILURE. exit() without closing is caught by proc.c's on_exit
   handler, with its code. On a normal return or an error of that C
   function the guard does nothing. */
static int guard_armed = 0;

static int guard_close(lua_State *L) {
  if (guard_armed && lua_isnoneornil(L, 2)) parmap_child_exit(EXIT_FAILURE);
  return 0;
}

static void push_guard(lua_State *L) {
  lua_newuserdatauv(L, 1, 0);
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, guard_close);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, guard_close); /* lua_close from a coroutine: only
                                        the main thread's are closed */
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_toclose(L, -1);
}

static void exit_guard(lua_State *L) {
  lua_State *main;
  luaL_checkstack(L, 4, NULL);
  push_guard(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main = lua_tothread(L, -1);
  lua_pop(L, 1);
  /* Run from a coroutine, this child's Lua code is above the main thread's
     frames, but lua_close closes only the main thread's pending __close:
     a guard goes on top of them too. The main thread waits in a resume
     that this child never returns to, so its frame may take the slot. */
  if (main != NULL && main != L && lua_checkstack(main, 4)) push_guard(main);
  guard_armed = 1;
}


/* ------------------------------------------------------------ identity */

/* This process's number among its map's workers (1..n), 0 in the caller
   and in a ReturnProcess child. A process is a worker of one map only, so
   inside a nested map's worker it is that (innermost) map's number. */
static int worker_id = 0, worker_n = 0;

int parmap_worker_id(int *n) {
  if (n) *n = worker_n;
  return worker_id;
}

void parmap_child_start(lua_State *L, int extra, int id, int n) {
  tb_floor = stack_depth(L) + extra;
  worker_id = id;
  worker_n = n;
  replace_os_exit(L);
  reseed_child(L);
  exit_guard(L);
}

void parmap_child_disarm(void) { guard_armed = 0; }

/* ------------------------------------------------------------ collector */

/* The budget is checked in the state's allocator, wrapped in the child: it
   sees every allocation (in Lua code, in C functions, in any coroutine, under
   a caller's hook), where a count hook sees only Lua instructions of one
   thread, and a check between a worker's segments none inside a long item. */

#define GC_FLOOR ((ptrdiff_t)1 << 20) /* restart once own garbage passes this... */
#define GC_YOUNG ((ptrdiff_t)1 << 20) /* a young collection per this much, at most */

static lua_State *gc_L;        /* the state (any thread: lua_gc needs G only) */
static lua_Alloc gc_f;         /* the wrapped allocator */
static ptrdiff_t gc_grown, gc_limit; /* bytes grown since the stop; budget */
static int gc_deferred;

/* lua_gc(LUA_GCRESTART) only resets the debt and the stop flag, allocating
   nothing: safe from here (with the stock, empty lua_lock). While a finalizer runs it is refused (-1, 5.4.4)
   or undone when the finalizer returns (5.4.0-5.4.3 restore the flag): so
   the deferral ends only once a later allocation sees the collector run. */
static void *gc_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  void *p = gc_f(ud, ptr, osize, nsize);
  if (gc_deferred && (p != NULL || nsize == 0)) {
    gc_grown += (ptrdiff_t)nsize - (ptr != NULL ? (ptrdiff_t)osize : 0);
    if (gc_grown > gc_limit) {
      int running = lua_gc(gc_L, LUA_GCISRUNNING, 0);
      if (running == 1) gc_deferred = 0;
      else if (running == 0) lua_gc(gc_L, LUA_GCRESTART, 0);
    }
  }
  return p;
}

/* gc_alloc must outlive the state, as core.c's wrapper must: keep this
   module loaded (a child's state is never freed, its exit guard leaves
   first, so this is belt and braces). */
static void gc_pin(void) {
  Dl_info info;
  if (dladdr((void *)gc_alloc, &info) && info.dli_fname != NULL)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

/* Generational mode with the inherited objects old: a young collection
   never touches (so never copies) them. The mode has no query in the API,
   and switching to learn it would run a full collection: read the age bits
   (the low 3 of the mark byte, after the next pointer and the type tag) of
   the registry, old once the mode is in force. Ages stay 0 in incremental
   mode and while 5.4's generational mode falls back to full collections
   after a heap's growth. A wrong guess costs speed, never correctness. */
static int gc_young_only(lua_State *L) {
#if LUA_VERSION_NUM == 504
  const unsigned char *h;
  lua_pushvalue(L, LUA_REGISTRYINDEX);
  h = (const unsigned char *)lua_topointer(L, -1);
  lua_pop(L, 1);
  return h != NULL && h[sizeof(void *)] == LUA_TTABLE &&
         (h[sizeof(void *) + 1] & 7) != 0;
#else
  (void)L;
  return 0;
#endif
}

/* In the caller, before a fork: 5.4's generational mode falls back to full
   collections while the heap grows (lua5.4 runs in that mode, so a script
   that just built a big table is there), and leaves the objects young: each
   child would then mark, so copy, the whole heap. Re-entering the mode ends
   the fallback with one full collection in the caller's own pages, after
   which the objects are old. LUA_GCINC is the probe: a no-op in incremental
   mode; in the fallback it says "generational" and, the collector being in
   its incremental state already, only clears the fallback's count. Run once
   a fallback: the objects are old from then on. */
#define GC_SETTLE ((int)8 << 10) /* KiB: below this a child's copy is cheap */

void parmap_child_gc_settle(lua_State *L) {
  if (lua_gc(L, LUA_GCISRUNNING, 0) != 1 || lua_gc(L, LUA_GCCOUNT, 0) < GC_SETTLE)
    return;
  if (!lua_checkstack(L, 1) || gc_young_only(L)) return;
  if (lua_gc(L, LUA_GCINC, 0, 0, 0) == LUA_GCGEN) lua_gc(L, LUA_GCGEN, 0, 0);
}

void parmap_child_gc_defer(lua_State *L) {
  void *ud;
  lua_Alloc f;
  ptrdiff_t base;
  /* a caller that stopped its collector keeps it stopped (a nested map's
     child inherits a deferral: that stop is ours) */
  if (!gc_deferred && !lua_gc(L, LUA_GCISRUNNING, 0)) return;
  gc_deferred = 0;
  f = lua_getallocf(L, &ud);
  if (f != gc_alloc) { /* a nested map's child inherits the wrapper */
    gc_pin();
    gc_f = f;
    lua_setallocf(L, gc_alloc, ud);
  }
  lua_gc(L, LUA_GCSTOP, 0);
  base = (ptrdiff_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + lua_gc(L, LUA_GCCOUNTB, 0);
  gc_L = L;
  gc_grown = 0;
  gc_limit = base > GC_FLOOR ? base : GC_FLOOR;
  if (lua_checkstack(L, 1) && gc_young_only(L)) {
    /* young collections cost nothing of the inherited heap: keep the
       garbage within ~GC_YOUNG (a minor multiplier of 20% of a big heap
       is that many fresh pages per collection); LUA_GCGEN in generational
       mode only sets the parameter */
    ptrdiff_t minor = GC_YOUNG * 100 / (base > 1 ? base : 1);
    gc_limit = GC_FLOOR;
    if (minor < 20) lua_gc(L, LUA_GCGEN, minor > 0 ? (int)minor : 1, 0);
  }
  gc_deferred = 1;
}

/* ------------------------------------------------------------ results */

void parmap_put_result(lua_State *L, parmap_buf *b, int first, int scratch,
                       int desc, lua_Integer index, pid_t pid) {
  parmap_put_result_after(L, b, first, scratch, desc, index, pid, 0);
}

void parmap_put_result_after(lua_State *L, parmap_buf *b, int first,
                             int scratch, int desc, lua_Integer index,
                             pid_t pid, lua_Integer prior) {
  int n = lua_gettop(L) - first + 1;
  const char *what;
  size_t mark = b->len;
  if (parmap_buf_reserve(b, 1)) luaL_error(L, "parmap: not enough memory");
  b->p[b->len++] = (char)REC_OK;
  if (n == 1 && parmap_encode_scalar(L, first, b)) return;
  if (parmap_encode(L, first, n, b, scratch, &what) == PARMAP_OK) return;
  b->len = mark;
  /* say where the value that cannot travel sits */
  lua_pushvalue(L, desc);
  lua_pushliteral(L, "result");
  if (index > 0) lua_pushinteger(L, index); else lua_pushnil(L);
  lua_rotate(L, first, 3);
  if (lua_pcall(L, n + 2, 1, 0) != LUA_OK || !lua_isstring(L, -1)) {
    lua_settop(L, first - 1);
    if (index > 0)
      lua_pushfstring(L, "result of item %I: cannot send a %s",
                      (LUAI_UACINT)index, what);
    else
      lua_pushfstring(L, "result: cannot send a %s", what);
  }
  put_error(L, b, scratch, "value", lua_gettop(L), lua_tostring(L, -1), "",
            pid, prior > 0 ? prior : -1);
}

/* ------------------------------------------------------------ the parent */

static int noop(lua_State *L) {
  (void)L;
  return 0;
}

void parmap_run_hooks(lua_State *L) {
  lua_pushcfunction(L, noop);
  lua_call(L, 0, 0);
}

int parmap_is_interrupt(lua_State *L, int idx) {
  static const char tail[] = "interrupted!";
  size_t n;
  const char *msg;
  if (lua_type(L, idx) != LUA_TSTRING) return 0;
  msg = lua_tolstring(L, idx, &n);
  return n >= sizeof tail - 1 &&
         memcmp(msg + n - (sizeof tail - 1), tail, sizeof tail - 1) == 0;
}

void parmap_clear_interrupt(lua_State *L) {
  const int lstop = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
  if (lua_gethook(L) != NULL && lua_gethookmask(L) == lstop &&
      lua_gethookcount(L) == 1)
    lua_sethook(L, NULL, 0, 0);
}

#define REAP_SLICE_MS 50 /* a Ctrl-C hook runs at least this often */
#define NS_PER_MS 1000000

int parmap_deadline_ms(int64_t deadline_ns, int cap) {
  int64_t left;
  if (deadline_ns < 0) return cap;
  left = deadline_ns - (int64_t)parmap_now_ns();
  if (left <= 0) return 0;
  if (left >= (int64_t)cap * NS_PER_MS) return cap;
  return (int)((left + NS_PER_MS - 1) / NS_PER_MS);
}

int parmap_child_reap(lua_State *L, pid_t pid, int *status,
                      int64_t deadline_ns) {
  for (;;) {
    int r = parmap_wait(pid, status, parmap_deadline_ms(deadline_ns,
                                                        REAP_SLICE_MS));
    if (r != 0) return r;
    if (deadline_ns >= 0 && (int64_t)parmap_now_ns() >= deadline_ns)
      return 0;
    if (L != NULL) parmap_run_hooks(L);
  }
}

void parmap_child_how(char *how, size_t n, int lost, int status) {
  if (lost)
    snprintf(how, n, "was reaped by someone else (a waitpid not parmap's "
                     "took its exit status)");
  else
    parmap_status_text(status, how, n);
}
