/*
** map/window.c: the chunk/slot window of a map: chunks of items and their
** slots (items pulled from an iterator, result records, the failure list),
** chunk sizes, which record the loop takes next, the slots' release.
** Part of src/map.c (one compilation unit).
*/
#include "internal.h"

/* ---------------------------------------------------------------- helpers */

static void nomem(lua_State *L) { luaL_error(L, "parmap: not enough memory"); }

static void reserve(lua_State *L, parmap_buf *b, size_t n) {
  if (parmap_buf_reserve(b, n)) nomem(L);
}

static int seg_len(const Seg *g) { return (int)(g->to - g->from); }

/* First item of g that has no record yet. */
static lua_Integer seg_first_open(Map *m, const Worker *w, int k) {
  const Seg *g = &w->q[k];
  const Slot *s = &m->slots[g->slot];
  (void)w;
  return (k == 0) ? s->start + s->recv : g->from;
}

/* A slot is free once the loop consumed all its items and no worker owes
   it anything (a segment's end frame may trail its last result). */
static void release_slot(Map *m, Slot *s) {
  s->used = 0;
  s->freed = ++m->nfreed;
  m->slots_used--;
  if (s->out.cap >= BIG_BUF) { /* recycle hot memory, not every slot's */
    int i;
    for (i = 0; i < POOL && m->pool[i].p; i++) {
    }
    if (i < POOL) {
      m->pool[i] = s->out;
    } else {
      parmap_buf_free(&s->out);
    }
    memset(&s->out, 0, sizeof s->out);
  }
}

static void unbusy(Map *m, Slot *s) {
  s->busy = 0;
  if (s->used && s->consumed == s->count) release_slot(m, s);
}

/* ---------------------------------------------------------------- failures */

/* Record an error for item `index` of slot s instead of running it. The
   error value is on top of the stack (popped). sig > 0: the signal that
   killed the worker, a sixth value of the record ({signal = sig}, fields
   of the error object). */
static void add_failure_sig(lua_State *L, Map *m, Slot *s, lua_Integer index,
                            const char *kind, const char *message, pid_t pid,
                            int sig) {
  int64_t ix = (int64_t)index;
  uint64_t n;
  lua_getiuservalue(L, m->self, U_SCRATCH);
  lua_insert(L, -2);
  /* encode into the slot's fail buffer: index, length, record */
  reserve(L, &s->fail, 16);
  {
    size_t at = s->fail.len;
    s->fail.len += 16;
    if (sig > 0 || m->death_out) {
      int top = lua_gettop(L);
      const char *what;
      luaL_checkstack(L, 8, NULL);
      reserve(L, &s->fail, 1);
      s->fail.p[s->fail.len++] = (char)REC_ERR;
      lua_pushstring(L, kind);
      lua_pushvalue(L, top);
      lua_pushstring(L, message);
      lua_pushliteral(L, "");
      lua_pushinteger(L, (lua_Integer)pid);
      lua_createtable(L, 0, 3);
      if (sig > 0) {
        lua_pushinteger(L, sig);
        lua_setfield(L, -2, "signal");
      }
      if (m->death_out) { /* output = "item": what the item wrote */
        lua_pushvalue(L, m->death_out);
        lua_setfield(L, -2, "output");
        lua_pushvalue(L, m->death_out + 1);
        lua_setfield(L, -2, "output_stderr");
      }
      if (parmap_encode(L, top + 1, 6, &s->fail, top - 1, &what) != PARMAP_OK)
        nomem(L);
      lua_settop(L, top);
    } else {
      parmap_put_error(L, &s->fail, lua_gettop(L) - 1, kind, lua_gettop(L),
                       message, "", pid);
    }
    n = s->fail.len - at - 16;
    memcpy(s->fail.p + at, &ix, 8);
    memcpy(s->fail.p + at + 8, &n, 8);
  }
  lua_pop(L, 2);
}

