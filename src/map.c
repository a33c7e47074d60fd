/*
** map.c: the parent side of a parallel map, as a Lua userdata.
**
** Items are cut into chunks (contiguous index ranges). Each chunk owns a
** slot in a fixed window: its serialized items (iterator input) and the
** result records that come back, appended in index order. A chunk is handed
** to one worker at a time as a segment; a worker holds at most DEPTH
** segments. The loop consumes records straight from the slots, so ordered
** mode holds at most the window's chunks, whatever the input length.
**
** When a worker dies, the item it was running (read from its shared-memory
** slot) gets an error record; the other items it held go back to their
** slots and are handed out again, to a new worker if need be.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <lauxlib.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "codec.h"
#include "engine.h"
#include "map.h"
#include "proc.h"

#define MAP_MT "parmap.Map"
#define DEPTH 2            /* segments a worker may hold */
#define WINDOW_PER_WORKER 16 /* at most, chunks in the window per worker */
#define WINDOW_BASE 4 /* ... while the chunk the loop waits for is done */
#define TARGET_NS 2000000.0 /* aim for chunks of about 2 ms of work */
#define MAX_CHUNK PARMAP_MAX_CHUNK
#define BUFFER_PER_WORKER 8192 /* default buffersize: this many items a worker */
#define BIG_BUF (4u << 20) /* result buffers past this go to the pool */
#define POOL 2             /* big buffers a map keeps for reuse */
#define EXIT_CHECK_MS 200  /* how often waitpid checks on workers */

enum { M_RUNNING = 0, M_DONE, M_CLOSED };

typedef struct Seg {
  int slot;
  lua_Integer from, to; /* items from..to-1 */
  uint64_t tries;       /* retries: runs item `from` already lost */
} Seg;

/* retries: the runs an item lost to deaths and timeouts (only items that
   had one are listed) */
typedef struct Tries {
  lua_Integer index, n;
} Tries;

typedef struct Worker {
  pid_t pid; /* 0: no process */
  int fd;
  int qn, nsent; /* segments held; of those, fully sent */
  size_t sent;   /* bytes of segment nsent's message sent */
  TaskHdr shdr;
  ResultHdr rhdr;
  size_t rhave;   /* header bytes read */
  uint64_t rleft; /* body bytes still to come */
  int timed_out;
  int delivered;  /* it sent results: it started fine */
  uint64_t due;   /* when q[0] became its to run (0: not sent yet), or
                     when it last sent us bytes (timeouts) */
  int exited, status; /* reaped while its socket was still open */
  int lost;           /* ... by someone else's waitpid */
  lua_Integer handed; /* items handed to this process in all (maxtasks) */
  Seg q[DEPTH];
} Worker;

typedef struct Slot {
  int used, busy; /* busy: a segment is out with a worker */
  uint64_t seq;
  uint64_t freed; /* when it was last released: the newest is reused first */
  lua_Integer start, count;
  lua_Integer next;     /* first index not handed out */
  lua_Integer recv;     /* items with a record in out */
  lua_Integer consumed; /* items the loop has taken */
  size_t rpos;          /* next record in out */
  parmap_buf out;       /* result records */
  parmap_buf in;        /* serialized items (iterator input) */
  size_t *offs;         /* offs[k]: item start+k in `in`; count+1 of them */
  size_t offs_cap;
  parmap_buf fail; /* error records for items not to run: index, len, bytes */
  Tries *tries;    /* retries: items that lost a run to a death, a timeout */
  int ntries, tries_cap;
} Slot;

#define MAP_MAGIC 0x70617261706d6170ull /* "parapmap" */

typedef struct Map {
  uint64_t magic;
  pid_t owner; /* the process that may stop the workers */
  int state;
  int busy;      /* the engine runs (a protected call): no re-entry */
  int close_req; /* close() came while busy: stop once the step returns */
  int ierr;      /* the items iterator raised: its error is in U_IERR
                    (1), and was raised after the last item (2) */
  int stillborn; /* workers dead in a row before sending any result */
  lua_Integer last; /* collect: the highest index so far */
  uint64_t exit_check; /* when check_exits last ran */
  int self;     /* stack index of this userdata in the current call */
  Config cfg;
  Worker *w;
  int nw;    /* size of w: the N asked for */
  int nlive; /* at most cfg.N (lowered if a fork fails) */
  Shm *shm;
  size_t shm_size;
  Slot *slots;
  int nslots, slots_used;
  uint64_t seq_new, seq_take; /* next chunk to make; to consume (ordered) */
  uint64_t nfreed;            /* releases so far */
  int *ring;                  /* ordered: ring[seq % nslots] = its slot */
  int cur;                    /* unordered: slot being drained */
  lua_Integer next_index;     /* first item not in a chunk */
  int exhausted;
  lua_Integer done, reported;
  lua_Integer taken;          /* items the loop has consumed */
  double item_ns;
  lua_Integer last_size;
  struct pollfd *pfd;
  int *pfd_w;
  parmap_buf pool[POOL]; /* big result buffers of released slots */
  pid_t *retired; /* recycled workers (maxtasks) not reaped yet */
  int nretired, retired_cap;
} Map;

/* ---------------------------------------------------------------- helpers */

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
   error value is on top of the stack (popped). */
