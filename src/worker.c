/*
** worker.c: the worker side of a map, and the call adapter.
** A worker is a forked copy of the caller: it reads segments of items from
** its socket, calls fn on each, writes result records back, and leaves with
** _exit() at end of file. It never returns into the caller's Lua code.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "engine.h"
#include "proc.h"

/* ---------------------------------------------------------------- calls */

static int shape_error(lua_State *L, lua_Integer index, const char *what,
                       int got) {
  lua_pushfstring(L, "parmap: item %I: %s, got %s", (LUAI_UACINT)index, what,
                  luaL_typename(L, got));
  return -1;
}

/* Copy the pairs of table src into table dst (both absolute). */
static void copy_pairs(lua_State *L, int dst, int src) {
  lua_pushnil(L);
  while (lua_next(L, src)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, dst);
  }
}

int parmap_push_call(lua_State *L, const CallSpec *cs, int item,
                     lua_Integer index) {
  int vals = item, kwvals = 0, n = 0, i;
  if (!lua_checkstack(L, cs->nargs + 8)) {
    lua_pushliteral(L, "parmap: too many arguments");
    return -1;
  }
  if (cs->kwstar) {
    if (cs->star == STAR_NONE) {
      kwvals = item;
    } else {
      if (!lua_istable(L, item))
        return shape_error(L, index,
                           cs->star == STAR_TRUE
                               ? "kwstar = true needs a table {vals, kwvals}"
                               : "kwstar = true needs a table {val, kwvals}",
                           item);
      lua_geti(L, item, 1);
      lua_geti(L, item, 2);
      vals = lua_gettop(L) - 1;
      kwvals = vals + 1;
    }
    if (!lua_istable(L, kwvals))
      return shape_error(L, index, "kwvals must be a table", kwvals);
  }
  lua_pushvalue(L, cs->fn);
  if (cs->star == STAR_FALSE) {
    lua_pushvalue(L, vals);
    n = 1;
  } else if (cs->star == STAR_TRUE) {
    lua_Integer len;
    if (!lua_istable(L, vals))
      return shape_error(L, index, "star = true needs a sequence table",
                         vals);
    if (lua_getfield(L, vals, "n") == LUA_TNUMBER && lua_isinteger(L, -1))
      len = lua_tointeger(L, -1);
    else
      len = luaL_len(L, vals);
    lua_pop(L, 1);
    if (len < 0 || len > 1000000 ||
        !lua_checkstack(L, (int)len + cs->nargs + 8)) {
      lua_pushfstring(L, "parmap: item %I: too many values to unpack",
                      (LUAI_UACINT)index);
      return -1;
    }
    for (i = 1; i <= (int)len; i++) lua_geti(L, vals, i);
    n = (int)len;
  }
  for (i = 1; i <= cs->nargs; i++) lua_rawgeti(L, cs->args, i);
  n += cs->nargs;
  if (cs->has_kw) {
    int t;
    lua_newtable(L);
    t = lua_gettop(L);
    if (lua_istable(L, cs->kw)) copy_pairs(L, t, cs->kw);
    if (kwvals) copy_pairs(L, t, kwvals);
    n++;
  }
  return n;
}

/* ---------------------------------------------------------------- errors */

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