static void add_failure(lua_State *L, Map *m, Slot *s, lua_Integer index,
                        const char *kind, const char *message, pid_t pid) {
  add_failure_sig(L, m, s, index, kind, message, pid, 0);
}

/* Lowest failed index >= from in slot s, or 0. */
static lua_Integer next_failure(const Slot *s, lua_Integer from, size_t *at) {
  size_t i = 0;
  lua_Integer best = 0;
  while (i < s->fail.len) {
    int64_t ix;
    uint64_t n;
    memcpy(&ix, s->fail.p + i, 8);
    memcpy(&n, s->fail.p + i + 8, 8);
    if (ix >= from && (best == 0 || ix < best)) {
      best = ix;
      if (at) *at = i;
    }
    i += 16 + (size_t)n;
  }
  return best;
}

/* Move the failure record at `at` into the slot's results. */
static void take_failure(lua_State *L, Map *m, Slot *s, size_t at) {
  uint64_t n;
  memcpy(&n, s->fail.p + at + 8, 8);
  reserve(L, &s->out, (size_t)n);
  memcpy(s->out.p + s->out.len, s->fail.p + at + 16, (size_t)n);
  s->out.len += (size_t)n;
  memmove(s->fail.p + at, s->fail.p + at + 16 + n,
          s->fail.len - at - 16 - (size_t)n);
  s->fail.len -= 16 + (size_t)n;
  s->recv++;
  s->next++;
  m->done++;
}

/* ---------------------------------------------------------------- retries */

/* The runs item `index` of s lost to deaths and timeouts so far. */
static lua_Integer tries_of(const Slot *s, lua_Integer index) {
  int i;
  for (i = 0; i < s->ntries; i++)
    if (s->tries[i].index == index) return s->tries[i].n;
  return 0;
}

/* Item `index` of s lost a run to a death or a timeout, after `failed`
   runs in all that its worker saw fail (fn raised; those the segment's
   header gave included): returns how many it lost so far. Only runs when
   a worker died, never on the hot path. */
static lua_Integer add_try(lua_State *L, Slot *s, lua_Integer index,
                           lua_Integer failed) {
  int i;
  for (i = 0; i < s->ntries; i++)
    if (s->tries[i].index == index) {
      if (failed > s->tries[i].n) s->tries[i].n = failed;
      return ++s->tries[i].n;
    }
  if (s->ntries == s->tries_cap) {
    int cap = s->tries_cap ? 2 * s->tries_cap : 4;
    Tries *p = (Tries *)realloc(s->tries, (size_t)cap * sizeof *p);
    if (p == NULL) nomem(L);
    s->tries = p;
    s->tries_cap = cap;
  }
  s->tries[s->ntries].index = index;
  s->tries[s->ntries].due = 0;
  s->tries[s->ntries].n = (failed > 0 ? failed : 0) + 1;
  return s->tries[s->ntries++].n;
}

/* retry_delay: item `index` of s (listed) is not handed out before due. */
static void set_due(Slot *s, lua_Integer index, uint64_t due) {
  int i;
  for (i = 0; i < s->ntries; i++)
    if (s->tries[i].index == index) s->tries[i].due = due;
}

/* retry_delay: ns until the item s hands out next may go, 0 when it may
   now (the slot's later items wait behind it: a slot hands out in order). */
static uint64_t held_ns(const Slot *s, uint64_t now) {
  int i;
  for (i = 0; i < s->ntries; i++)
    if (s->tries[i].index == s->next)
      return s->tries[i].due > now ? s->tries[i].due - now : 0;
  return 0;
}

/* retry_delay: ms until the first item held back is due (at least 1), -1
   when none is held. */
static int held_ms(const Map *m) {
  uint64_t now, best = 0;
  int i;
  if (m->cfg.retry_delay <= 0 || m->slots == NULL) return -1;
  now = parmap_now_ns();
  for (i = 0; i < m->nslots; i++) {
    const Slot *s = &m->slots[i];
    uint64_t d;
    if (!s->used || s->ntries == 0 || s->next >= s->start + s->count) continue;
    d = held_ns(s, now);
    if (d > 0 && (best == 0 || d < best)) best = d;
  }
  if (best == 0) return -1;
  best = best / 1000000u + 1;
  return best > 1000000000u ? 1000000000 : (int)best;
}

