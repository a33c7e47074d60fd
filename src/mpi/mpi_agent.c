/*
** mpi_agent.c: a node agent of parmap-mpi (ranks > 0; see mpi.h).
**
** The agent never runs the user's script. It waits for maps from rank 0
** and runs each on its node's cores with parmap's own fork engine:
** parmap.parmap(fn, items, {N = ..., ordered = false, exception = "return"}),
** where items is an iterator over the segments rank 0 sends, and the loop
** body sends the results back in batches. So whatever works inside a
** worker works here: errors, deaths, timeouts.
**
** The items iterator is the only place the agent blocks on MPI, and only
** when it holds no segment, after sending every result it holds (mpi.h
** explains why that cannot deadlock).
*/
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "codec.h"
#include "engine.h"
#include "map.h"
#include "parmap_mpi.h"
#include "proc.h"

/* under Open MPI's TCP eager limit (btl_tcp_eager_limit, 64 KiB): a batch
   arrives whole, rank 0 need not wait for this agent to send the rest */
#define FLUSH_BYTES ((size_t)60 << 10)
#define FLUSH_NS 5000000ull /* 5 ms: a batch never waits longer */
#define PUMP_NS 200000ull /* 0.2 ms: how often a busy agent reads rank 0 */

typedef struct Inbox {
  struct Msg {
    parmap_buf b;
    int tag;
  } *v;
  int head, n, cap;
} Inbox;

static struct {
  Outbox out;
  Inbox in;
  uint32_t mapid;
  int ended, aborted;
  int lost; /* rank 0 gave an agent up: no MPI_Finalize (it would wait) */
  parmap_buf seg; /* the current segment */
  size_t pos;
  uint32_t left;
  int64_t gnext;
  lua_Integer nlocal;
  int wbase; /* this map's workers are wbase + 1.. in the job */
  /* local index -> the map's index: one run per segment (or part of
     one), dropped from the front once every item of it is answered */
  struct Run {
    lua_Integer local, global, count, left;
  } *runs;
  int rhead, rn, rcap, rlast;
  parmap_buf res; /* the batch of results being filled */
  parmap_buf rec; /* one result */
  uint32_t nres;
  uint64_t last_flush, last_pump;
  unsigned calls;
} A;

static void nomem(lua_State *L) { luaL_error(L, "parmap-mpi: agent out of memory"); }

/* Receive one message from rank 0 into the inbox. */
/* The batch of results and the Outbox are shared with the heartbeat
   thread, which sends a batch that has waited 5 ms (the engine may wait a
   long time for its workers, with results of a burst still here). */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static int pump(lua_State *L, int block) {
  parmap_buf b = PARMAP_BUF_INIT;
  int tag, from, r;
  struct Msg *m;
  pthread_mutex_lock(&mu);
  mpi_poll(&A.out);
  pthread_mutex_unlock(&mu);
  r = mpi_recv(0, block, &b, &tag, &from);
  if (r <= 0) {
    parmap_buf_free(&b);
    if (r < 0) nomem(L);
    return 0;
  }
  if (A.in.head + A.in.n == A.in.cap) {
    if (A.in.head > 0) {
      memmove(A.in.v, A.in.v + A.in.head, (size_t)A.in.n * sizeof *A.in.v);
      A.in.head = 0;
    } else {
      int cap = A.in.cap ? 2 * A.in.cap : 16;
      void *v = realloc(A.in.v, (size_t)cap * sizeof *A.in.v);
      if (v == NULL) {
        parmap_buf_free(&b);
        nomem(L);
      }
      A.in.v = (struct Msg *)v;
      A.in.cap = cap;
    }
  }
  m = &A.in.v[A.in.head + A.in.n++];
  m->b = b;
  m->tag = tag;
  /* QUIT too: rank 0 is leaving, the items still running stop */
  if ((tag == TAG_ABORT && mpi_hdr(&b).mapid == A.mapid) || tag == TAG_QUIT)
    A.aborted = 1;
  return 1;
}

/* The oldest message: *b takes its buffer (freeing what b held). */
static int pop(parmap_buf *b) {
  struct Msg *m = &A.in.v[A.in.head];
  int tag = m->tag;
  parmap_buf_free(b);
  *b = m->b;
  A.in.head++;
  A.in.n--;
  if (A.in.n == 0) A.in.head = 0;
  return tag;
}