static void add_failure(lua_State *L, Map *m, Slot *s, lua_Integer index,
                        const char *kind, const char *message, pid_t pid) {
  int64_t ix = (int64_t)index;
  uint64_t n;
  lua_getiuservalue(L, m->self, U_SCRATCH);
  lua_insert(L, -2);
  /* encode into the slot's fail buffer: index, length, record */
  reserve(L, &s->fail, 16);
  {
    size_t at = s->fail.len;
    s->fail.len += 16;
    parmap_put_error(L, &s->fail, lua_gettop(L) - 1, kind, lua_gettop(L),
                     message, "", pid);
    n = s->fail.len - at - 16;
    memcpy(s->fail.p + at, &ix, 8);
    memcpy(s->fail.p + at + 8, &n, 8);
  }
  lua_pop(L, 2);
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

/* Item `index` of s lost a run to a death or a timeout: returns how many
   it lost so far. Only runs when a worker died, never on the hot path. */
static lua_Integer add_try(lua_State *L, Slot *s, lua_Integer index) {
  int i;
  for (i = 0; i < s->ntries; i++)
    if (s->tries[i].index == index) return ++s->tries[i].n;
  if (s->ntries == s->tries_cap) {
    int cap = s->tries_cap ? 2 * s->tries_cap : 4;
    Tries *p = (Tries *)realloc(s->tries, (size_t)cap * sizeof *p);
    if (p == NULL) nomem(L);
    s->tries = p;
    s->tries_cap = cap;
  }
  s->tries[s->ntries].index = index;
  s->tries[s->ntries].n = 1;
  return s->tries[s->ntries++].n;
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
  while (s->count < size && !m->close_req) {
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
/* Is the value at idx the error lua.c's SIGINT hook raises ("...:
   interrupted!")? An iterator error is kept until the items pulled before it
   have run; Ctrl-C must not wait for them. */
static int is_interrupt(lua_State *L, int idx) {
  static const char tail[] = "interrupted!";
  size_t n;
  const char *msg;
  if (lua_type(L, idx) != LUA_TSTRING) return 0;
  msg = lua_tolstring(L, idx, &n);
  return n >= sizeof tail - 1 &&
         memcmp(msg + n - (sizeof tail - 1), tail, sizeof tail - 1) == 0;
}

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
    if (status == LUA_ERRMEM || is_interrupt(L, -1))
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
  if (m->cfg.from_table) {
    lua_Integer rem = m->cfg.total - m->next_index + 1;
    s->count = size < rem ? size : rem;
    if (s->count >= rem) m->exhausted = 1;
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
    for (i = 0; i < m->nslots; i++) {
      Slot *s = &m->slots[i];
      while (s->used && !s->busy && s->next < s->start + s->count) {
        size_t at = 0;
        if (next_failure(s, s->next, &at) != s->next) return s;
        take_failure(L, m, s, at);
      }
    }
    if (new_chunk(L, m) == NULL) return NULL; /* a new one may start failed */
  }
}

/* ---------------------------------------------------------------- workers */

static void spawn_failed(lua_State *L, Map *m, int err) {
  if (m->nlive > 0) { /* carry on with the workers we have */
    m->cfg.N = m->nlive;
    return;
  }
  luaL_error(L, "parmap: cannot start a worker: %s", strerror(err));
}

/* Fork worker wi. Returns 0, or -1 when the fork failed. */
static int spawn(lua_State *L, Map *m, int wi) {
  Worker *w = &m->w[wi];
  int sv[2];
  pid_t pid;
  if (parmap_socketpair(sv)) return -1;
  parmap_fd_register(sv[0]);
  memset(&m->shm[wi], 0, sizeof m->shm[wi]);
  pid = parmap_fork(sv[1]);
  if (pid < 0) {
    int e = errno;
    parmap_fd_close(sv[0]);
    close(sv[1]);
    errno = e;
    return -1;
  }
  if (pid == 0) {
    parmap_worker_main(L, m->self, &m->cfg, &m->shm[wi], sv[1], wi + 1,
                       m->nw);
    _exit(70); /* not reached */
  }
  close(sv[1]);
  memset(w, 0, sizeof *w);
  w->pid = pid;
  w->fd = sv[0];
  m->nlive++;
  return 0;
}

static int depth(Map *m) {
  /* long chunks gain nothing from a queue, and strand work at the end */
  return (m->item_ns * (double)m->last_size > 4 * TARGET_NS) ? 1 : DEPTH;
}

/* maxtasks: w was handed all the items it may run. */
static int spent(const Map *m, const Worker *w) {
  return m->cfg.maxtasks > 0 && w->handed >= m->cfg.maxtasks;
}

/* maxtasks: a worker that was handed its last item and sent its result
   goes (its socket closed: it runs finish and exits); dispatch forks a
   fresh process in its place, under the same number, for further work. */
static void recycle(Map *m) {
  int i, k = 0, st;
  if (m->cfg.maxtasks <= 0) return;
  for (i = 0; i < m->nretired; i++) /* reap those that are gone */
    if (parmap_wait(m->retired[i], &st, 0) == 0)
      m->retired[k++] = m->retired[i];
  m->nretired = k;
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (w->fd >= 0 && w->qn == 0 && spent(m, w)) {
      parmap_fd_close(w->fd);
      w->fd = -1;
      m->nlive--;
      if (m->nretired == m->retired_cap) { /* else free_entry reaps it */
        int cap = m->retired_cap ? 2 * m->retired_cap : 8;
        pid_t *p = (pid_t *)realloc(m->retired, (size_t)cap * sizeof *p);
        if (p == NULL) continue;
        m->retired = p;
        m->retired_cap = cap;
      }
      /* its entry is free at once: the replacement need not wait for its
         finish; stop reaps it */
      m->retired[m->nretired++] = w->pid;
      w->pid = 0;
    }
  }
}

/* A worker to give a segment to: an idle one, a new one, or one with room.
   Returns its index, -2 when one must be forked, -1 when none can take. */
static int pick_worker(Map *m) {
  int i, best = -1, d = depth(m);
  for (i = 0; i < m->nw; i++)
    if (m->w[i].fd >= 0 && m->w[i].qn == 0 && !spent(m, &m->w[i])) return i;
  if (m->nlive < m->cfg.N) return -2;
  for (i = 0; i < m->nw; i++)
    if (m->w[i].fd >= 0 && m->w[i].qn < d && !spent(m, &m->w[i]) &&
        (best < 0 || m->w[i].qn < m->w[best].qn))
      best = i;
  return best;
}

static void assign(Map *m, int wi, Slot *s) {
  Worker *w = &m->w[wi];
  Seg *g = &w->q[w->qn++];
  lua_Integer end = s->start + s->count, stop = next_failure(s, s->next, NULL);
  g->slot = (int)(s - m->slots);
  g->from = s->next;
  g->to = (stop > 0 && stop < end) ? stop : end;
  g->tries = 0;
  if (s->ntries > 0) cut_tried(s, g);
  if (m->cfg.maxtasks > 0 && g->to - g->from > m->cfg.maxtasks - w->handed)
    g->to = g->from + (m->cfg.maxtasks - w->handed); /* its last items */
  w->handed += g->to - g->from;
  s->next = g->to;
  s->busy = 1;
}

static int send_more(Map *m, Worker *w);
static void on_death(lua_State *L, Map *m, int wi);

/* An entry for a new worker (nlive < N <= nw, so one exists): a free one,
   else one whose retired worker is reaped now (it is exiting anyway). */
static int free_entry(Map *m) {
  int i, st;
  for (i = 0; i < m->nw; i++)
    if (!m->w[i].pid) return i;
  for (i = 0; m->w[i].fd >= 0; i++) {
  }
  parmap_wait(m->w[i].pid, &st, -1);
  m->w[i].pid = 0;
  return i;
}

/* With nothing left to hand out, let idle workers go: they exit while the
   loop still consumes results, instead of in its last call. A worker is
   live while its fd is open; retired ones keep their pid until reaped. */
static void retire_idle(Map *m) {
  int i;
  if (!m->exhausted) return;
  for (i = 0; i < m->nslots; i++) {
    const Slot *s = &m->slots[i];
    if (s->used && s->next < s->start + s->count) return;
  }
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (w->fd >= 0 && w->qn == 0) {
      parmap_fd_close(w->fd);
      w->fd = -1;
      m->nlive--;
    }
  }
}