/* A segment starting at g->from: an item that lost runs is handed out
   first in a segment of its own start, so that the header can tell the
   worker its count (TaskHdr.tries) and fn's retries there are cut short. */
static void cut_tried(const Slot *s, Seg *g) {
  int i;
  for (i = 0; i < s->ntries; i++) {
    lua_Integer ix = s->tries[i].index;
    if (ix == g->from) g->tries = (uint64_t)s->tries[i].n;
    else if (ix > g->from && ix < g->to) g->to = ix;
  }
}

/* ---------------------------------------------------------------- chunks */

/* The size of the next chunk; new_chunk commits it to last_size. For
   iterator input it is at most buffersize (the read-ahead bound), and an
   automatic one small enough that every worker can hold DEPTH chunks
   within it. */
static lua_Integer chunk_size(Map *m) {
  lua_Integer size, bound = m->cfg.from_table ? 0 : m->cfg.buffersize;
  if (m->cfg.chunksize > 0) {
    size = m->cfg.chunksize;
    return bound && size > bound ? bound : size;
  }
  if (m->item_ns <= 0) {
    size = m->last_size ? m->last_size * 2 : 1;
  } else {
    double want = TARGET_NS / m->item_ns;
    size = want >= MAX_CHUNK ? MAX_CHUNK : (lua_Integer)want;
    if (size > m->last_size * 4) size = m->last_size * 4;
  }
  if (m->cfg.total >= 0) { /* shrink near the end: all finish together */
    lua_Integer rem = m->cfg.total - m->next_index + 1;
    lua_Integer two_n = 2 * (lua_Integer)m->cfg.N; /* no overflow near */
    lua_Integer guided = rem / two_n + (rem % two_n != 0); /* maxinteger */
    if (size > guided) size = guided;
  }
  if (m->cfg.maxtasks > 0 && size > m->cfg.maxtasks) size = m->cfg.maxtasks;
  if (bound && size > bound / (DEPTH * m->cfg.N))
    size = bound / (DEPTH * m->cfg.N);
  if (size < 1) size = 1;
  if (size > MAX_CHUNK) size = MAX_CHUNK;
  return size;
}

/* The free slot released last: its buffers are the likeliest to be in
   memory already (a slot never used costs fresh pages). Ordered mode holds
   at most nslots chunks from the one the loop waits for. */
static Slot *free_slot(Map *m) {
  int i;
  Slot *best = NULL;
  if (m->cfg.ordered) {
    uint64_t ahead = m->seq_new - m->seq_take;
    if (ahead >= (uint64_t)m->nslots) return NULL;
    if (ahead >= (uint64_t)(m->cfg.N * WINDOW_BASE)) {
      /* past the usual window only while the chunk the loop waits for
         still runs: a slow item must not idle the other workers */
      const Slot *h = &m->slots[m->ring[m->seq_take % (uint64_t)m->nslots]];
      if (h->recv >= h->count) return NULL;
    }
  }
  for (i = 0; i < m->nslots; i++)
    if (!m->slots[i].used && (!best || m->slots[i].freed > best->freed))
      best = &m->slots[i];
  return best;
}

/* Room for n offsets: grows geometrically, never overflows the byte count
   (n is at most PARMAP_MAX_CHUNK + 1 here, but the arithmetic is checked
   all the same). */
static void offs_reserve(lua_State *L, Slot *s, size_t n) {
  if (s->offs_cap < n) {
    size_t cap = s->offs_cap ? s->offs_cap : 16, *p;
    while (cap < n) cap = cap > SIZE_MAX / 2 ? n : cap * 2;
    if (cap > SIZE_MAX / sizeof *p) nomem(L);
    p = (size_t *)realloc(s->offs, cap * sizeof *p);
    if (p == NULL) nomem(L);
    s->offs = p;
    s->offs_cap = cap;
  }
}