/* Send the batch; with mu held. */
static int flush_locked(void) {
  MsgHdr h;
  if (A.nres == 0) return 0;
  memcpy(&h, A.res.p, sizeof h);
  h.count = A.nres;
  memcpy(A.res.p, &h, sizeof h);
  if (mpi_send(&A.out, &A.res, 0, TAG_RES)) return -1;
  A.nres = 0;
  A.last_flush = parmap_now_ns();
  return 0;
}

static void flush(lua_State *L) {
  int r;
  pthread_mutex_lock(&mu);
  r = flush_locked();
  pthread_mutex_unlock(&mu);
  if (r) nomem(L);
}

/* A header-only message to rank 0. */
static void send_hdr(lua_State *L, int tag) {
  int r;
  pthread_mutex_lock(&mu);
  r = mpi_send_hdr(&A.out, 0, tag, A.mapid, 0);
  pthread_mutex_unlock(&mu);
  if (r) nomem(L);
}

/* Items local..local+n-1 are the map's global..global+n-1. */
static void add_run(lua_State *L, lua_Integer local, lua_Integer global,
                    lua_Integer n) {
  struct Run *r;
  if (A.rn > 0) {
    r = &A.runs[A.rhead + A.rn - 1];
    if (r->local + r->count == local && r->global + r->count == global) {
      r->count += n;
      r->left += n;
      return;
    }
  }
  if (A.rhead + A.rn == A.rcap) {
    if (A.rhead > 0) {
      memmove(A.runs, A.runs + A.rhead, (size_t)A.rn * sizeof *A.runs);
      A.rlast -= A.rhead;
      A.rhead = 0;
    } else {
      int cap = A.rcap ? 2 * A.rcap : 64;
      void *v = realloc(A.runs, (size_t)cap * sizeof *A.runs);
      if (v == NULL) nomem(L);
      A.runs = (struct Run *)v;
      A.rcap = cap;
    }
  }
  r = &A.runs[A.rhead + A.rn++];
  r->local = local;
  r->global = global;
  r->count = r->left = n;
}

/* The run of local item i (results come in runs: the last one found is
   tried first). */
static struct Run *run_of(lua_State *L, lua_Integer i) {
  int lo = A.rhead, hi = A.rhead + A.rn - 1;
  struct Run *r;
  if (A.rlast >= lo && A.rlast <= hi) {
    r = &A.runs[A.rlast];
    if (i >= r->local && i < r->local + r->count) return r;
  }
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    r = &A.runs[mid];
    if (i < r->local)
      hi = mid - 1;
    else if (i >= r->local + r->count)
      lo = mid + 1;
    else {
      A.rlast = mid;
      return r;
    }
  }
  luaL_error(L, "parmap-mpi: no item %d in this agent", (int)i);
  return NULL;
}

/* The map's index of local item i, whose result is being sent. */
static lua_Integer answer(lua_State *L, lua_Integer i) {
  struct Run *r = run_of(L, i);
  lua_Integer g = r->global + (i - r->local);
  r->left--;
  while (A.rn > 0 && A.runs[A.rhead].left == 0) {
    A.rhead++;
    A.rn--;
  }
  if (A.rn == 0) A.rhead = 0;
  return g;
}