static void dispatch(lua_State *L, Map *m) {
  recycle(m);
  for (;;) {
    Slot *s;
    int wi = pick_worker(m);
    if (wi == -1) return;
    if ((s = work_slot(L, m)) == NULL) return;
    if (wi == -2) {
      int i;
      /* a pending Ctrl-C (lua.c's hook) raises here, not in the child */
      parmap_run_hooks(L);
      i = free_entry(m);
      if (spawn(L, m, i)) {
        spawn_failed(L, m, errno);
        if ((wi = pick_worker(m)) < 0) return; /* s waits, unassigned */
      } else {
        wi = i;
      }
    }
    assign(m, wi, s);
    /* send now: a socket with room needs no poll first */
    if (m->w[wi].nsent == m->w[wi].qn - 1 && send_more(m, &m->w[wi]) < 0)
      on_death(L, m, wi);
  }
}

/* ---------------------------------------------------------------- deaths */

static void on_death(lua_State *L, Map *m, int wi) {
  Worker *w = &m->w[wi];
  char how[160], msg[400];
  int st = 0, r, k;
  int64_t cur = __atomic_load_n(&m->shm[wi].cur, __ATOMIC_ACQUIRE);
  lua_Integer bad = 0;
  pid_t pid = w->pid;
  parmap_fd_close(w->fd);
  w->fd = -1;
  if (w->exited) {
    r = w->lost ? -1 : 1;
    st = w->status;
  } else {
    r = parmap_wait(w->pid, &st, 1000);
  }
  if (r == 0) { /* it closed its socket but lives on: stop it */
    kill(w->pid, SIGKILL);
    r = parmap_wait(w->pid, &st, -1);
  }
  if (r == 1)
    parmap_status_text(st, how, sizeof how);
  else
    strcpy(how, "was reaped by someone else (a waitpid not parmap's took its "
                "exit status)");
  m->nlive--;
  for (k = 0; k < w->qn; k++) {
    lua_Integer open = seg_first_open(m, w, k);
    if (cur >= open && cur < w->q[k].to) bad = (lua_Integer)cur;
  }
  if (w->qn > 0 && bad == 0) bad = seg_first_open(m, w, 0);
  for (k = 0; k < w->qn; k++) {
    Slot *s = &m->slots[w->q[k].slot];
    lua_Integer open = seg_first_open(m, w, k);
    s->next = open;
    unbusy(m, s);
    /* retries: the item goes back with the others, for a fresh worker */
    if (bad >= open && bad < w->q[k].to &&
        add_try(L, s, bad) > m->cfg.retries) {
      if (w->timed_out)
        snprintf(msg, sizeof msg,
                 "item %lld timed out after %g s (worker %d was killed)",
                 (long long)bad, m->cfg.timeout, (int)w->pid);
      else
        snprintf(msg, sizeof msg, "worker %d %s while running item %lld",
                 (int)w->pid, how, (long long)bad);
      lua_pushstring(L, msg);
      add_failure(L, m, s, bad, w->timed_out ? "timeout" : "died", msg,
                  w->pid);
    }
  }
  {
    int intr = r == 1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGINT &&
               !w->timed_out;
    /* a worker that never got to run an item: the next would fare alike */
    if (!w->delivered && cur == 0 && !w->timed_out)
      m->stillborn++;
    else
      m->stillborn = 0;
    memset(w, 0, sizeof *w);
    w->fd = -1;
    if (intr) { /* Ctrl-C on the process group: not a reason to fork again */
      parmap_run_hooks(L); /* lua.c's hook raises "interrupted!" here */
      luaL_error(L, "parmap: worker %d was interrupted (SIGINT)", (int)pid);
    }
    if (m->stillborn > m->nw + 2)
      luaL_error(L, "parmap: %d workers in a row died before running any "
                    "item (the last one %s)", m->stillborn, how);
  }
}