/* The MPI agent's input: never wait for it while holding items (in this
   chunk, at the workers, or results not taken), since rank 0 may wait for
   their results before it sends more (buffersize). */
static int must_not_wait(lua_State *L, Map *m, Slot *s) {
  return m->ready &&
         (s->count > 0 || m->next_index - 1 > m->taken || m->relay_held) &&
         !m->ready(L);
}

/* pull(map, slot, size): pull up to `size` items from the iterator into
   the slot. Runs under lua_pcall (pull_items): when the iterator raises,
   the items pulled before still run, and the error comes after them. */
static int pull(lua_State *L) {
  Map *m = (Map *)lua_touserdata(L, 1);
  Slot *s = (Slot *)lua_touserdata(L, 2);
  lua_Integer size = lua_tointeger(L, 3);
  int base = 3;
  m->self = 1;
  lua_getiuservalue(L, 1, U_ITEMS);   /* base + 1 */
  lua_getiuservalue(L, 1, U_SCRATCH); /* base + 2 */
  while (s->count < size && !m->close_req && !must_not_wait(L, m, s)) {
    const char *what;
    lua_Integer index = s->start + s->count;
    lua_pushvalue(L, base + 1);
    lua_call(L, 0, 1);
    if (lua_isnil(L, -1)) {
      m->exhausted = 1;
      break;
    }
    if (!parmap_encode_scalar(L, base + 3, &s->in) &&
        parmap_encode(L, base + 3, 1, &s->in, base + 2, &what) != PARMAP_OK) {
      /* it cannot travel: it fails at its turn, like a bad shape */
      lua_getiuservalue(L, m->self, U_DESC);
      lua_pushliteral(L, "item");
      lua_pushinteger(L, index);
      lua_pushvalue(L, base + 3);
      lua_call(L, 3, 1);
      lua_pushvalue(L, -1);
      add_failure(L, m, s, index, "shape", lua_tostring(L, -1), 0);
    }
    offs_reserve(L, s, (size_t)s->count + 2);
    s->count++;
    s->offs[s->count] = s->in.len;
    lua_settop(L, base + 2);
  }
  return 0;
}

/* Pull up to `size` items into slot s. An error of the iterator is kept
   (U_IERR) and ends the input; the step raises it after the last item. */
static void pull_items(lua_State *L, Map *m, Slot *s, lua_Integer size) {
  int self = m->self, status;
  offs_reserve(L, s, (size_t)(size < 64 ? size : 64) + 1);
  s->offs[0] = 0;
  lua_pushcfunction(L, pull);
  lua_pushvalue(L, self);
  lua_pushlightuserdata(L, s);
  lua_pushinteger(L, size);
  if ((status = lua_pcall(L, 3, 0, 0)) != LUA_OK) {
    m->self = self;
    s->in.len = s->offs[s->count]; /* drop a half-encoded item */
    if (status == LUA_ERRMEM || parmap_is_interrupt(L, -1))
      lua_error(L); /* out of memory, or Ctrl-C: stop at once, not after
                       the window of items already pulled has run */
    m->exhausted = 1;
    m->ierr = 1;
    lua_setiuservalue(L, self, U_IERR); /* the value, unchanged */
    return;
  }
  m->self = self;
  if (m->close_req) m->exhausted = 1;
}

/* Items from the map's raw source (the MPI agent): records copied as
   they came, never decoded here. */