/* agent.wait() -> fnrecord, opts | nil (leave) */
static int a_wait(lua_State *L) {
  parmap_buf b = PARMAP_BUF_INIT;
  for (;;) {
    int tag;
    MsgHdr h;
    while (A.in.n == 0) pump(L, 1);
    tag = pop(&b);
    h = mpi_hdr(&b);
    if (tag == TAG_QUIT) {
      A.lost = h.a != 0;
      parmap_buf_free(&b);
      return 0;
    }
    if (tag == TAG_MAP) {
      unsigned long long fnlen;
      size_t pos = sizeof h;
      const char *err = NULL;
      A.mapid = h.mapid;
      A.ended = A.aborted = 0;
      A.wbase = h.a > 0 && h.a < INT_MAX ? (int)h.a : 0;
      parmap_worker_numbering(A.wbase, h.b > 0 && h.b < INT_MAX ? (int)h.b : 0);
      A.left = 0;
      A.nlocal = 0;
      A.rhead = A.rn = A.rlast = 0;
      if (parmap_get_varint(b.p, b.len, &pos, &fnlen) || fnlen > b.len - pos) {
        parmap_buf_free(&b);
        luaL_error(L, "parmap-mpi: bad map message");
      }
      lua_pushlstring(L, b.p + pos, (size_t)fnlen);
      pos += (size_t)fnlen;
      if (parmap_decode(L, b.p, b.len, &pos, lua_upvalueindex(1), &err) != 1 ||
          !lua_istable(L, -1)) {
        parmap_buf_free(&b);
        luaL_error(L, "parmap-mpi: bad map options (%s)", err ? err : "?");
      }
      if (h.count > 0) { /* N by default: this host's CPUs over its agents */
        lua_pushinteger(L, (lua_Integer)h.count);
        lua_setfield(L, -2, "share");
      }
      parmap_buf_free(&b);
      return 2;
    }
    /* what is left of an earlier map: dropped */
  }
}

/* Make sure a segment has items left: 1, or 0 at the end of the map's
   input (rank 0 ended it or left the map). Waits for rank 0 only when
   holding no segment, after sending every result held. */
static int segment(lua_State *L) {
  while (A.left == 0) {
    MsgHdr h;
    int tag;
    if (A.ended || A.aborted) return 0;
    if (A.in.n == 0) {
      flush(L); /* before waiting: nothing of ours sits here */
      pump(L, 1);
      continue;
    }
    h = mpi_hdr(&A.in.v[A.in.head].b);
    tag = A.in.v[A.in.head].tag;
    if (tag == TAG_MAP || tag == TAG_QUIT) { /* not ours: for wait() */
      A.ended = 1;
      continue;
    }
    tag = pop(&A.seg);
    if (h.mapid != A.mapid) continue;
    if (tag == TAG_SEG) {
      A.pos = sizeof h;
      A.left = h.count;
      A.gnext = h.a;
      send_hdr(L, TAG_CREDIT);
    } else if (tag == TAG_END) {
      A.ended = 1;
    } else if (tag == TAG_ABORT) {
      A.aborted = 1;
    }
  }
  return 1;
}

/* The engine's raw source (map.h): the segment's records as they came. */
static lua_Integer raw_peek(lua_State *L, const char **p, size_t *len) {
  if (!segment(L)) return 0;
  *p = A.seg.p + A.pos;
  *len = A.seg.len - A.pos;
  return (lua_Integer)A.left;
}
static void raw_take(lua_State *L, lua_Integer n, size_t nbytes) {
  add_run(L, A.nlocal + 1, A.gnext, n);
  A.nlocal += n;
  A.gnext += n;
  A.left -= (uint32_t)n;
  A.pos += nbytes;
}
/* agent.raw: the items function that stands for the raw source; never
   called (the engine takes the records instead). */
static int a_raw(lua_State *L) {
  return luaL_error(L, "parmap-mpi: the raw items source was called");
}
/* The engine's tick while it waits for its workers: rank 0 may have left
   the map, and the items running then are stopped at once (their results
   would be dropped). */
static int raw_tick(lua_State *L) {
  while (pump(L, 0)) {}
  return A.aborted;
}
/* Would raw_peek return without waiting for rank 0? */
static int raw_ready(lua_State *L) {
  while (pump(L, 0)) {}
  return A.left > 0 || A.in.n > 0 || A.ended || A.aborted;
}
static int a_items(lua_State *L);
static const ParmapRawSource RAW = {a_raw, raw_peek, raw_take, raw_tick,
                                    raw_ready, a_items};

/* agent.items(): the next item as {item, the map's index} (box mode: the
   input has nil items, or seed needs the index), or nil at the end. */
static int a_items(lua_State *L) {
  const char *err = NULL;
  if (!segment(L)) return 0;
  if (parmap_decode(L, A.seg.p, A.seg.len, &A.pos, lua_upvalueindex(1),
                    &err) != 1)
    luaL_error(L, "parmap-mpi: bad segment (%s)", err ? err : "?");
  lua_createtable(L, 2, 0);
  lua_insert(L, -2);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, (lua_Integer)A.gnext);
  lua_rawseti(L, -2, 2);
  raw_take(L, 1, 0);
  return 1;
}

