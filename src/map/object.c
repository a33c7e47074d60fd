/*
** map/object.c: the Lua object of a map: core.start, core.next,
** core.collect, close and __gc, progress, and the hand-over of a failure to
** the policy. Part of src/map.c (one compilation unit).
*/
#include "internal.h"

/* The map at idx. Called once per item: a size-and-magic test instead of
   luaL_checkudata's registry lookup by name. It does not touch m->self:
   a call that re-enters a busy map must leave the running step's alone. */
static Map *checkmap(lua_State *L, int idx) {
  Map *m = (Map *)lua_touserdata(L, idx);
  /* a light userdata has no length, so it fails the size test */
  if (m == NULL || lua_rawlen(L, idx) != sizeof(Map) || m->magic != MAP_MAGIC)
    luaL_typeerror(L, idx, MAP_MT);
  return m;
}

/* ---------------------------------------------------------------- closing */

static int map_gc(lua_State *L) {
  Map *m = (Map *)luaL_checkudata(L, 1, MAP_MT);
  stop(m, 1);
  release(m);
  loop_release(m);
  out_close_all(m);
  free(m->op);
  m->op = NULL;
  return 0;
}

/* close(map), __close. While the engine runs a step (close() from a
   progress callback, the items iterator, a finalizer, a hook), the workers
   and slots are in use: the stop waits until the step returns, and the map
   then ends as if it were over. */
static int map_close(lua_State *L) {
  Map *m = checkmap(L, 1);
  if (m->busy) {
    m->close_req = 1;
    return 0;
  }
  stop(m, 1);
  loop_close(m);
  return 0;
}

/* ---------------------------------------------------------------- results */