/* ---------------------------------------------------------------- i/o */

/* Send what can be sent. Returns -1 if the worker is gone. */
static int send_more(Map *m, Worker *w) {
  while (w->nsent < w->qn) {
    Seg *g = &w->q[w->nsent];
    Slot *s = &m->slots[g->slot];
    const char *body = NULL;
    size_t blen = 0, total;
    ssize_t r;
    if (!m->cfg.from_table) {
      body = s->in.p + s->offs[g->from - s->start];
      blen = s->offs[g->to - s->start] - s->offs[g->from - s->start];
    }
    if (w->sent == 0) {
      w->shdr.magic = MAGIC_TASK;
      w->shdr.count = (uint32_t)seg_len(g);
      w->shdr.from = (int64_t)g->from;
      w->shdr.bodylen = blen;
      w->shdr.tries = g->tries;
    }
    total = FRAME_HDR + blen;
    if (w->sent < FRAME_HDR)
      r = parmap_send_some(w->fd, (char *)&w->shdr + w->sent,
                           FRAME_HDR - w->sent, body, blen);
    else
      r = parmap_send_some(w->fd, NULL, 0, body + (w->sent - FRAME_HDR),
                           total - w->sent);
    if (r < 0) return -1;
    if (r == 0) return 0;
    if (w->nsent == 0 && w->due == 0 && m->cfg.timeout > 0)
      w->due = parmap_now_ns(); /* timeouts: due from its first bytes */
    w->sent += (size_t)r;
    if (w->sent == total) {
      w->nsent++;
      w->sent = 0;
    }
  }
  return 0;
}

static void protocol_error(lua_State *L, Worker *w, const char *what) {
  luaL_error(L, "parmap: protocol error from worker %d: %s", (int)w->pid,
             what);
}

static void stop(Map *m, int kill_them);

/* A FLAG_INIT frame: w's init raised. Its record (REC_ERR, then kind, err,
   message, traceback, pid) is p[0..len). No item ran there, so the map
   cannot go on as asked: raise an error object of kind "init" naming the
   worker, whatever `exception` says, and stop. */
static void init_error(lua_State *L, Map *m, Worker *w, const char *p,
                       size_t len) {
  int base = lua_gettop(L), id = (int)(w - m->w) + 1, n, k;
  size_t pos = 1;
  const char *err = NULL;
  if (len < 1 || p[0] != (char)REC_ERR)
    protocol_error(L, w, "bad init error record");
  luaL_checkstack(L, 12, NULL);
  lua_getiuservalue(L, m->self, U_SCRATCH);
  n = parmap_decode(L, p, len, &pos, base + 1, &err);
  if (n != 5 || lua_type(L, base + 2) != LUA_TSTRING ||
      lua_type(L, base + 4) != LUA_TSTRING)
    protocol_error(L, w, "bad init error record");
  lua_getiuservalue(L, m->self, U_MKERR);
  lua_pushnil(L); /* no item */
  for (k = 2; k <= 6; k++) lua_pushvalue(L, base + k);
  lua_call(L, 6, 1); /* make_error(nil, "init", err, message, tb, pid) */
  lua_pushinteger(L, id);
  lua_setfield(L, -2, "worker");
  stop(m, 1);
  lua_error(L);
}