static void raw_items(lua_State *L, Map *m, Slot *s, lua_Integer size) {
  offs_reserve(L, s, (size_t)(size < 64 ? size : 64) + 1);
  s->offs[0] = 0;
  while (s->count < size && !m->close_req) {
    const char *p;
    size_t len, pos = 0;
    lua_Integer n, k;
    /* never wait for input while holding items (in this chunk, at the
       workers, or results not taken): rank 0 may wait for their results
       before it sends more (buffersize) */
    if (must_not_wait(L, m, s)) break;
    n = m->raw->peek(L, &p, &len);
    if (n <= 0) {
      m->exhausted = 1;
      return;
    }
    if (n > size - s->count) n = size - s->count;
    offs_reserve(L, s, (size_t)(s->count + n) + 1);
    for (k = 1; k <= n; k++) {
      if (parmap_skip(p, len, &pos))
        luaL_error(L, "parmap: corrupt record of item %I",
                   (LUAI_UACINT)(s->start + s->count + k - 1));
      s->offs[s->count + k] = s->in.len + pos;
    }
    reserve(L, &s->in, pos);
    memcpy(s->in.p + s->in.len, p, pos);
    s->in.len += pos;
    s->count += n;
    m->raw->take(L, n, pos);
  }
  if (m->close_req) m->exhausted = 1;
}

/* The journal (option journal): a chunk starting at an item it holds is
   the run of such items, given their recorded results and never handed
   out (an iterator's items are still pulled, to keep the indices); any
   other chunk stops before the next such item. Returns 1 for a replayed
   chunk. */
static MAP_COLD int replay(lua_State *L, Map *m, Slot *s, lua_Integer *size) {
  lua_Integer first = m->next_index, nj = parmap_journal_next(m->jr, first),
              run = 0, k;
  if (nj != first) {
    lua_Integer known = parmap_journal_count(m->jr);
    if (nj > 0 && nj - first < *size) *size = nj - first;
    if (known >= 0 && !m->cfg.from_table && first + *size - 1 > known) {
      /* not past the count: an item there is another map's */
      *size = known - first + 1;
      if (*size <= 0) {
        pull_items(L, m, s, 1);
        if (s->count > 0) parmap_journal_more(L, m->jr);
        s->in.len = 0;
        return 1; /* no item: the input is over */
      }
    }
    return 0;
  }
  while (run < *size && parmap_journal_next(m->jr, first + run) == first + run)
    run++;
  if (m->cfg.from_table) {
    lua_Integer rem = m->cfg.total - first + 1;
    s->count = run < rem ? run : rem;
    if (s->count >= rem) m->exhausted = 1;
  } else {
    pull_items(L, m, s, run); /* fewer if the iterator ends first */
    s->in.len = s->fail.len = 0;
  }
  for (k = 0; k < s->count; k++) {
    size_t len;
    const char *p = parmap_journal_get(m->jr, first + k, &len);
    reserve(L, &s->out, len);
    memcpy(s->out.p + s->out.len, p, len);
    s->out.len += len;
  }
  s->recv = s->count;
  s->next = s->start + s->count;
  m->done += s->count;
  return 1;
}

/* Items of a frame that just arrived (n records from item `index` at p):
   the REC_OK ones go to the journal, in one write. */
static MAP_COLD void journal_frame(lua_State *L, Map *m, lua_Integer index,
                                   const char *p, size_t n, uint64_t count) {
  size_t at = 0;
  uint64_t k;
  for (k = 0; k < count; k++) {
    size_t pos;
    if (at < n && p[at] == (char)REC_STATS) at += 1 + STATS_LEN;
    if (at >= n) break; /* corrupt: emit says so at its turn */
    pos = at + 1;
    if (parmap_skip(p, n, &pos)) break;
    if (p[at] == (char)REC_OK)
      parmap_journal_append(L, m->jr, index + (lua_Integer)k, p + at, pos - at);
    at = pos;
  }
  parmap_journal_commit(L, m->jr);
}