/* agent.global(i): the map's index of this agent's item i */
static int a_global(lua_State *L) {
  lua_Integer i = luaL_checkinteger(L, 1);
  struct Run *r = run_of(L, i);
  lua_pushinteger(L, r->global + (i - r->local));
  return 1;
}

/* Is the value at idx a parmap error object? */
static int is_error(lua_State *L, int idx) {
  int r = 0;
  if (luaL_getmetafield(L, idx, "__name") != LUA_TNIL) {
    const char *s = lua_tostring(L, -1);
    r = s != NULL && strcmp(s, "parmap.Error") == 0;
    lua_pop(L, 1);
  }
  return r;
}

/* Append the fields of the error object at idx as one codec record to b:
   kind err message traceback pid attempts, and with nf = 7 worker (the
   engine's number made the job's); nf = 9 adds signal and oom (a worker a
   signal killed) after a nil worker. An err that cannot travel goes as its
   message. The codec's scratch is upvalue 1. */
static void put_error(lua_State *L, int idx, int nf, parmap_buf *b) {
  static const char *const f[] = {"kind",     "err",    "message",
                                  "traceback", "pid",   "attempts",
                                  "worker",   "signal", "oom"};
  const char *what = NULL;
  int k, top = lua_gettop(L);
  for (k = 0; k < nf; k++) lua_getfield(L, idx, f[k]);
  if (nf == 7 && lua_isinteger(L, -1)) {
    lua_Integer wk = lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_pushinteger(L, wk + A.wbase);
  }
  if (parmap_encode(L, top + 1, nf, b, lua_upvalueindex(1), &what) !=
      PARMAP_OK) {
    lua_pushvalue(L, top + 3); /* err cannot travel: its message does */
    lua_replace(L, top + 2);
    if (parmap_encode(L, top + 1, nf, b, lua_upvalueindex(1), &what) !=
        PARMAP_OK)
      luaL_error(L, "parmap-mpi: cannot send an error (a %s)", what);
  }
  lua_settop(L, top);
}

/* Queue the record of the map's item g for rank 0. A batch goes out
   when it is large, or when the previous one left 5 ms ago or more, so a
   sparse result never waits (the clock is read for a batch's first result
   and every 64th; the heartbeat thread sends one that waits longer, and
   segment() all before the agent waits for items). Returns 0 when rank 0
   has closed the map (the engine is then stopped). */
static int queue(lua_State *L, lua_Integer g, const char *rec, size_t len) {
  int err = 0, look = 0;
  uint64_t now = 0;
  pthread_mutex_lock(&mu);
  if ((A.nres == 0 && mpi_begin(&A.res, A.mapid, 0, 0, 0)) ||
      parmap_buf_reserve(&A.res, 2 * PARMAP_VARINT_MAX + len)) {
    err = 1;
  } else {
    char *q = A.res.p + A.res.len;
    q = parmap_varint_unsafe(q, (unsigned long long)g);
    q = parmap_varint_unsafe(q, (unsigned long long)len);
    memcpy(q, rec, len);
    A.res.len = (size_t)(q - A.res.p) + len;
    if ((++A.nres & 63) == 1 || A.res.len >= FLUSH_BYTES) {
      now = parmap_now_ns();
      if (A.res.len >= FLUSH_BYTES || now - A.last_flush >= FLUSH_NS)
        err = flush_locked();
      look = now - A.last_pump >= FLUSH_NS;
    }
  }
  pthread_mutex_unlock(&mu);
  if (err) nomem(L);
  /* rank 0 may have left the map, a segment may be coming, a send may
     need progress: look every 64 results once 0.2 ms have passed, or 5 ms
     (over TCP each look polls the sockets: a system call or more) */
  if ((++A.calls & 63) == 0 && !look) {
    if (!now) now = parmap_now_ns();
    look = now - A.last_pump >= PUMP_NS;
  }
  if (look) {
    A.last_pump = now;
    while (pump(L, 0)) {}
  }
  return !A.aborted;
}

/* The engine's sink (map.h): a result record of local item i, relayed as
   the worker wrote it. */
static int relay(void *ud, lua_Integer i, const char *rec, size_t len) {
  lua_State *L = (lua_State *)ud;
  return !queue(L, answer(L, i), rec, len);
}