/* Like luaL_traceback, for levels 1..last. */
static void traceback(lua_State *L, int last) {
  luaL_Buffer b;
  lua_Debug ar;
  int level;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "stack traceback:");
  for (level = 1; level <= last && lua_getstack(L, level, &ar); level++) {
    if (last > 22 && level == 11) { /* keep the first 10 and the last 11 */
      lua_pushfstring(L, "\n\t...\t(skipping %d levels)", last - 21);
      luaL_addvalue(&b);
      level = last - 11;
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

void parmap_put_error(lua_State *L, parmap_buf *b, int scratch,
                      const char *kind, int err_idx, const char *message,
                      const char *traceback, pid_t pid) {
  int top = lua_gettop(L);
  const char *what;
  luaL_checkstack(L, 8, NULL);
  if (parmap_buf_reserve(b, 1)) luaL_error(L, "parmap: not enough memory");
  b->p[b->len++] = (char)REC_ERR;
  lua_pushstring(L, kind);
  lua_pushvalue(L, err_idx);
  lua_pushstring(L, message);
  lua_pushstring(L, traceback);
  lua_pushinteger(L, (lua_Integer)pid);
  if (parmap_encode(L, top + 1, 5, b, scratch, &what) != PARMAP_OK) {
    lua_pushstring(L, message); /* err cannot travel: send its string form */
    lua_replace(L, top + 2);
    parmap_encode(L, top + 1, 5, b, scratch, &what);
  }
  lua_settop(L, top);
}

/* ---------------------------------------------------------------- random */

static uint64_t mix64(uint64_t z) { /* splitmix64's finalizer */
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

/* Push package.loaded.math.randomseed (the math library's, even when the
   global `math` was replaced), or nothing: returns 1 if pushed. */
static int push_randomseed(lua_State *L) {
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
  if (!push_randomseed(L)) return;
  a = mix64((uint64_t)getpid() * 0x9e3779b97f4a7c15u ^ parmap_now_ns());
  b = mix64(a ^ mix64(parmap_fork_count()) ^ (uint64_t)(uintptr_t)L);
  lua_pushinteger(L, (lua_Integer)a);
  lua_pushinteger(L, (lua_Integer)b);
  (void)lua_pcall(L, 2, 0, 0); /* a replaced randomseed may raise: then so
                                   be it, the child keeps its stream */
  lua_settop(L, top);
}

/* ---------------------------------------------------------------- worker */

#define FLUSH_BYTES (256 * 1024)
#define FLUSH_NS (20 * 1000000u)

typedef struct WState {
  lua_State *L;
  const Config *cfg;
  Shm *shm;
  int fd;
  pid_t pid;
  int map;  /* worker_loop's frame: the map userdata */
  int msgh; /* worker_loop's frame: the message handler */
  int oscratch; /* worker_loop's frame: the codec's scratch table */
  int base; /* run_items's frame: user values at base + U_* */
  CallSpec cs;
  parmap_buf in, out;
  const TaskHdr *h; /* the segment being run */
  uint32_t k;       /* its item being run */
  uint32_t pending; /* results not yet flushed */
  size_t mark;      /* where item k's result record starts in out */
  size_t mark_pos;  /* where item k's own record starts in in */
  size_t pos;       /* next item in `in` (iterator input) */
  uint32_t tries_k; /* retries: the item that tries counts for */
  uint64_t tries;   /* ... its runs that failed so far */
  uint64_t last;    /* last flush (coarse clock) */
  int gc_on;
  int gc_base_kb;
} WState;

static uint64_t coarse_ns(void) {
  struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
  clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void worker_exit(int code) {
  fflush(NULL);
  _exit(code);
}

static void flush(WState *w, uint32_t nitems, uint64_t elapsed,
                  uint64_t flags) {
  ResultHdr h;
  h.magic = MAGIC_RESULT;
  h.nitems = nitems;
  h.bodylen = w->out.len - FRAME_HDR;
  h.elapsed_ns = elapsed;
  h.flags = flags;
  memcpy(w->out.p, &h, sizeof h);
  if (parmap_write_all(w->fd, w->out.p, w->out.len))
    worker_exit(0); /* the parent hung up: nobody wants the result */
  w->out.len = FRAME_HDR;
}

/* The result of item `index`: values from `first` to the top. */
static void put_result(WState *w, lua_Integer index, int first) {
  lua_State *L = w->L;
  int n = lua_gettop(L) - first + 1;
  int scratch = w->base + U_SCRATCH;
  const char *what;
  size_t mark = w->out.len;
  if (parmap_buf_reserve(&w->out, 1)) luaL_error(L, "parmap: not enough memory");
  w->out.p[w->out.len++] = (char)REC_OK;
  if (n == 1 && parmap_encode_scalar(L, first, &w->out)) return;
  if (parmap_encode(L, first, n, &w->out, scratch, &what) == PARMAP_OK) return;
  w->out.len = mark;
  /* say where the value that cannot travel sits */
  lua_pushvalue(L, w->base + U_DESC);
  lua_pushliteral(L, "result");
  lua_pushinteger(L, index);
  lua_rotate(L, first, 3);
  if (lua_pcall(L, n + 2, 1, 0) != LUA_OK || !lua_isstring(L, -1)) {
    lua_settop(L, first - 1);
    lua_pushfstring(L, "result of item %I: cannot send a %s",
                    (LUAI_UACINT)index, what);
  }
  parmap_put_error(L, &w->out, scratch, "value", lua_gettop(L),
                   lua_tostring(L, -1), "", w->pid);
}

static void put_failure(WState *w, int box) {
  lua_State *L = w->L;
  parmap_unbox(L, box);
  parmap_put_error(L, &w->out, w->oscratch, "error", box,
                   lua_tostring(L, box + 1), lua_tostring(L, box + 2),
                   w->pid);
}

/* After each item: count it, and flush when enough has piled up. */
static void item_done(WState *w) {
  w->pending++;
  if (w->k + 1 >= w->h->count) return; /* the end frame follows at once */
  if (w->out.len >= FLUSH_BYTES || coarse_ns() - w->last >= FLUSH_NS) {
    flush(w, w->pending, 0, 0);
    w->pending = 0;
    w->last = coarse_ns();
  }
}

/* run_items(w): run the segment's items from w->k on. Runs under one
   lua_pcall, so an item costs no setjmp; when fn raises, run_segment
   records the error for item w->k and calls this again for the rest. */
static int run_items(lua_State *L) {
  WState *w = (WState *)lua_touserdata(L, 1);
  const Config *cfg = w->cfg;
  int top, u, seeder;
  int simple = w->cs.star == STAR_FALSE && !w->cs.kwstar && !w->cs.has_kw &&
               w->cs.nargs == 0;
  /* this call's own frame: the map (argument 2)'s values at base + U_* */
  w->base = 2;
  for (u = 1; u <= U_COUNT; u++) lua_getiuservalue(L, 2, u);
  w->cs.fn = w->base + U_FN;
  w->cs.args = w->base + U_ARGS;
  w->cs.kw = w->base + U_KW;
  seeder = cfg->has_seed && push_randomseed(L) ? lua_gettop(L) : 0;
  top = lua_gettop(L);
  if (!lua_checkstack(L, 8)) luaL_error(L, "parmap: stack overflow");
  for (; w->k < w->h->count; w->k++) {
    lua_Integer index = (lua_Integer)w->h->from + (lua_Integer)w->k;
    int nargs, fnpos;
    w->mark = w->out.len;
    w->mark_pos = w->pos;
    /* start before cur: the parent never pairs an old start with a new
       item (it reads cur, start, cur) */
    if (cfg->timeout > 0)
      __atomic_store_n(&w->shm->start, parmap_now_ns(), __ATOMIC_RELEASE);
    __atomic_store_n(&w->shm->cur, (int64_t)index, __ATOMIC_RELEASE);
    if (seeder) { /* seed option: the item's stream depends on it alone */
      lua_pushvalue(L, seeder);
      lua_pushinteger(L, cfg->seed);
      lua_pushinteger(L, index);
      lua_call(L, 2, 0);
    }
    if (simple) lua_pushvalue(L, w->cs.fn); /* fn(item): no adapter */
    if (cfg->from_table) {
      lua_geti(L, w->base + U_ITEMS, index);
    } else if (!parmap_decode_scalar(L, w->in.p, w->in.len, &w->pos)) {
      const char *err;
      if (parmap_decode(L, w->in.p, w->in.len, &w->pos, w->base + U_SCRATCH,
                        &err) != 1) {
        fprintf(stderr, "parmap worker: bad item message: %s\n",
                err ? err : "not one value");
        worker_exit(70);
      }
    }
    if (simple) {
      lua_call(L, 1, LUA_MULTRET);
      put_result(w, index, top + 1);
      lua_settop(L, top);
      item_done(w);
      continue;
    }
    nargs = parmap_push_call(L, &w->cs, top + 1, index);
    if (nargs < 0) {
      parmap_put_error(L, &w->out, w->base + U_SCRATCH, "shape",
                       lua_gettop(L), lua_tostring(L, -1), "", w->pid);
    } else {
      fnpos = lua_gettop(L) - nargs;
      lua_call(L, nargs, LUA_MULTRET);
      put_result(w, index, fnpos); /* results replace fn and its args */
    }
    lua_settop(L, top);
    item_done(w);
  }
  return 0;
}

/* Empty the table at absolute index t. */
static void clear_table(lua_State *L, int t) {
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_pushnil(L);
    lua_rawset(L, t); /* clearing a field during the traversal is allowed */
  }
}

static void run_segment(WState *w, const TaskHdr *h) {
  lua_State *L = w->L;
  uint64_t t0 = parmap_now_ns();
  int top = lua_gettop(L);
  w->h = h;
  w->k = 0;
  w->pos = 0;
  w->tries_k = 0; /* the first item may have lost runs to deaths */
  w->tries = h->tries;
  w->pending = 0;
  w->last = coarse_ns();
  while (w->k < h->count) {
    lua_pushcfunction(L, run_items);
    lua_pushlightuserdata(L, w);
    lua_pushvalue(L, w->map);
    w->mark = w->out.len;
    w->mark_pos = w->pos;
    if (lua_pcall(L, 2, 0, w->msgh) != LUA_OK) {
      /* item w->k raised. When that was the codec running out of memory,
         out may end in part of its result record and the scratch table
         hold entries: drop both, or the next records come out garbled. An
         item whose own record was not read cannot be skipped: leave, and
         the parent reports the item (the rest of the segment runs again). */
      if (!w->cfg->from_table && w->pos == w->mark_pos) worker_exit(70);
      w->out.len = w->mark;
      clear_table(L, w->oscratch);
      if (w->cfg->retries > 0) { /* runs left? then again, here and now */
        if (w->tries_k != w->k) {
          w->tries_k = w->k;
          w->tries = 0;
        }
        if ((lua_Integer)++w->tries <= w->cfg->retries) {
          lua_settop(L, top);
          w->pos = w->mark_pos; /* its item is decoded again */
          continue;
        }
      }
      put_failure(w, lua_gettop(L));
      lua_settop(L, top);
      w->k++;
      item_done(w);
    }
  }
  /* the segment's end, for the parent's deadline of the next one: start
     before cur, as for an item */
  if (w->cfg->timeout > 0)
    __atomic_store_n(&w->shm->start, parmap_now_ns(), __ATOMIC_RELEASE);
  __atomic_store_n(&w->shm->cur, 0, __ATOMIC_RELEASE);
  flush(w, w->pending, parmap_now_ns() - t0, FLAG_END);
  /* Collect only once the worker's own garbage outweighs the inherited
     heap: a collection walks (and so copies) every inherited page, while
     garbage left alone costs a fresh page for every 4 KiB allocated. */
  if (!w->gc_on) {
    int kb = lua_gc(L, LUA_GCCOUNT, 0);
    int limit = w->gc_base_kb > 1024 ? w->gc_base_kb : 1024;
    if (kb - w->gc_base_kb > limit) {
      lua_gc(L, LUA_GCRESTART, 0);
      w->gc_on = 1;
    }
  }
}

/* os.exit in a worker: leave like a worker does, with _exit() after
   flushing stdio, so the caller's atexit handlers and finalizers never run
   here (C exit() would run them). Same arguments as os.exit. */
static int worker_os_exit(lua_State *L) {
  int code;
  if (lua_isboolean(L, 1))
    code = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
  else
    code = (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
  worker_exit(code);
  return 0;
}

/* ---------------------------------------------------------------- identity */

/* This process's number among its map's workers (1..n), 0 in the caller
   and in a ReturnProcess child. A process is a worker of one map only, so
   inside a nested map's worker it is that (innermost) map's number. */
static int worker_id = 0, worker_n = 0;

int parmap_worker_id(int *n) {
  if (n) *n = worker_n;
  return worker_id;
}

/* run_user(f, id): f(id). Called under lua_pcall from worker_loop, so it
   sits where run_items does and the traceback's floor fits it too. */
static int run_user(lua_State *L) {
  lua_settop(L, 2);
  lua_call(L, 1, 0);
  return 0;
}

/* Call the map's init or finish (user value u) with this worker's number.
   Returns 1 when there is none or it returned; 0 when it raised, with err,
   message and traceback pushed. */
static int call_user(WState *w, int u) {
  lua_State *L = w->L;
  if (lua_getiuservalue(L, w->map, u) == LUA_TNIL) {
    lua_pop(L, 1);
    return 1;
  }
  lua_pushcfunction(L, run_user);
  lua_insert(L, -2);
  lua_pushinteger(L, worker_id);
  if (lua_pcall(L, 2, 0, w->msgh) == LUA_OK) return 1;
  parmap_unbox(L, lua_gettop(L));
  return 0;
}

/* init raised (err, message, traceback on top): send its error record in a
   FLAG_INIT frame, then wait for the parent, which raises it and stops the
   map, to close the socket. Reading all it sends meanwhile keeps its
   writes from failing, so it never takes this for a death. */
static void init_failed(WState *w) {
  lua_State *L = w->L;
  int box = lua_gettop(L) - 2;
  char sink[4096];
  parmap_put_error(L, &w->out, w->oscratch, "init", box,
                   lua_tostring(L, box + 1), lua_tostring(L, box + 2), w->pid);
  flush(w, 0, 0, FLAG_INIT);
  for (;;) {
    ssize_t r = read(w->fd, sink, sizeof sink);
    if (r > 0 || (r < 0 && errno == EINTR)) continue;
    break;
  }
  worker_exit(1);
}

/* The parent closed the socket: the map ended, or this worker ran its
   maxtasks items. finish's error cannot reach the map any more (every
   result is delivered): it goes to stderr. */
static void run_finish(WState *w) {
  lua_State *L = w->L;
  if (call_user(w, U_FINISH)) return;
  fprintf(stderr, "parmap worker %d (pid %d): finish failed: %s\n%s\n",
          worker_id, (int)w->pid, lua_tostring(L, -2), lua_tostring(L, -1));
  worker_exit(1);
}

static void replace_os_exit(lua_State *L) {
  if (lua_getglobal(L, "os") == LUA_TTABLE) {
    lua_pushcfunction(L, worker_os_exit);
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
  if (guard_armed && lua_isnoneornil(L, 2)) worker_exit(EXIT_FAILURE);
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

void parmap_exit_guard(lua_State *L) {
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

/* worker_loop(wstate, map): runs under lua_pcall, so every stack index
   below is of this call's frame. */
static int worker_loop(lua_State *L) {
  WState *w = (WState *)lua_touserdata(L, 1);
  if (!lua_checkstack(L, U_COUNT + 16)) worker_exit(70);
  tb_floor = stack_depth(L) + 1; /* + run_items, under which fn runs */
  w->map = 2;
  replace_os_exit(L);
  reseed_child(L);
  parmap_exit_guard(L);
  lua_pushcfunction(L, parmap_msgh);
  w->msgh = lua_gettop(L);
  lua_getiuservalue(L, w->map, U_SCRATCH);
  w->oscratch = lua_gettop(L);
  w->cs.star = w->cfg->star;
  w->cs.kwstar = w->cfg->kwstar;
  w->cs.has_kw = w->cfg->has_kw;
  w->cs.nargs = w->cfg->nargs;
  if (!call_user(w, U_INIT)) init_failed(w);
  for (;;) {
    TaskHdr h;
    int r = parmap_read_all(w->fd, &h, sizeof h);
    if (r == 1) { /* the parent closed: done */
      run_finish(w); /* under the exit guard: user code */
      guard_armed = 0;
      return 0;
    }
    if (r < 0 || h.magic != MAGIC_TASK) worker_exit(r < 0 ? 0 : 70);
    w->in.len = 0;
    if (h.bodylen) {
      if (parmap_buf_reserve(&w->in, (size_t)h.bodylen))
        luaL_error(L, "parmap: not enough memory");
      if (parmap_read_all(w->fd, w->in.p, (size_t)h.bodylen)) worker_exit(0);
      w->in.len = (size_t)h.bodylen;
    }
    run_segment(w, &h);
  }
}

static int noop(lua_State *L) {
  (void)L;
  return 0;
}

void parmap_run_hooks(lua_State *L) {
  lua_pushcfunction(L, noop);
  lua_call(L, 0, 0);
}

void parmap_clear_interrupt(lua_State *L) {
  const int lstop = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
  if (lua_gethook(L) != NULL && lua_gethookmask(L) == lstop &&
      lua_gethookcount(L) == 1)
    lua_sethook(L, NULL, 0, 0);
}

void parmap_child_prepare(lua_State *L) {
  tb_floor = stack_depth(L); /* the calling C function and all below it */
  worker_id = worker_n = 0;  /* a ReturnProcess child is no map's worker */
  replace_os_exit(L);
  reseed_child(L);
  parmap_exit_guard(L);
}

void parmap_worker_main(lua_State *L, int map_idx, const Config *cfg,
                        Shm *shm, int fd, int id, int n) {
  WState w;
  memset(&w, 0, sizeof w);
  parmap_clear_interrupt(L);
  worker_id = id;
  worker_n = n;
  lua_gc(L, LUA_GCSTOP, 0);
  w.L = L;
  w.cfg = cfg;
  w.shm = shm;
  w.fd = fd;
  w.pid = getpid();
  w.gc_base_kb = lua_gc(L, LUA_GCCOUNT, 0);
  if (parmap_buf_reserve(&w.out, FRAME_HDR)) worker_exit(70);
  w.out.len = FRAME_HDR;
  if (!lua_checkstack(L, 8)) worker_exit(70);
  lua_pushcfunction(L, worker_loop);
  lua_pushlightuserdata(L, &w);
  lua_pushvalue(L, map_idx);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    fprintf(stderr, "parmap worker %d: %s\n", (int)w.pid,
            lua_isstring(L, -1) ? lua_tostring(L, -1) : "internal error");
    worker_exit(70);
  }
  worker_exit(0);
}