/* Make the next chunk, or return NULL when there is no room or no input. */
static Slot *new_chunk(lua_State *L, Map *m) {
  Slot *s;
  lua_Integer size;
  if (m->exhausted || (s = free_slot(m)) == NULL) return NULL;
  size = chunk_size(m);
  if (!m->cfg.from_table &&
      m->next_index - 1 - m->taken + size > m->cfg.buffersize)
    return NULL; /* at most buffersize items pulled ahead of the loop: wait
                    until it takes some (size <= buffersize, so it has some
                    to take) */
  m->last_size = size;
  if (s->out.p == NULL) { /* take a big buffer from the pool if any */
    int i;
    for (i = 0; i < POOL; i++)
      if (m->pool[i].p) {
        s->out = m->pool[i];
        memset(&m->pool[i], 0, sizeof m->pool[i]);
        break;
      }
  }
  s->start = m->next_index;
  s->count = 0;
  s->in.len = s->out.len = s->fail.len = 0;
  s->ntries = 0;
  s->rpos = 0;
  s->recv = s->consumed = 0;
  s->next = s->start;
  s->busy = 0;
  if (m->jr && replay(L, m, s, &size)) {
    /* items the journal holds: their records, none to run */
  } else if (m->cfg.from_table) {
    lua_Integer rem = m->cfg.total - m->next_index + 1;
    s->count = size < rem ? size : rem;
    if (s->count >= rem) m->exhausted = 1;
  } else if (m->raw) {
    raw_items(L, m, s, size);
  } else {
    pull_items(L, m, s, size);
  }
  if (s->count == 0) return NULL;
  s->used = 1;
  s->seq = m->seq_new++;
  m->ring[s->seq % (uint64_t)m->nslots] = (int)(s - m->slots);
  m->slots_used++;
  m->next_index += s->count;
  return s;
}

/* A slot with items to hand out, after moving due failures into place. */
static Slot *work_slot(lua_State *L, Map *m) {
  for (;;) {
    int i;
    uint64_t now = 0;
    for (i = 0; i < m->nslots; i++) {
      Slot *s = &m->slots[i];
      while (s->used && !s->busy && s->next < s->start + s->count) {
        size_t at = 0;
        if (next_failure(s, s->next, &at) != s->next) {
          if (s->ntries > 0 && m->cfg.retry_delay > 0) { /* held back? */
            if (now == 0) now = parmap_now_ns();
            if (held_ns(s, now) > 0) break;
          }
          return s;
        }
        take_failure(L, m, s, at);
      }
    }
    if (new_chunk(L, m) == NULL) return NULL; /* a new one may start failed */
  }
}

static void release(Map *m) {
  int i;
  if (m->slots) {
    for (i = 0; i < m->nslots; i++) {
      parmap_buf_free(&m->slots[i].out);
      parmap_buf_free(&m->slots[i].in);
      parmap_buf_free(&m->slots[i].fail);
      free(m->slots[i].tries);
      free(m->slots[i].offs);
    }
    free(m->slots);
    free(m->ring);
    m->ring = NULL;
    m->slots = NULL;
  }
  for (i = 0; i < POOL; i++) parmap_buf_free(&m->pool[i]);
  free(m->w);
  m->w = NULL;
  free(m->pfd);
  m->pfd = NULL;
  free(m->pfd_w);
  m->pfd_w = NULL;
  if (m->shm) munmap(m->shm, m->shm_size);
  m->shm = NULL;
}

/* The slot whose next record may be consumed now, or NULL. */
static Slot *ready(Map *m) {
  int i;
  if (m->cfg.ordered) {
    Slot *s;
    if (m->seq_take == m->seq_new) return NULL;
    s = &m->slots[m->ring[m->seq_take % (uint64_t)m->nslots]];
    return s->consumed < s->recv ? s : NULL;
  }
  if (m->cur >= 0 && m->slots[m->cur].used &&
      m->slots[m->cur].consumed < m->slots[m->cur].recv)
    return &m->slots[m->cur];
  for (i = 0; i < m->nslots; i++)
    if (m->slots[i].used && m->slots[i].consumed < m->slots[i].recv) {
      m->cur = i;
      return &m->slots[i];
    }
  return NULL;
}

static int finished(Map *m) {
  return m->exhausted && (m->cfg.ordered ? m->seq_take == m->seq_new
                                         : m->slots_used == 0);
}