static void segment_done(Map *m, Worker *w, uint64_t elapsed) {
  Seg *g = &w->q[0];
  double per = (double)elapsed / (double)(seg_len(g) > 0 ? seg_len(g) : 1);
  unbusy(m, &m->slots[g->slot]);
  if (seg_len(g) > 0) m->item_ns = m->item_ns > 0 ? (m->item_ns + per) / 2 : per;
  memmove(&w->q[0], &w->q[1], sizeof(Seg) * (size_t)(w->qn - 1));
  w->qn--;
  w->nsent--;
  /* the next segment is due from now if it is (partly) sent already */
  w->due = (m->cfg.timeout > 0 && w->qn > 0 && (w->nsent > 0 || w->sent > 0))
               ? parmap_now_ns() : 0;
}

/* Read what has arrived. Returns 1 at end of file (the worker is gone). */
static int recv_more(lua_State *L, Map *m, Worker *w) {
  for (;;) {
    Slot *s;
    ssize_t r;
    if (w->rhave < FRAME_HDR) {
      r = parmap_recv_some(w->fd, (char *)&w->rhdr + w->rhave,
                           FRAME_HDR - w->rhave);
      if (r == -2) return 0;
      if (r <= 0) return 1;
      w->rhave += (size_t)r;
      if (w->due) w->due = parmap_now_ns(); /* it delivers: not stuck */
      if (w->rhave < FRAME_HDR) continue;
      if (w->rhdr.magic != MAGIC_RESULT) protocol_error(L, w, "bad magic");
      if (w->qn == 0 || (w->nsent == 0 && !(w->rhdr.flags & FLAG_INIT)))
        protocol_error(L, w, "unasked result");
      s = &m->slots[w->q[0].slot];
      if ((lua_Integer)w->rhdr.nitems > w->q[0].to - (s->start + s->recv))
        protocol_error(L, w, "too many results");
      reserve(L, &s->out, (size_t)w->rhdr.bodylen);
      w->rleft = w->rhdr.bodylen;
    }
    s = &m->slots[w->q[0].slot];
    if (w->rleft > 0) {
      size_t have = (size_t)(w->rhdr.bodylen - w->rleft);
      r = parmap_recv_some(w->fd, s->out.p + s->out.len + have,
                           (size_t)w->rleft);
      if (r == -2) return 0;
      if (r <= 0) return 1;
      w->rleft -= (uint64_t)r;
      if (w->due) w->due = parmap_now_ns();
      if (w->rleft > 0) continue;
    }
    if (w->rhdr.flags & FLAG_INIT)
      init_error(L, m, w, s->out.p + s->out.len, (size_t)w->rhdr.bodylen);
    s->out.len += (size_t)w->rhdr.bodylen;
    s->recv += w->rhdr.nitems;
    if (w->rhdr.nitems > 0) {
      w->delivered = 1;
      m->stillborn = 0;
    }
    m->done += w->rhdr.nitems;
    w->rhave = 0;
    if (w->rhdr.flags & FLAG_END) {
      if (s->start + s->recv != w->q[0].to)
        protocol_error(L, w, "segment ended early");
      segment_done(m, w, w->rhdr.elapsed_ns);
    }
  }
}

/* Timeouts watch the work a worker owes from the moment it is handed
   over, not only while an item runs: the item running has its own start;
   between items (cur = 0), the segment at the head of its queue is due
   from the later of when its first bytes were sent (w->due) and when the
   worker's previous segment ended (the worker writes that time to start
   before clearing cur). A worker stopped while idle, or one whose queued
   segment was read by fn off its socket, is thus killed in time too.
   Kill (when `kill_them`) workers past their deadline; return ms to the
   next deadline (-1: none). Only kill after reading what the sockets
   hold: a segment's end frame may be waiting there. */
static int check_timeouts(Map *m, int kill_them) {
  uint64_t now = parmap_now_ns(), lim, next = 0;
  int i;
  if (m->cfg.timeout <= 0) return -1;
  lim = (uint64_t)(m->cfg.timeout * 1e9); /* <= 1e18: map_start clamps */
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    int64_t c1, c2;
    uint64_t start, base, left;
    if (w->fd < 0 || w->qn == 0 || w->timed_out) continue;
    c1 = __atomic_load_n(&m->shm[i].cur, __ATOMIC_ACQUIRE);
    start = __atomic_load_n(&m->shm[i].start, __ATOMIC_ACQUIRE);
    c2 = __atomic_load_n(&m->shm[i].cur, __ATOMIC_ACQUIRE);
    if (c1 != c2 || start > now) {
      base = now; /* it moves: look again later */
    } else if (c1 != 0) {
      base = start; /* an item runs */
    } else if (w->due) {
      base = w->due > start ? w->due : start; /* work it has not begun */
    } else {
      continue; /* nothing sent yet: it owes nothing */
    }
    if (now - base >= lim) {
      if (kill_them) {
        kill(w->pid, SIGKILL); /* still our unreaped child: safe */
        w->timed_out = 1;
        continue;
      }
      left = 0;
    } else {
      left = lim - (now - base);
    }
    if (next == 0 || left < next) next = left ? left : 1;
  }
  if (next == 0) return -1;
  next = next / 1000000u + 1;
  return next > EXIT_CHECK_MS ? EXIT_CHECK_MS : (int)next;
}