/* Queue the error object at base + 1 of local item i (at base): its
   REC_ERR record. */
static int add_error(lua_State *L, int base) {
  lua_Integer g = answer(L, lua_tointeger(L, base));
  int nf;
  if (!is_error(L, base + 1))
    luaL_error(L, "parmap-mpi: item %d: the engine gave no error object",
               (int)g);
  A.rec.len = 0;
  if (parmap_buf_reserve(&A.rec, 1)) nomem(L);
  A.rec.p[A.rec.len++] = REC_ERR;
  lua_getfield(L, base + 1, "signal"); /* a died worker's: it travels too */
  nf = lua_isnil(L, -1) ? 6 : 9;
  lua_pop(L, 1);
  put_error(L, base + 1, nf, &A.rec);
  return queue(L, g, A.rec.p, A.rec.len);
}

/* agent.drain(map, fixup): relay the map's results to rank 0 until it is
   over (or rank 0 left it); fixup(i, e) first for an error. */
static int a_drain(lua_State *L) {
  luaL_checktype(L, 2, LUA_TFUNCTION);
  for (;;) {
    lua_settop(L, 2);
    if (parmap_map_relay(L, 1, relay, L) != 2) return 0;
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 4);
    lua_call(L, 2, 0);
    if (!add_error(L, 3)) return 0;
  }
}

/* agent.finish(ok, err): the map has ended here. */
static int a_finish(lua_State *L) {
  flush(L);
  if (lua_toboolean(L, 1)) {
    send_hdr(L, TAG_DONE);
  } else {
    /* FAIL_ERROR and the error object's record (an init that raised: rank 0
       raises the same object), or FAIL_TEXT and the message */
    parmap_buf b = PARMAP_BUF_INIT;
    size_t n;
    int r;
    if (mpi_begin(&b, A.mapid, 0, 0, 0) || parmap_buf_reserve(&b, 1)) nomem(L);
    if (is_error(L, 2)) {
      b.p[b.len++] = FAIL_ERROR;
      put_error(L, 2, 7, &b);
    } else {
      const char *s = luaL_tolstring(L, 2, &n);
      b.p[b.len++] = FAIL_TEXT;
      if (parmap_buf_reserve(&b, n)) nomem(L);
      memcpy(b.p + b.len, s, n);
      b.len += n;
    }
    pthread_mutex_lock(&mu);
    r = mpi_send(&A.out, &b, 0, TAG_FAIL);
    pthread_mutex_unlock(&mu);
    if (r) nomem(L);
  }
  return 0;
}