static void progress(lua_State *L, Map *m, int finished) {
  if (m->done == m->reported && !finished) return;
  if (lua_getiuservalue(L, m->self, U_PROGRESS) == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  m->reported = m->done;
  lua_pushinteger(L, m->done);
  if (m->cfg.total >= 0)
    lua_pushinteger(L, m->cfg.total);
  else
    lua_pushnil(L);
  lua_pushboolean(L, finished);
  lua_call(L, 3, 0);
}

/* An error record (kind, err, message, traceback, pid[, x]) at base + 1..n
   for item `index`, which lost `lost` runs to deaths and timeouts; x is
   the runs its worker saw fail before (an integer) or the error object's
   extra fields (a table: {signal = s} of a death). The policy
   (U_FAIL) raises it (step then stops the map), or returns the error
   object: index and it. */
static int failed(lua_State *L, Map *m, lua_Integer lost, lua_Integer index,
                  int base, int n) {
  int k, fields;
  lua_Integer attempts;
  const char *kind;
  if ((n != 5 && n != 6) || lua_type(L, base + 1) != LUA_TSTRING ||
      lua_type(L, base + 3) != LUA_TSTRING) {
    return luaL_error(L, "parmap: corrupt error record for item %I",
                      (LUAI_UACINT)index);
  }
  /* its runs: fn raised in every one the worker gave it (its retries less
     those lost before); a death or timeout ended each one counted; a
     result that cannot travel ends it at once */
  kind = lua_tostring(L, base + 1);
  if (strcmp(kind, "error") == 0) /* retry_if may have stopped it early:
                                      then the worker counted its runs */
    attempts = n == 6 && lua_isinteger(L, base + 6)
                   ? lua_tointeger(L, base + 6) + 1 : m->cfg.retries + 1;
  else if (strcmp(kind, "died") == 0 || strcmp(kind, "timeout") == 0)
    attempts = lost;
  else /* a sixth value: the runs its worker saw fail before this one */
    attempts = (n == 6 && lua_isinteger(L, base + 6) ? lua_tointeger(L, base + 6)
                                                      : lost) + 1;
  if (attempts < 1) attempts = 1;
  lua_getiuservalue(L, m->self, U_FAIL);
  lua_pushinteger(L, index);
  for (k = 1; k <= 5; k++) lua_pushvalue(L, base + k);
  lua_pushinteger(L, attempts);
  fields = n == 6 && lua_istable(L, base + 6);
  if (fields && m->op) { /* output = "item": what a dead item wrote */
    int j;
    for (j = 0; j < 2; j++) {
      size_t len;
      const char *p;
      lua_getfield(L, base + 6, j ? "output_stderr" : "output");
      p = lua_tolstring(L, -1, &len);
      if (p) out_write(L, m, j, p, len);
      lua_pop(L, 1);
    }
  }
  if (fields) lua_pushvalue(L, base + 6); /* fields: {signal = s} */
  lua_call(L, fields ? 8 : 7, 1); /* fail(index, kind, err, message, tb,
                        pid, attempts[, fields]): raises, or returns the
                        error object */
  lua_pushinteger(L, index);
  lua_insert(L, -2);
  return 2;
}

/* output = "item": the REC_OUT prefix at `at` of item index's record;
   writes what the item wrote, returns where its next part starts. */
static MAP_COLD size_t take_output(lua_State *L, Map *m, Slot *s,
                                   lua_Integer index, size_t at) {
  uint64_t n[2];
  if (s->out.len - at < 1 + sizeof n)
    luaL_error(L, "parmap: corrupt output of item %I", (LUAI_UACINT)index);
  memcpy(n, s->out.p + at + 1, sizeof n);
  at += 1 + sizeof n;
  if (n[0] > s->out.len - at || n[1] > s->out.len - at - n[0])
    luaL_error(L, "parmap: corrupt output of item %I", (LUAI_UACINT)index);
  /* a copy: the writer may step Lua, never this map (it is busy) */
  out_write(L, m, 0, s->out.p + at, (size_t)n[0]);
  out_write(L, m, 1, s->out.p + at + n[0], (size_t)n[1]);
  return at + (size_t)(n[0] + n[1]);
}

/* The loop took the record of s that ends at pos: when it was the slot's
   last, the slot may go (and workers waiting for room get it). */
static MAP_INLINE void took(lua_State *L, Map *m, Slot *s, size_t pos) {
  s->rpos = pos;
  m->taken++;
  if (++s->consumed == s->count) {
    if (m->cfg.ordered) m->seq_take++;
    if (!s->busy) release_slot(m, s); /* else when its segment ends */
    pump(L, m, 0); /* workers may be waiting for this room */
  }
}

/* Push index and values of the next record of s; returns the count. With
   a sink (parmap_map_relay), a REC_OK record goes to it as it is instead:
   returns RELAYED, or SINK_STOP when the sink says stop. */
static MAP_INLINE int emit(lua_State *L, Map *m, Slot *s) {
  lua_Integer index = s->start + s->consumed;
  size_t at = s->rpos, pos;
  int status, n, base;
  lua_Integer lost = 0;
  const char *err = NULL;
  /* one test on the plain path for both prefixes (REC_OUT > REC_STATS) */
  if (at < s->out.len && (unsigned char)s->out.p[at] >= REC_STATS) {
    if (s->out.p[at] == (char)REC_OUT) /* output = "item" */
      at = take_output(L, m, s, index, at);
    if (at < s->out.len && s->out.p[at] == (char)REC_STATS) { /* stats */
      if (s->out.len - at <= 1 + STATS_LEN)
        return luaL_error(L, "parmap: corrupt result for item %I: no record",
                          (LUAI_UACINT)index);
      stats_take(L, m, index, s->out.p + at + 1);
      at += 1 + STATS_LEN;
    }
  }
  pos = at + 1;
  if (at >= s->out.len) { /* a frame announced more than it carried */
    return luaL_error(L, "parmap: corrupt result for item %I: no record",
                      (LUAI_UACINT)index);
  }
  status = (unsigned char)s->out.p[at];
  if (m->sink && status == REC_OK) { /* relayed as it is (the MPI agent) */
    int halt;
    if (parmap_skip(s->out.p, s->out.len, &pos))
      return luaL_error(L, "parmap: corrupt result for item %I",
                        (LUAI_UACINT)index);
    halt = m->sink(m->sink_ud, index, s->out.p + at, pos - at);
    took(L, m, s, pos);
    return halt ? SINK_STOP : RELAYED;
  }
  lua_pushinteger(L, index);
  base = lua_gettop(L);
  n = parmap_decode_scalar(L, s->out.p, s->out.len, &pos);
  if (n == 0) { /* not one scalar: the general decoder, with its scratch */
    lua_getiuservalue(L, m->self, U_SCRATCH);
    n = parmap_decode(L, s->out.p, s->out.len, &pos, base + 1, &err);
    lua_remove(L, base + 1);
  }
  if (n < 0) {
    return luaL_error(L, "parmap: corrupt result for item %I: %s",
                      (LUAI_UACINT)index, err);
  }
  if (status != REC_OK) { /* read before the slot may be released */
    lost = s->ntries > 0 ? tries_of(s, index) : 0;
    /* took() may pump and pull items: a relay's caller has not queued
       this result yet, so the engine must not wait for input meanwhile */
    if (m->sink) m->relay_held = 1;
  }
  took(L, m, s, pos);
  return status == REC_OK ? n + 1 : failed(L, m, lost, index, base, n);
}

/* Every item is delivered: the map ends (returns 0), or raises the items
   iterator's error. */
static int over(lua_State *L, Map *m) {
  if (m->cfg.stats && !m->t_end) m->t_end = parmap_now_ns();
  if (!m->ierr) progress(L, m, 1);
  if (m->close_req) return 0;
  /* every item delivered: the journal learns (or checks) the count */
  if (m->jr && !m->ierr) parmap_journal_end(L, m->jr, m->next_index - 1);
  stop(m, 0);
  if (m->ierr) { /* every item pulled is delivered: now the error */
    m->ierr = 2;   /* and the map counts as stopped, not as over */
    lua_getiuservalue(L, m->self, U_IERR);
    return lua_error(L);
  }
  m->state = M_DONE;
  return 0;
}

/* The body of a step, run under lua_pcall by step(): push the next
   item's index and values and return their count, or 0 when the map is
   over (then the items iterator's error, if it raised, is raised). */
static int advance(lua_State *L, Map *m) {
  for (;;) {
    Slot *s;
    if (m->close_req) return 0; /* closed from a callback: step stops it */
    s = ready(m);
    if (s) return emit(L, m, s);
    if (finished(m)) return over(L, m);
    pump(L, m, 1);
    progress(L, m, 0);
  }
}

/* Interrupts: lua.c's Ctrl-C sets a hook that runs at the next Lua call;
   collect runs no Lua while results stream in, so it calls one every so
   many items. */
#define HOOK_EVERY 1024

/* step_body(map[, table]): advance once, or with a table collect into it
   (collect's loop, all under one protected call). */
static int step_body(lua_State *L) {
  Map *m = (Map *)lua_touserdata(L, 1);
  unsigned k = 0;
  m->self = 1;
  if (m->sink) { /* parmap_map_relay: on to the first failure */
    int n;
    while ((n = advance(L, m)) == RELAYED)
      if (++k % HOOK_EVERY == 0) parmap_run_hooks(L);
    if (n != SINK_STOP) return n;
    lua_pushboolean(L, 0);
    return 1;
  }
  if (lua_gettop(L) < 2) return advance(L, m);
  for (;;) {
    lua_Integer i;
    int n;
    lua_settop(L, 2);
    if (++k % HOOK_EVERY == 0) parmap_run_hooks(L);
    if ((n = advance(L, m)) == 0) break;
    i = lua_tointeger(L, -n); /* the top n values: index, results... */
    if (n > 1) {
      lua_settop(L, lua_gettop(L) - n + 2);
      lua_rawseti(L, 2, i);
    }
    if (i > m->last) m->last = i;
  }
  lua_settop(L, 2);
  lua_pushinteger(L, m->last);
  return 2;
}

/* Run step_body for the map at index 1 (and collect's table at 2). The
   engine runs protected, with the map busy: a callback (progress, the
   items iterator, make_error), a finalizer or a hook that steps this map
   again gets an error, and one that closes it is obeyed once the step is
   out. An error stops the map (reaping its workers) and goes on up. */
static int step_with(lua_State *L, Map *m, int nargs, lua_CFunction body) {
  int top, status;
  if (m->busy)
    return luaL_error(L, "parmap: map is busy (stepped from inside its own "
                         "step: a progress callback, the items iterator, a "
                         "finalizer or a hook)");
  if (m->state != M_RUNNING) {
    if (m->state == M_CLOSED && (!finished(m) || m->ierr))
      return luaL_error(L, "parmap: the map was stopped");
    if (nargs == 2) { /* collect on a map that is over: nothing more */
      lua_settop(L, 2);
      lua_pushinteger(L, m->last);
      return 2;
    }
    return 0;
  }
  top = lua_gettop(L) - nargs; /* below the map */
  lua_pushcfunction(L, body);
  lua_rotate(L, top + 1, 1);
  m->busy = 1;
  status = lua_pcall(L, nargs, LUA_MULTRET, 0);
  m->busy = 0;
  if (m->close_req) { /* closed from inside: the map ends here */
    m->close_req = 0;
    stop(m, 1);
    m->state = M_DONE;
    lua_settop(L, top);
    if (nargs == 2) { /* collect: the table (below the call) so far */
      lua_pushvalue(L, 2);
      lua_pushinteger(L, m->last);
      return 2;
    }
    return 0;
  }
  if (status != LUA_OK) {
    stop(m, 1); /* the map cannot go on: it would lose or garble items */
    return lua_error(L);
  }
  return lua_gettop(L) - top;
}

static int step(lua_State *L, Map *m, int nargs) {
  return step_with(L, m, nargs, step_body);
}

/* next(map): the iterator of a generic for. The most common record, a
   number (or boolean, nil) not last in its slot, is taken without a
   protected call: decoding it allocates nothing, so no user code (a
   finalizer) can run meanwhile and nothing can raise. */
static int map_next(lua_State *L) {
  Map *m = checkmap(L, 1);
  Slot *s;
  if (!m->busy && m->state == M_RUNNING && !m->close_req &&
      (s = ready(m)) != NULL && s->consumed + 1 < s->count &&
      s->rpos < s->out.len && s->out.p[s->rpos] == (char)REC_OK) {
    size_t pos = s->rpos + 1;
    lua_pushinteger(L, s->start + s->consumed);
    if (parmap_decode_plain(L, s->out.p, s->out.len, &pos)) {
      s->rpos = pos;
      s->consumed++;
      m->taken++; /* as emit does */
      return 2;
    }
    lua_pop(L, 1);
  }
  lua_settop(L, 1); /* the control value goes */
  return step(L, m, 1);
}

static const ParmapRawSource *raw_source;

int parmap_map_relay(lua_State *L, int idx, ParmapSink sink, void *ud) {
  Map *m = checkmap(L, idx);
  lua_pushvalue(L, idx);
  m->sink = sink;
  m->sink_ud = ud;
  m->relay_held = 0; /* the caller has queued the failure it was given */
  m->tick = raw_source ? raw_source->tick : NULL;
  return step(L, m, 1);
}

/* collect(map): a table t with t[i] = the first value of item i, and the
   highest index. parmap.map without a Lua loop per item. */
static int map_collect(lua_State *L) {
  Map *m = checkmap(L, 1);
  lua_Integer total = m->cfg.total;
  lua_settop(L, 1);
  lua_createtable(L, total > 0 && total < COLLECT_PREALLOC ? (int)total : 0,
                  0);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  return step(L, m, 2); /* map, t | map, t: step_body's arguments */
}

/* ---------------------------------------------------------------- start */

/* A bound in seconds (field `name` of the spec at 1): d when absent, 0
   (none) past 1e9 s (30 years). */
static double seconds(lua_State *L, const char *name, double d) {
  if (lua_getfield(L, 1, name) != LUA_TNIL) {
    lua_Number t = lua_tonumber(L, -1);
    if (lua_type(L, -1) != LUA_TNUMBER || !(t > 0))
      luaL_error(L, "parmap: bad option '%s' (positive number of "
                 "seconds expected, got %s)", name, luaL_tolstring(L, -1, NULL));
    d = t > 1e9 ? 0 : (double)t;
  }
  lua_pop(L, 1);
  return d;
}

/* A small integer option of the spec (a flag, a mode): d when absent. */
/* The options of a spec, checked and clamped so that no size computation
   can overflow: N to PARMAP_MAX_WORKERS and to the item count of a table
   input, chunksize to PARMAP_MAX_CHUNK, args.n at most PARMAP_MAX_ARGS. */
static void read_config(lua_State *L, Config *c) {
  lua_Integer n;
  CallSpec cs;
  parmap_read_call(L, 1, &cs);
  c->star = cs.star;
  c->kwstar = cs.kwstar;
  c->has_kw = cs.has_kw;
  c->nargs = cs.nargs;
  c->from_table = parmap_boolfield(L, 1, "from_table", 0);
  c->ordered = parmap_boolfield(L, 1, "ordered", 1);
  c->total = parmap_countfield(L, 1, "total", "total", 0, -1);
  if (c->from_table && c->total < 0) c->total = 0;
  c->chunksize = parmap_countfield(L, 1, "chunksize", "chunksize", 1, 0);
  if (c->chunksize > PARMAP_MAX_CHUNK) c->chunksize = PARMAP_MAX_CHUNK;
  c->maxtasks = parmap_countfield(L, 1, "maxtasks", "maxtasks", 1, 0);
  c->retries = parmap_countfield(L, 1, "retries", "retries", 0, 0);
  c->maxmemory = parmap_countfield(L, 1, "maxmemory", "maxmemory", 1, 0);
  c->stats = parmap_boolfield(L, 1, "stats", 0);
  {
    static const char *const modes[] = {"direct", "lines", "item", NULL};
    size_t plen = 0;
    const char *pre;
    c->output = parmap_optionfield(L, 1, "output", "direct", modes);
    lua_getfield(L, 1, "output_prefix");
    pre = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &plen) : "";
    if (plen >= sizeof c->prefix)
      luaL_error(L, "parmap: bad option 'output_prefix' (at most %d bytes)",
                 (int)sizeof c->prefix - 1);
    memcpy(c->prefix, pre, plen + 1);
    lua_pop(L, 1);
  }
  c->has_retry_if = lua_getfield(L, 1, "retry_check") == LUA_TFUNCTION;
  lua_pop(L, 1);
  c->retry_delay = parmap_numfield(L, 1, "retry_delay", 0);
  c->retry_delay_max = parmap_numfield(L, 1, "retry_delay_max", 0);
  n = parmap_countfield(L, 1, "N", "N", 1, 1);
  if (n > PARMAP_MAX_WORKERS) n = PARMAP_MAX_WORKERS;
  if (c->from_table && n > c->total) n = c->total > 0 ? c->total : 1;
  c->N = (int)n;
  c->buffersize = parmap_countfield(L, 1, "buffersize", "buffersize", 1, 0);
  if (c->buffersize == 0) c->buffersize = (lua_Integer)BUFFER_PER_WORKER * c->N;
  c->timeout = seconds(L, "timeout", 0);
  c->init_timeout = seconds(L, "init_timeout", 0);
  c->finish_timeout = seconds(L, "finish_timeout", FINISH_TIMEOUT);
  c->has_init = lua_getfield(L, 1, "init") != LUA_TNIL;
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "seed") != LUA_TNIL) {
    int isnum;
    c->seed = lua_tointegerx(L, -1, &isnum);
    if (!isnum || lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L, "parmap: bad option 'seed' (integer expected, got %s)",
                 luaL_tolstring(L, -1, NULL));
    c->has_seed = 1;
  }
  lua_pop(L, 1);
}