/* A worker's death shows as end of file on its socket, unless a process
   that fn forked (without exec) holds the socket open: then the worker is
   found by waitpid, every so often while the parent waits. All it sent is
   in the socket by then: read it, then report the death. */

static void on_death(lua_State *L, Map *m, int wi);

static void check_exits(lua_State *L, Map *m) {
  int i;
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    int st = 0, r;
    if (w->fd < 0 || w->pid <= 0) continue;
    r = parmap_wait(w->pid, &st, 0);
    if (r == 0) continue;
    w->exited = 1;
    w->status = st;
    w->lost = r < 0;
    recv_more(L, m, w);
    on_death(L, m, i);
  }
}

static Slot *ready(Map *m);
static int finished(Map *m);

/* One round: hand out work, wait for sockets (or not), move bytes. */
static void pump(lua_State *L, Map *m, int block) {
  int i, n = 0, r, timeout;
  if (m->owner != getpid()) /* a forked copy: the workers and fds are not
                               ours (the fd numbers may name other files) */
    luaL_error(L, "parmap: a map cannot be stepped from a worker or child "
               "process (it belongs to process %d)", (int)m->owner);
  dispatch(L, m);
  if (block && (ready(m) || finished(m))) block = 0; /* dispatch made some */
  if (m->close_req) return; /* closed from a callback: step stops it */
  timeout = block ? check_timeouts(m, 0) : 0;
  if (block && (timeout < 0 || timeout > EXIT_CHECK_MS)) timeout = EXIT_CHECK_MS;
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (w->fd < 0) continue;
    m->pfd[n].fd = w->fd;
    m->pfd[n].events = POLLIN | (w->nsent < w->qn ? POLLOUT : 0);
    m->pfd[n].revents = 0;
    m->pfd_w[n++] = i;
  }
  if (n == 0) { /* fine while records wait to be consumed */
    if (block) luaL_error(L, "parmap: no worker left and none can be started");
    return;
  }
  if (block) { /* waiting with nothing out would hang: say so instead */
    int out = 0;
    for (i = 0; i < m->nw; i++) out += m->w[i].qn;
    if (out == 0) luaL_error(L, "parmap: internal error: the map stalled");
  }
  r = poll(m->pfd, (nfds_t)n, timeout);
  if (r < 0) {
    if (errno != EINTR) luaL_error(L, "parmap: poll: %s", strerror(errno));
    parmap_run_hooks(L); /* a signal: lua.c's Ctrl-C hook runs now */
    return;
  }
  for (i = 0; i < n; i++) {
    Worker *w = &m->w[m->pfd_w[i]];
    int dead = 0;
    if (m->pfd[i].revents & POLLOUT) dead = send_more(m, w) < 0;
    if (m->pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
      dead = recv_more(L, m, w) || dead;
    if (dead) on_death(L, m, m->pfd_w[i]);
  }
  if (m->cfg.timeout > 0) check_timeouts(m, 1);
  /* a signal that came between two polls (no EINTR), or while results
     stream in (poll never waits): lua.c's Ctrl-C hook runs now */
  if (block) parmap_run_hooks(L);
  if (block) {
    uint64_t now = parmap_now_ns();
    if (now - m->exit_check >= (uint64_t)EXIT_CHECK_MS * 1000000u) {
      m->exit_check = now;
      check_exits(L, m);
    }
  }
  retire_idle(m);
}

/* ---------------------------------------------------------------- closing */

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
  free(m->retired);
  m->retired = NULL;
  m->nretired = m->retired_cap = 0;
  free(m->w);
  m->w = NULL;
  free(m->pfd);
  m->pfd = NULL;
  free(m->pfd_w);
  m->pfd_w = NULL;
  if (m->shm) munmap(m->shm, m->shm_size);
  m->shm = NULL;
}

static void stop(Map *m, int kill_them) {
  int i, st;
  if (m->state == M_CLOSED) return;
  if (m->state != M_DONE) m->state = M_CLOSED; /* an ended map stays so */
  if (m->owner != getpid()) return; /* a worker's copy: not its children */
  if (m->w == NULL) return;
  for (i = 0; i < m->nw; i++) {
    parmap_fd_close(m->w[i].fd);
    m->w[i].fd = -1;
  }
  for (i = 0; i < m->nw; i++) {
    pid_t pid = m->w[i].pid;
    if (!pid) continue;
    if (kill_them && parmap_wait(pid, &st, 0) == 0) kill(pid, SIGKILL);
    parmap_wait(pid, &st, -1);
    m->w[i].pid = 0;
  }
  for (i = 0; i < m->nretired; i++) { /* recycled: running finish, or gone */
    if (kill_them && parmap_wait(m->retired[i], &st, 0) == 0)
      kill(m->retired[i], SIGKILL);
    parmap_wait(m->retired[i], &st, -1);
  }
  m->nretired = 0;
  m->nlive = 0;
  release(m); /* nothing reads the slots once stopped */
}