static const char *const DRIVER =
    "local agent = ...\n"
    "-- a map's globals are set in _G while it runs: the driver's own are locals\n"
    "local pcall, randomseed, type = pcall, math.randomseed, type\n"
    "local parmap = require 'parmap'\n"
    "local core = require 'parmap.core'\n"
    "local Check = require 'parmap.check'\n"
    "local make_error = require('parmap.errors').make_error\n"
    "local STAR = { ['false'] = false, ['true'] = true, none = parmap.None }\n"
    "local function fixup(i, e)\n"
    "  -- the traceback ends at fn, as the fork engine's does\n"
    "  e.traceback = e.traceback:gsub(\"\\n\\t%[C%]: in %?\\n\\t%[C%]: in upvalue 'call'.*$\", '')\n"
    "    :gsub(\"\\n\\t%[C%]: in upvalue 'call'.*$\", '')\n"
    "  -- the engine's messages (a death, a timeout, a shape, a result that\n"
    "  -- cannot travel) count this agent's items: the map's index, in err\n"
    "  -- too (what exception = 'proc' raises); fn's own error is left as is\n"
    "  if e.kind == 'error' then return end\n"
    "  local from, to = 'item ' .. i .. '%f[%D]', 'item ' .. agent.global(i)\n"
    "  e.message = e.message:gsub(from, to)\n"
    "  if type(e.err) == 'string' then e.err = e.err:gsub(from, to) end\n"
    "end\n"
    "local function run(rec, o)\n"
    "  local fn, restore = core.loadfn(rec)\n"
    "  local _globals <close> = restore -- put back when the map ends here\n"
    "  local init, finish, retry_if, cur\n"
    "  if o.bundle then fn, init, finish, retry_if = fn() end -- shared upvalues\n"
    "  local N = o.N or o.share or parmap.ncpu()\n"
    "  local timeout = o.timeout\n"
    "  -- N = 1 would run fn in this process: a worker process instead\n"
    "  if N == 1 and not timeout then timeout = 1e9 end\n"
    "  local opts = { N = N, ordered = false, exception = 'return', timeout = timeout,\n"
    "    maxtasks = o.maxtasks, maxmemory = o.maxmemory, retries = o.retries,\n"
    "    buffersize = o.buffersize, init_timeout = o.init_timeout,\n"
    "    finish_timeout = o.finish_timeout, retry_delay = o.retry_delay,\n"
    "    retry_delay_max = o.retry_delay_max, chunksize = o.chunksize }\n"
    "  opts.init, opts.finish = init, finish\n"
    "  if retry_if then -- it sees the map's index (items come boxed then): in\n"
    "    -- a worker the one it runs, here (a death) agent.global's\n"
    "    opts.retry_if = function(e)\n"
    "      local i = e.index\n"
    "      local g = parmap.worker() and cur or agent.global(i)\n"
    "      e.traceback = e.traceback:gsub(\"\\n\\t%[C%]: in %?\\n\\t%[C%]: in upvalue 'call'.*$\", '')\n"
    "        :gsub(\"\\n\\t%[C%]: in upvalue 'call'.*$\", '')\n"
    "      e.message = e.message:gsub('item ' .. i .. '%f[%D]', 'item ' .. g)\n"
    "      e.index = g\n"
    "      return retry_if(e)\n"
    "    end\n"
    "  end\n"
    "  local args = o.args or {}\n"
    "  args.n = o.nargs\n"
    "  if o.box then -- nil items, or seed: the call table applied here\n"
    "    local seed = o.seed\n"
    "    local call = core.caller({ fn = fn, star = o.star, kwstar = o.kwstar,\n"
    "      args = args, nargs = o.nargs, has_kw = o.has_kw, kwargs = o.kwargs })\n"
    "    fn = function(box)\n"
    "      cur = box[2]\n"
    "      if seed then randomseed(seed, box[2]) end\n"
    "      return call(box[1], box[2], false)\n"
    "    end\n"
    "  else\n"
    "    opts.star, opts.kwstar = STAR[o.star], o.kwstar\n"
    "    opts.args, opts.kwargs = args, o.kwargs\n"
    "  end\n"
    "  local items = agent.raw -- the records go through as they came\n"
    "  if o.box then items = agent.items end\n"
    "  -- a bad shape is an item's result here: rank 0's policy raises it at\n"
    "  -- its turn (after the items before it), naming the map's index\n"
    "  local spec = Check.map_spec(1, fn, items, opts, 0)\n"
    "  local policy = spec.fail\n"
    "  spec.fail = function(index, kind, ...)\n"
    "    if kind == 'shape' then return make_error(index, kind, ...) end\n"
    "    return policy(index, kind, ...)\n"
    "  end\n"
    "  local m <close> = core.start(spec)\n"
    "  agent.drain(m, fixup)\n"
    "end\n"
    "while true do\n"
    "  local rec, o = agent.wait()\n"
    "  if rec == nil then break end\n"
    "  agent.finish(pcall(run, rec, o))\n"
    "end\n";

/* The heartbeat: every second a TAG_HB to rank 0, from a thread, so that an
   agent busy in its engine (waiting for its workers) still says it lives.
   Rank 0 takes an agent for dead after a silence (resilient maps only).
   Every 0.1 s it also sends a batch of results that has waited 5 ms. */
static volatile int hb_stop = 0;
static void *heartbeat(void *arg) {
  (void)arg;
  while (!hb_stop) {
    int k;
    MsgHdr h;
    struct timespec ts = {0, 100000000};
    for (k = 0; k < 10 && !hb_stop; k++) {
      uint64_t now;
      nanosleep(&ts, NULL);
      now = parmap_now_ns();
      pthread_mutex_lock(&mu);
      if (A.nres > 0 && now - A.last_flush >= FLUSH_NS) flush_locked();
      pthread_mutex_unlock(&mu);
    }
    if (hb_stop) break;
    memset(&h, 0, sizeof h);
    MPI_Send(&h, (int)sizeof h, MPI_BYTE, 0, TAG_HB, MPI_COMM_WORLD);
  }
  return NULL;
}