/* A spec's fields kept as user values (besides items and the call's). */
static const int CALL_UV[3] = {U_FN, U_ARGS, U_KW};
static const ParmapField FIELDS[] = {
    {"progress", U_PROGRESS, LUA_TNONE, 0}, /* callables: checked in Lua */
    {"fail", U_FAIL, LUA_TFUNCTION, 0},
    {"describe", U_DESC, LUA_TFUNCTION, 0},
    {"init", U_INIT, LUA_TNONE, 0},
    {"finish", U_FINISH, LUA_TNONE, 0},
    {"output_write", U_OUTPUT, LUA_TNONE, 0}, /* checked in Lua */
    {"retry_check", U_RETRY, LUA_TFUNCTION, 1},
    {NULL, 0, 0, 0}};

/* The first dispatch of start, run protected: nothing holds the map yet,
   so workers forked before the iterator raised must be stopped here. */
static int first_dispatch(lua_State *L) {
  Map *m = checkmap(L, 1);
  m->self = 1;
  dispatch(L, m);
  return 0;
}

void parmap_map_rawsource(const ParmapRawSource *src) { raw_source = src; }

/* core.start(spec): fork and hand out the first work; returns the map. */
static int map_start(lua_State *L) {
  Map *m;
  int ud, i;
  luaL_checktype(L, 1, LUA_TTABLE);
  m = (Map *)lua_newuserdatauv(L, sizeof(Map), U_COUNT);
  memset(m, 0, sizeof *m);
  m->magic = MAP_MAGIC;
  m->state = M_CLOSED; /* until it is whole: __gc is then harmless */
  luaL_setmetatable(L, MAP_MT);
  ud = lua_gettop(L);
  m->self = ud;
  m->owner = getpid();
  m->cur = -1;
  m->ep = m->evfd = m->tfd = -1;
  read_config(L, &m->cfg);
  parmap_pushfield(L, 1, "items", m->cfg.from_table ? LUA_TTABLE : LUA_TNONE,
                   0);
  if (raw_source && !m->cfg.from_table &&
      lua_tocfunction(L, -1) == raw_source->items)
    m->raw = raw_source;
  m->cfg.range = m->cfg.from_table ? parmap_torange(L, -1) : NULL;
  if (raw_source && !m->cfg.from_table && lua_tocfunction(L, -1) != NULL &&
      (lua_tocfunction(L, -1) == raw_source->items ||
       lua_tocfunction(L, -1) == raw_source->boxed))
    m->ready = raw_source->ready;
  lua_setiuservalue(L, ud, U_ITEMS);
  parmap_setfields(L, 1, ud, "fn", m->cfg.nargs, CALL_UV, FIELDS, U_SCRATCH);
  lua_getfield(L, 1, "journal");
  m->jr = parmap_journal_check(L, -1);
  lua_setiuservalue(L, ud, U_JOURNAL);
  m->nw = m->cfg.N;
  m->nslots = m->cfg.N * WINDOW_PER_WORKER;
  m->w = (Worker *)calloc((size_t)m->cfg.N, sizeof *m->w);
  m->slots = (Slot *)calloc((size_t)m->nslots, sizeof *m->slots);
  m->ring = (int *)calloc((size_t)m->nslots, sizeof *m->ring);
  /* a socket a worker, and with output = "lines" its two pipes */
  m->pfd = (struct pollfd *)calloc((size_t)m->cfg.N * 3, sizeof *m->pfd);
  m->pfd_w = (int *)calloc((size_t)m->cfg.N * 3, sizeof *m->pfd_w);
  if (m->cfg.output != OUT_DIRECT) {
    m->op = (OutPipe *)calloc((size_t)m->cfg.N, sizeof *m->op);
    if (m->op)
      for (i = 0; i < m->cfg.N; i++) m->op[i].fd[0] = m->op[i].fd[1] = -1;
    else
      nomem(L);
  }
  m->shm_size = sizeof(Shm) * (size_t)m->cfg.N;
  m->shm = (Shm *)mmap(NULL, m->shm_size, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m->shm == MAP_FAILED) m->shm = NULL;
  if (!m->w || !m->slots || !m->ring || !m->pfd || !m->pfd_w || !m->shm) nomem(L);
  for (i = 0; i < m->cfg.N; i++) m->w[i].fd = -1;
  m->next_index = 1;
  if (m->cfg.stats) m->t_start = parmap_now_ns();
  m->state = M_RUNNING;
  if (m->cfg.from_table && m->cfg.total == 0) m->exhausted = 1;
  lua_pushcfunction(L, first_dispatch);
  lua_pushvalue(L, ud);
  m->busy = 1;
  i = lua_pcall(L, 1, 0, 0);
  m->busy = 0;
  if (i != LUA_OK) { /* the error value, unchanged */
    stop(m, 1);
    return lua_error(L);
  }
  if (m->close_req) { /* closed by a callback already: it ends at once */
    m->close_req = 0;
    stop(m, 1);
    m->state = M_DONE;
  }
  m->self = ud;
  lua_settop(L, ud);
  return 1;
}

/* ---------------------------------------------------------------- module */

void parmap_map_register(lua_State *L) {
  static const luaL_Reg meta[] = {
      {"__gc", map_gc}, {"__close", map_close}, {NULL, NULL}};
  static const luaL_Reg methods[] = {
      {"close", map_close}, {"next", map_next}, {"collect", map_collect},
      {"fd", map_fd}, {"pollfd", map_fd}, {"events", map_events},
      {"poll", map_poll}, {"timeout", map_timeout}, {"stats", map_stats},
      {NULL, NULL}};
  if (luaL_newmetatable(L, MAP_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "parmap map");
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, map_start);
  lua_setfield(L, -2, "start");
  lua_pushcfunction(L, map_next);
  lua_setfield(L, -2, "next");
  lua_pushcfunction(L, map_collect);
  lua_setfield(L, -2, "collect");
}