static int map_gc(lua_State *L) {
  Map *m = (Map *)luaL_checkudata(L, 1, MAP_MT);
  stop(m, 1);
  release(m);
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

/* An error record (kind, err, message, traceback, pid) at base + 1..5 for
   item `index`, which lost `lost` runs to deaths and timeouts: raise it,
   or return index and the error object. */
static int failed(lua_State *L, Map *m, lua_Integer lost, lua_Integer index,
                  int base, int n) {
  int k;
  lua_Integer attempts;
  const char *kind;
  if (n != 5 || lua_type(L, base + 1) != LUA_TSTRING ||
      lua_type(L, base + 3) != LUA_TSTRING) {
    return luaL_error(L, "parmap: corrupt error record for item %I",
                      (LUAI_UACINT)index);
  }
  /* raising stops the map: step does, once out of the engine */
  if (strcmp(lua_tostring(L, base + 1), "shape") == 0) {
    lua_pushvalue(L, base + 3); /* a bad item: raised whatever exception says */
    return lua_error(L);
  }
  if (m->cfg.exception == EXC_PROC) {
    lua_pushvalue(L, base + 2);
    return lua_error(L);
  }
  /* its runs: fn raised in every one the worker gave it (its retries less
     those lost before); a death or timeout ended each one counted; a
     result that cannot travel ends it at once */
  kind = lua_tostring(L, base + 1);
  if (strcmp(kind, "error") == 0)
    attempts = m->cfg.retries + 1;
  else if (strcmp(kind, "died") == 0 || strcmp(kind, "timeout") == 0)
    attempts = lost;
  else
    attempts = lost + 1;
  if (attempts < 1) attempts = 1;
  lua_getiuservalue(L, m->self, U_MKERR);
  lua_pushinteger(L, index);
  for (k = 1; k <= 5; k++) lua_pushvalue(L, base + k);
  lua_pushinteger(L, attempts);
  lua_call(L, 7, 1); /* make_error(index, kind, err, message, tb, pid,
                        attempts) */
  if (m->cfg.exception == EXC_RAISE) return lua_error(L);
  lua_pushinteger(L, index);
  lua_insert(L, -2);
  return 2;
}

/* Push index and values of the next record of s; returns the count. */
static int emit(lua_State *L, Map *m, Slot *s) {
  lua_Integer index = s->start + s->consumed;
  size_t pos = s->rpos + 1;
  int status, n, base;
  lua_Integer lost = 0;
  const char *err = NULL;
  if (s->rpos >= s->out.len) { /* a frame announced more than it carried */
    return luaL_error(L, "parmap: corrupt result for item %I: no record",
                      (LUAI_UACINT)index);
  }
  status = (unsigned char)s->out.p[s->rpos];
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
  s->rpos = pos;
  m->taken++;
  if (status != REC_OK) /* read before the slot may be released */
    lost = s->ntries > 0 ? tries_of(s, index) : 0;
  if (++s->consumed == s->count) {
    if (m->cfg.ordered) m->seq_take++;
    if (!s->busy) release_slot(m, s); /* else when its segment ends */
    pump(L, m, 0); /* workers may be waiting for this room */
  }
  return status == REC_OK ? n + 1 : failed(L, m, lost, index, base, n);
}

static int finished(Map *m) {
  return m->exhausted && (m->cfg.ordered ? m->seq_take == m->seq_new
                                         : m->slots_used == 0);
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
    if (finished(m)) {
      if (!m->ierr) progress(L, m, 1);
      if (m->close_req) return 0;
      stop(m, 0);
      if (m->ierr) { /* every item pulled is delivered: now the error */
        m->ierr = 2;   /* and the map counts as stopped, not as over */
        lua_getiuservalue(L, m->self, U_IERR);
        return lua_error(L);
      }
      m->state = M_DONE;
      return 0;
    }
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
static int step(lua_State *L, Map *m, int nargs) {
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
  lua_pushcfunction(L, step_body);
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

/* collect(map): a table t with t[i] = the first value of item i, and the
   highest index. parmap.map without a Lua loop per item. */
static int map_collect(lua_State *L) {
  Map *m = checkmap(L, 1);
  lua_Integer total = m->cfg.total;
  lua_settop(L, 1);
  lua_createtable(L, total > 0 && total < (1 << 26) ? (int)total : 0, 0);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  return step(L, m, 2); /* map, t | map, t: step_body's arguments */
}

/* ---------------------------------------------------------------- start */

/* A small integer option of the spec (a flag, a mode): d when absent. */
static int intfield(lua_State *L, const char *k, int d, int hi) {
  lua_Integer v;
  int isnum;
  lua_getfield(L, 1, k);
  v = lua_tointegerx(L, -1, &isnum);
  lua_pop(L, 1);
  if (!isnum) return d;
  if (v < 0 || v > hi)
    luaL_error(L, "parmap: bad spec field '%s' (0..%d expected, got %I)", k,
               hi, (LUAI_UACINT)v);
  return (int)v;
}

/* A count the user gave (N, args.n, total, chunksize), checked before any
   arithmetic: an integer >= lo, or absent (d). `name` is the option the
   user wrote. Whatever reaches the core directly gets a clear error. */
static lua_Integer countfield(lua_State *L, const char *k, const char *name,
                              lua_Integer lo, lua_Integer d) {
  lua_Integer v;
  int isnum, t;
  t = lua_getfield(L, 1, k);
  v = lua_tointegerx(L, -1, &isnum);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return d;
  }
  if (!isnum || v < lo)
    luaL_error(L, "parmap: bad option '%s' (%s expected, got %s)", name,
               lo > 0 ? "positive integer" : "non-negative integer",
               luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  return v;
}

/* The options of a spec, checked and clamped so that no size computation
   can overflow: N to PARMAP_MAX_WORKERS and to the item count of a table
   input, chunksize to PARMAP_MAX_CHUNK, args.n at most PARMAP_MAX_ARGS. */
static void read_config(lua_State *L, Config *c) {
  lua_Integer n;
  c->star = intfield(L, "star", 0, STAR_NONE);
  c->kwstar = intfield(L, "kwstar", 0, 1);
  c->has_kw = intfield(L, "has_kw", 0, 1);
  c->from_table = intfield(L, "from_table", 0, 1);
  c->exception = intfield(L, "exception", EXC_RAISE, EXC_PROC);
  c->ordered = intfield(L, "ordered", 1, 1);
  n = countfield(L, "nargs", "args.n", 0, 0);
  if (n > PARMAP_MAX_ARGS)
    luaL_error(L, "parmap: bad option 'args.n' (too many arguments: %I, at "
               "most %d)", (LUAI_UACINT)n, PARMAP_MAX_ARGS);
  c->nargs = (int)n;
  c->total = countfield(L, "total", "total", 0, -1);
  if (c->from_table && c->total < 0) c->total = 0;
  c->chunksize = countfield(L, "chunksize", "chunksize", 1, 0);
  if (c->chunksize > PARMAP_MAX_CHUNK) c->chunksize = PARMAP_MAX_CHUNK;
  c->maxtasks = countfield(L, "maxtasks", "maxtasks", 1, 0);
  c->retries = countfield(L, "retries", "retries", 0, 0);
  n = countfield(L, "N", "N", 1, 1);
  if (n > PARMAP_MAX_WORKERS) n = PARMAP_MAX_WORKERS;
  if (c->from_table && n > c->total) n = c->total > 0 ? c->total : 1;
  c->N = (int)n;
  c->buffersize = countfield(L, "buffersize", "buffersize", 1, 0);
  if (c->buffersize == 0) c->buffersize = (lua_Integer)BUFFER_PER_WORKER * c->N;
  if (lua_getfield(L, 1, "timeout") != LUA_TNIL) {
    lua_Number t = lua_tonumber(L, -1);
    if (!lua_isnumber(L, -1) || !(t > 0))
      luaL_error(L, "parmap: bad option 'timeout' (positive number of "
                 "seconds expected, got %s)", luaL_tolstring(L, -1, NULL));
    c->timeout = t > 1e9 ? 0 : (double)t; /* past 30 years: none */
  }
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "seed") != LUA_TNIL) {
    int isnum;
    c->seed = lua_tointegerx(L, -1, &isnum);
    if (!isnum)
      luaL_error(L, "parmap: bad option 'seed' (integer expected, got %s)",
                 luaL_tolstring(L, -1, NULL));
    c->has_seed = 1;
  }
  lua_pop(L, 1);
}

static void uvfield(lua_State *L, int ud, const char *k, int u) {
  lua_getfield(L, 1, k);
  lua_setiuservalue(L, ud, u);
}

/* The first dispatch of start, run protected: nothing holds the map yet,
   so workers forked before the iterator raised must be stopped here. */
static int first_dispatch(lua_State *L) {
  Map *m = checkmap(L, 1);
  m->self = 1;
  dispatch(L, m);
  return 0;
}

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
  read_config(L, &m->cfg);
  uvfield(L, ud, "fn", U_FN);
  uvfield(L, ud, "items", U_ITEMS);
  uvfield(L, ud, "args", U_ARGS);
  uvfield(L, ud, "kwargs", U_KW);
  uvfield(L, ud, "progress", U_PROGRESS);
  uvfield(L, ud, "make_error", U_MKERR);
  uvfield(L, ud, "describe", U_DESC);
  uvfield(L, ud, "init", U_INIT);
  uvfield(L, ud, "finish", U_FINISH);
  lua_newtable(L);
  lua_setiuservalue(L, ud, U_SCRATCH);
  m->nw = m->cfg.N;
  m->nslots = m->cfg.N * WINDOW_PER_WORKER;
  m->w = (Worker *)calloc((size_t)m->cfg.N, sizeof *m->w);
  m->slots = (Slot *)calloc((size_t)m->nslots, sizeof *m->slots);
  m->ring = (int *)calloc((size_t)m->nslots, sizeof *m->ring);
  m->pfd = (struct pollfd *)calloc((size_t)m->cfg.N, sizeof *m->pfd);
  m->pfd_w = (int *)calloc((size_t)m->cfg.N, sizeof *m->pfd_w);
  m->shm_size = sizeof(Shm) * (size_t)m->cfg.N;
  m->shm = (Shm *)mmap(NULL, m->shm_size, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m->shm == MAP_FAILED) m->shm = NULL;
  if (!m->w || !m->slots || !m->ring || !m->pfd || !m->pfd_w || !m->shm) nomem(L);
  for (i = 0; i < m->cfg.N; i++) m->w[i].fd = -1;
  m->next_index = 1;
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
      {"close", map_close}, {NULL, NULL}};
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