int parmap_mpi_agent_main(lua_State *L, int rank, int threads) {
  pthread_t hb;
  int hb_on = 0;
  static const luaL_Reg funcs[] = {{"wait", a_wait},
                                   {"items", a_items},
                                   {"drain", a_drain},
                                   {"finish", a_finish},
                                   {"global", a_global},
                                   {"raw", a_raw},
                                   {NULL, NULL}};
  parmap_buf b = PARMAP_BUF_INIT;
  char host[256];
  int ncpu = parmap_ncpu(), status = 0;
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  size_t n;
  if (gethostname(host, sizeof host) != 0) strcpy(host, "?");
  host[sizeof host - 1] = '\0';
  n = strlen(host);
  if (ncpu == 1 && online > 1)
    fprintf(stderr,
            "parmap-mpi: warning: rank %d on %s may use 1 CPU of %ld (bound "
            "to one core?): start with `mpirun --bind-to none` or `srun -c "
            "<cores>`\n", rank, host, online);
  { /* rank 0's PARMAP_* settings first (a remote login has not got
       them), before anything reads one */
    int tag = 0, from;
    size_t pos = sizeof(MsgHdr);
    if (mpi_recv(0, 1, &b, &tag, &from) != 1 || tag != TAG_ENV) return 1;
    while (pos < b.len) {
      char *kv = b.p + pos, *eq;
      size_t kn = strnlen(kv, b.len - pos);
      if (kn == b.len - pos) break; /* no NUL: not ours */
      eq = strchr(kv, '=');
      if (eq != NULL) {
        *eq = '\0';
        setenv(kv, eq + 1, 1);
      }
      pos += kn + 1;
    }
    b.len = 0;
  }
  /* rank 0 weighs agents by the N they will run: parmap.ncpu(), which a
     cgroup's CPU quota lowers below the affinity count */
  {
    int top = lua_gettop(L);
    if (luaL_dostring(L, "return require('parmap').ncpu()") == LUA_OK &&
        lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1 &&
        lua_tointeger(L, -1) < ncpu)
      ncpu = (int)lua_tointeger(L, -1);
    lua_settop(L, top);
  }
  if (threads == MPI_THREAD_MULTIPLE)
    hb_on = pthread_create(&hb, NULL, heartbeat, NULL) == 0;
  /* b = 1: it sends heartbeats, so rank 0 may watch its silence */
  if (mpi_begin(&b, 0, 0, ncpu, hb_on) || parmap_buf_reserve(&b, n)) return 1;
  memcpy(b.p + b.len, host, n);
  b.len += n;
  pthread_mutex_lock(&mu);
  status = mpi_send(&A.out, &b, 0, TAG_HELLO) ? 1 : 0;
  pthread_mutex_unlock(&mu);
  if (status) return 1;

  lua_newtable(L); /* the agent module */
  lua_newtable(L); /* upvalue 1: the codec's scratch table */
  luaL_setfuncs(L, funcs, 1);
  parmap_map_rawsource(&RAW);
  if (luaL_loadbuffer(L, DRIVER, strlen(DRIVER), "=parmap-mpi agent") != LUA_OK ||
      (lua_insert(L, -2), lua_pcall(L, 1, 0, 0)) != LUA_OK) {
    fprintf(stderr, "parmap-mpi: agent %d on %s: %s\n", rank, host,
            lua_tostring(L, -1));
    status = 1;
  }
  if (hb_on) { /* no heartbeat after BYE: rank 0 then finalizes */
    hb_stop = 1;
    pthread_join(hb, NULL);
  }
  if (status == 0) mpi_send_hdr(&A.out, 0, TAG_BYE, 0, 0);
  mpi_drain(&A.out);
  parmap_buf_free(&A.seg);
  parmap_buf_free(&A.res);
  parmap_buf_free(&A.rec);
  while (A.in.n > 0) pop(&A.seg);
  parmap_buf_free(&A.seg);
  free(A.in.v);
  free(A.runs);
  if (status) MPI_Abort(MPI_COMM_WORLD, 1);
  return status;
}

int parmap_mpi_agent_lost(void) { return A.lost; }
