/*
** mpi_coord.c: the coordinator on rank 0 (module "parmap.mpi", only in
** parmap-mpi; see parmap_mpi.h for the protocol).
**
** A map sends fn (once per agent: an fnenc record) and the options, then
** cuts the items into segments: two in flight per agent, one more on each
** CREDIT. Segment sizes aim at ~25 ms of an agent's work, from the rate at
** which its results came so far (at first: one item per worker), and no
** more than a share of what remains of a known total, so agents finish
** together. Results arrive in batches from any agent; each waits as a
** string (rank, record) until the loop takes it, in order or as they
** came. A CREDIT is answered at once (see handle()) unless buffersize
** items of an iterator are pulled and not taken: then once the loop
** takes some (pay_owed).
*/
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "child.h"
#include "codec.h"
#include "engine.h"
#include "journal.h"
#include "parmap_mpi.h"
#include "proc.h"
#include "spec.h"

#define SEG_BYTES ((size_t)4 << 20)
#define SEG_MAX 65536
#define SEG_NS 25000000.0 /* 25 ms */
#define BUFFER_PER_WORKER 8192 /* the fork engine's default buffersize */
#define MAP_META "parmap.MpiMap"

typedef struct AgentInfo {
  int ncpu, dead;
  int hb; /* it sends heartbeats (its MPI gave it MPI_THREAD_MULTIPLE) */
  int share; /* its workers when N is not given: its CPUs over the agents
                on its host */
  uint64_t seen_ns; /* when a message from it came last */
  char host[256];
} AgentInfo;

static struct {
  int size;
  AgentInfo *ag; /* by rank; ag[0] is rank 0 */
  Outbox out;
  uint32_t nextmap;
  int nopen; /* maps open (one at a time) */
  int quit, lost;
  double dead_after; /* ns of silence (heartbeats included) after which an
                        agent is lost: PARMAP_MPI_DEAD_AFTER s, default 10 */
  uint64_t last_check; /* when wait_one last looked for silent agents */
} C;

typedef struct PerAgent {
  int ended, done;
  int owed; /* segments it asked for that wait for room (buffersize) */
  int open; /* rounds of this map it runs (a resilient map may add one) */
  struct Sent {
    int64_t first;
    uint32_t count, left;
    lua_Integer id; /* the segment's string in M_SEGS */
  } *sent; /* resilient: its segments not yet fully answered */
  int nsent, capsent;
  lua_Integer got;
  int wbase;          /* its workers are numbered wbase + 1.. in the job */
  double last;        /* the size of its last segment */
  uint64_t credit_ns; /* when its last CREDIT came */
} PerAgent;

/* user values */
enum {
  M_ITEMS = 1, M_PENDING, M_POLICY, M_SCRATCH, M_PROGRESS, M_FAIL,
  M_DESC, M_SEGS, M_MAPMSG, M_IERR, M_AERR, M_JOURNAL, M_NUV = M_JOURNAL
};

#define MMAP_MAGIC 0x6d70696d61706d70ull /* "pmapimpm" */

typedef struct MMap {
  uint64_t magic;
  uint32_t id;
  int has_progress;
  int from_table, ordered, closed, finished, exhausted, nw;
  int failrank, resilient;
  int wtotal; /* workers in the job: every live agent's N */
  double bound; /* ns of silence that loses an agent in this map: dead_after,
                   or less with a timeout */
  int busy; /* a step runs: a callback that steps the map gets an error */
  int ierr; /* the items iterator raised: its error (M_IERR) comes after
               the items pulled before it */
  int nowed; /* the agents' owed segments (PerAgent.owed), in all */
  /* an items table whose access raised for item access_at: the item fails
     (its error in M_AERR) after retries + 1 accesses, as in a fork worker,
     and the map goes on */
  int accessing, access_runs, retries;
  lua_Integer access_at;
  /* boxed items (nil items, seed) with star = true or kwstar: the agents
     call fn through a Lua adapter, so an item of the wrong shape fails
     here, kind "shape", as a fork worker's would (cs: the call table) */
  int shapecheck;
  CallSpec cs;
  int segn;      /* items in seg so far */
  size_t segok;  /* seg's length after its last whole item */
  lua_Integer segid;
  lua_Integer total, pulled, received, emitted, want;
  lua_Integer buffersize; /* iterator input: at most this many items pulled
                             and not yet taken by the loop; 0: no bound */
  /* Results that wait for the loop stay in their batch (a Lua string in
     the M_PENDING table, by message number); slot g says where. Slots form
     a ring over the items [lo, lo + rcap) not yet taken by the loop. */
  struct Slot {
    uint64_t off;
    uint32_t msg, len;
    int rank; /* 0: not here yet, -1: taken */
  } *ring;
  lua_Integer lo;
  size_t rcap;
  lua_Integer *fifo; /* unordered: the order results came in */
  size_t fcap, fhead, ftail;
  uint32_t *mref; /* results of message k not yet taken */
  const char **mptr; /* message k's bytes (its string in M_PENDING) */
  uint32_t nmsg, mcap;
  uint64_t t0;
  ParmapJournal *jr; /* option journal (M_JOURNAL), or NULL */
  lua_Integer jrun;  /* fill: items it gave their journaled results */
  parmap_buf jb;     /* replay's batch (kept: the iterator may raise) */
  lua_Integer jpend; /* items in jb, not yet delivered */
  PerAgent *as;
  parmap_buf seg;
} MMap;

static void nomem(lua_State *L) { luaL_error(L, "parmap: not enough memory"); }

/* ------------------------------------------------------------ segments */

/* The size of agent r's next segment. An agent sends a CREDIT each time
   it starts a segment, so the time between two CREDITs is how long it took
   to eat one: faster than half the aim (~25 ms of work), the next segment
   is twice as large; slower than twice the aim, half as large; never less
   than one item per worker, nor more than a share of what remains of a
   known total (so agents finish together). */
static int seg_size(MMap *m, int r) {
  double k, nw = m->nw > 0 ? m->nw : C.ag[r].share, last = m->as[r].last;
  uint64_t now = parmap_now_ns(), prev = m->as[r].credit_ns;
  if (nw < 1) nw = 1;
  k = last > 0 ? last : nw;
  if (prev > 0) {
    double dt = (double)(now - prev);
    if (dt < SEG_NS / 2) k = 2 * k;
    else if (dt > 2 * SEG_NS) k = k / 2;
  }
  if (k < nw) k = nw;
  if (k > SEG_MAX) k = SEG_MAX;
  m->as[r].last = k;
  if (m->total > m->pulled) { /* an iterator's total may be wrong */
    double share = (double)(m->total - m->pulled) / (2.0 * (C.size - 1));
    if (k > share) k = share;
  }
  if (m->buffersize > 0 && k > (double)(m->buffersize - (m->pulled - m->emitted)))
    k = (double)(m->buffersize - (m->pulled - m->emitted));
  return k < 1 ? 1 : (int)k;
}

/* No room for one more item: buffersize items are pulled and not taken. */
static int full(const MMap *m) {
  return m->buffersize > 0 && !m->exhausted &&
         m->pulled - m->emitted >= m->buffersize;
}

static int geti(lua_State *L) {
  lua_gettable(L, 1);
  return 1;
}

/* Push the next item, or return 0 when the input has ended; -1 (nothing
   pushed) when an items table's access raised for it, its retries too. */
static int pull(lua_State *L, MMap *m, int items) {
  if (m->exhausted) return 0;
  if (m->from_table) {
    if (m->pulled >= m->total) {
      m->exhausted = 1;
      return 0;
    }
    if (m->pulled + 1 == m->access_at) { /* it raised: the retries */
      int st = !LUA_OK;
      while (st != LUA_OK && m->access_runs < m->retries + 1) {
        lua_pushcfunction(L, geti);
        lua_pushvalue(L, items);
        lua_pushinteger(L, m->access_at);
        if ((st = lua_pcall(L, 2, 1, 0)) != LUA_OK) {
          if (st == LUA_ERRMEM || parmap_is_interrupt(L, -1)) lua_error(L);
          lua_setiuservalue(L, 1, M_AERR);
          m->access_runs++;
        }
      }
      m->access_at = 0;
      if (st != LUA_OK) { /* it fails; its error is in M_AERR */
        m->pulled++;
        if (m->pulled >= m->total) m->exhausted = 1;
        return -1;
      }
    } else {
      m->accessing = 1; /* an error here is the item's (send_segment) */
      lua_geti(L, items, m->pulled + 1);
      m->accessing = 0;
    }
  } else {
    lua_pushvalue(L, items);
    lua_call(L, 0, 1);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      m->exhausted = 1;
      return 0;
    }
  }
  m->pulled++;
  if (m->from_table && m->pulled >= m->total) m->exhausted = 1;
  return 1;
}

/* A MAP message for agent r: its workers' numbers (a = the first - 1,
   b = the job's count) in the header. */
static void numbering(MMap *m, parmap_buf *msg, int r) {
  MsgHdr h;
  memcpy(&h, msg->p, sizeof h);
  h.a = m->as[r].wbase;
  h.b = m->wtotal;
  h.count = m->nw > 0 ? 0 : (uint32_t)C.ag[r].share; /* its N, by default */
  memcpy(msg->p, &h, sizeof h);
}

/* Resilient maps: keep the segment (string at idx) sent to agent r until
   every one of its items has a result, to send it again if r dies. */
static void remember(lua_State *L, MMap *m, int r, int idx) {
  PerAgent *a = &m->as[r];
  MsgHdr h;
  memcpy(&h, lua_tostring(L, idx), sizeof h);
  if (a->nsent == a->capsent) {
    int cap = a->capsent ? 2 * a->capsent : 8;
    void *v = realloc(a->sent, (size_t)cap * sizeof *a->sent);
    if (v == NULL) nomem(L);
    a->sent = (struct Sent *)v;
    a->capsent = cap;
  }
  a->sent[a->nsent].first = h.a;
  a->sent[a->nsent].count = a->sent[a->nsent].left = h.count;
  a->sent[a->nsent].id = ++m->segid;
  a->nsent++;
  lua_getiuservalue(L, 1, M_SEGS);
  lua_pushvalue(L, idx);
  lua_rawseti(L, -2, m->segid);
  lua_pop(L, 1);
}

/* Resilient maps: item g's result came from agent r. */
static void answered(lua_State *L, MMap *m, int r, lua_Integer g) {
  PerAgent *a = &m->as[r];
  int i;
  for (i = 0; i < a->nsent; i++)
    if (g >= a->sent[i].first && g < a->sent[i].first + a->sent[i].count) {
      a->sent[i].left--;
      break;
    }
  while (a->nsent > 0 && a->sent[0].left == 0) {
    lua_getiuservalue(L, 1, M_SEGS);
    lua_pushnil(L);
    lua_rawseti(L, -2, a->sent[0].id);
    lua_pop(L, 1);
    memmove(a->sent, a->sent + 1, (size_t)(--a->nsent) * sizeof *a->sent);
  }
}

static void take_results(lua_State *L, MMap *m, int msgi, int from);
#define LOCAL (C.size) /* the "rank" of a result made on rank 0 */

/* Item g fails at its turn, as on the fork backend, with a result made
   here (a REC_ERR record from rank 0): idx is the item's value when it
   cannot travel (kind "shape"), else 0 and the error its items table's
   access raised is in M_AERR (kind "error", after retries + 1 runs). */
static void local_failure(lua_State *L, MMap *m, lua_Integer g, int idx,
                          const char *shape) {
  parmap_buf b = PARMAP_BUF_INIT, rec = PARMAP_BUF_INIT;
  int top = lua_gettop(L), ok;
  if (shape != NULL) { /* the call adapter's message */
    lua_pushstring(L, shape);
    lua_getiuservalue(L, 1, M_SCRATCH); /* top + 2 */
    parmap_put_error(L, &rec, top + 2, "shape", top + 1, shape, "", 0);
  } else if (idx != 0) {
    idx = lua_absindex(L, idx);
    lua_getiuservalue(L, 1, M_DESC);
    lua_pushliteral(L, "item");
    lua_pushinteger(L, g);
    lua_pushvalue(L, idx);
    lua_call(L, 3, 1); /* top + 1: the message */
    lua_getiuservalue(L, 1, M_SCRATCH); /* top + 2 */
    parmap_put_error(L, &rec, top + 2, "shape", top + 1,
                     lua_tostring(L, top + 1), "", 0);
  } else { /* kind err message traceback pid attempts, as a worker's */
    const char *what = NULL;
    lua_getiuservalue(L, 1, M_SCRATCH); /* top + 1 */
    lua_pushliteral(L, "error");
    lua_getiuservalue(L, 1, M_AERR);
    if (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER ||
        luaL_getmetafield(L, -1, "__tostring") != LUA_TNIL) {
      if (lua_type(L, -1) == LUA_TFUNCTION) lua_pop(L, 1);
      luaL_tolstring(L, top + 3, NULL);
    } else {
      lua_pushfstring(L, "(error object is a %s value)",
                      luaL_typename(L, top + 3));
    }
    lua_pushliteral(L, "");
    lua_pushinteger(L, (lua_Integer)getpid());
    lua_pushinteger(L, m->access_runs);
    if (parmap_buf_reserve(&rec, 1)) nomem(L);
    rec.p[rec.len++] = (char)REC_ERR;
    if (parmap_encode(L, top + 2, 6, &rec, top + 1, &what) != PARMAP_OK) {
      lua_pushvalue(L, top + 4); /* err cannot travel: its message does */
      lua_replace(L, top + 3);
      rec.len = 1;
      if (parmap_encode(L, top + 2, 6, &rec, top + 1, &what) != PARMAP_OK)
        nomem(L);
    }
  }
  ok = mpi_begin(&b, m->id, 1, 0, 0) == 0 &&
       parmap_put_varint(&b, (unsigned long long)g) == 0 &&
       parmap_put_varint(&b, rec.len) == 0 &&
       parmap_buf_reserve(&b, rec.len) == 0;
  if (ok) {
    memcpy(b.p + b.len, rec.p, rec.len);
    b.len += rec.len;
    lua_pushlstring(L, b.p, b.len);
  }
  parmap_buf_free(&b);
  parmap_buf_free(&rec);
  if (!ok) nomem(L);
  take_results(L, m, lua_gettop(L), LOCAL);
  lua_settop(L, top);
}

/* An item failed here: a segment is a run of indices, so it ends the
   segment (returns 1) unless it would be the first (then the segment
   starts after it). */
static int seg_cut(MMap *m) {
  MsgHdr h;
  if (m->segn > 0) return 1;
  memcpy(&h, m->seg.p, sizeof h);
  h.a = m->pulled + 1;
  memcpy(m->seg.p, &h, sizeof h);
  return 0;
}

/* The journal (option journal): the run of up to k items from the next
   one that it holds are pulled (an iterator's too, to keep the indices)
   and given their recorded results here, as one batch from rank 0; the
   segment then starts after them. A segment stops before such an item. */
/* Deliver the journaled items replay has batched (m->jpend of them). */
static void replay_flush(lua_State *L, MMap *m) {
  MsgHdr h;
  if (m->jpend == 0) return;
  memcpy(&h, m->jb.p, sizeof h);
  h.count = (uint32_t)m->jpend;
  memcpy(m->jb.p, &h, sizeof h);
  m->jpend = 0;
  lua_pushlstring(L, m->jb.p, m->jb.len);
  take_results(L, m, lua_gettop(L), LOCAL);
  lua_pop(L, 1);
}

static void replay(lua_State *L, MMap *m, int k, int items) {
  parmap_buf *jb = &m->jb;
  if (mpi_begin(jb, m->id, 1, 0, 0)) nomem(L);
  while (m->jpend < k && !m->closed &&
         parmap_journal_next(m->jr, m->pulled + 1) == m->pulled + 1) {
    size_t len;
    const char *p;
    int got = pull(L, m, items); /* when it raises: send_segment flushes */
    if (got == 0) break;
    if (got > 0) lua_pop(L, 1); /* (< 0: its access raised; its result is
                                   recorded all the same) */
    p = parmap_journal_get(m->jr, m->pulled, &len);
    if (parmap_put_varint(jb, (unsigned long long)m->pulled) ||
        parmap_put_varint(jb, len) || parmap_buf_reserve(jb, len)) {
      m->pulled--; /* not delivered: the map stops */
      nomem(L);
    }
    memcpy(jb->p + jb->len, p, len);
    jb->len += len;
    m->jpend++;
  }
  m->jrun = m->jpend;
  if (m->jpend > 0) {
    MsgHdr h;
    replay_flush(L, m);
    memcpy(&h, m->seg.p, sizeof h); /* the segment starts after them */
    h.a = m->pulled + 1;
    memcpy(m->seg.p, &h, sizeof h);
  }
}

/* fill(map, k): pull and encode up to k items into the segment m->seg,
   protected (send_segment): m->segn and m->segok say how far it got. An
   item that cannot travel fails at its turn, and ends the segment (a
   segment is a run of indices), unless it would be the first. */
static int fill(lua_State *L) {
  MMap *m = (MMap *)lua_touserdata(L, 1);
  int k = (int)lua_tointeger(L, 2), items = 3, scratch = 4;
  lua_getiuservalue(L, 1, M_ITEMS);
  lua_getiuservalue(L, 1, M_SCRATCH);
  m->jrun = 0;
  if (m->jr && !m->exhausted &&
      parmap_journal_next(m->jr, m->pulled + 1) == m->pulled + 1) {
    replay(L, m, k, items);
    return 0;
  }
  for (;;) {
    const char *what = NULL;
    int got;
    if (!(m->segn < k && m->seg.len < SEG_BYTES && !m->closed)) break;
    if (m->jr && m->segn > 0 &&
        parmap_journal_next(m->jr, m->pulled + 1) == m->pulled + 1)
      break; /* the segment stops before a journaled item */
    if ((got = pull(L, m, items)) == 0) break;
    if (m->jr && !m->from_table && parmap_journal_count(m->jr) >= 0 &&
        m->pulled > parmap_journal_count(m->jr)) {
      m->pulled--; /* not an item of the map: the error comes after the
                      items before it */
      parmap_journal_more(L, m->jr);
    }
    if (got < 0) { /* its items table's access raised */
      local_failure(L, m, m->pulled, 0, NULL);
      if (seg_cut(m)) break;
      continue;
    }
    if (!parmap_encode_scalar(L, -1, &m->seg) &&
        parmap_encode(L, lua_gettop(L), 1, &m->seg, scratch, &what) !=
            PARMAP_OK) {
      local_failure(L, m, m->pulled, -1, NULL);
      lua_pop(L, 1);
      if (seg_cut(m)) break;
      continue;
    }
    if (m->shapecheck) { /* after encoding: one that cannot travel says so */
      int it = lua_gettop(L);
      m->cs.fn = it;
      if (parmap_push_call(L, &m->cs, it, m->pulled) < 0) {
        m->seg.len = m->segok; /* it does not go */
        local_failure(L, m, m->pulled, 0, lua_tostring(L, -1));
        lua_settop(L, it - 1);
        if (seg_cut(m)) break;
        continue;
      }
      lua_settop(L, it);
    }
    lua_pop(L, 1);
    m->segn++;
    m->segok = m->seg.len;
  }
  return 0;
}

/* Send agent r its next segment, or TAG_END when the input has ended.
   The map userdata is at index 1. An error of the items iterator ends the
   input: the items pulled before it run, and it is raised after them. */
static void send_segment(lua_State *L, MMap *m, int r) {
  int status, top = lua_gettop(L), k;
  if (m->as[r].ended) return;
again:
  if (full(m)) { /* sent once the loop takes items (pay_owed) */
    m->as[r].owed++;
    m->nowed++;
    return;
  }
  if (mpi_begin(&m->seg, m->id, 0, m->pulled + 1, 0)) nomem(L);
  m->segn = 0;
  m->segok = m->seg.len;
  lua_pushcfunction(L, fill);
  lua_pushvalue(L, 1);
  lua_pushinteger(L, k = seg_size(m, r));
  status = lua_pcall(L, 2, 0, 0);
  while (status != LUA_OK && m->accessing && status != LUA_ERRMEM &&
         !parmap_is_interrupt(L, -1)) {
    /* an items table's access raised: the item's error (retried in pull),
       and the segment goes on */
    m->accessing = 0;
    lua_setiuservalue(L, 1, M_AERR);
    m->access_at = m->pulled + 1;
    m->access_runs = 1;
    m->seg.len = m->segok;
    lua_pushcfunction(L, fill);
    lua_pushvalue(L, 1);
    lua_pushinteger(L, k);
    status = lua_pcall(L, 2, 0, 0);
  }
  m->accessing = 0;
  if (status != LUA_OK) {
    if (status == LUA_ERRMEM || parmap_is_interrupt(L, -1))
      lua_error(L); /* out of memory, or Ctrl-C: at once (the map stops) */
    m->seg.len = m->segok; /* drop a half-encoded item */
    replay_flush(L, m); /* journaled items pulled before it */
    m->exhausted = m->ierr = 1;
    lua_setiuservalue(L, 1, M_IERR);
  }
  /* journaled items only: the agent's credit still wants a segment */
  if (m->segn == 0 && m->jrun > 0 && !m->exhausted && !m->closed) goto again;
  if (m->segn > 0) {
    MsgHdr h;
    memcpy(&h, m->seg.p, sizeof h);
    h.count = (uint32_t)m->segn;
    memcpy(m->seg.p, &h, sizeof h);
    if (m->resilient) {
      lua_pushlstring(L, m->seg.p, m->seg.len);
      remember(L, m, r, lua_gettop(L));
      lua_pop(L, 1);
    }
    if (mpi_send(&C.out, &m->seg, r, TAG_SEG)) nomem(L);
  }
  if (m->exhausted) {
    if (mpi_send_hdr(&C.out, r, TAG_END, m->id, 0)) nomem(L);
    m->as[r].ended = 1;
  }
  lua_settop(L, top);
}

/* Send the segments that waited for room, now that the loop took items.
   No deadlock: every item pulled and not taken is at an agent (whose
   engine never holds a chunk back waiting for input: map.h's ready) or
   here, so the loop takes some and makes room. */
static void pay_owed(lua_State *L, MMap *m) {
  int r;
  for (r = 1; r < C.size && m->nowed > 0 && !full(m); r++)
    while (m->as[r].owed > 0 && !full(m)) {
      m->as[r].owed--;
      m->nowed--;
      send_segment(L, m, r);
    }
}

/* ------------------------------------------------------------ messages */

static struct Slot *slot(MMap *m, lua_Integer g) {
  return &m->ring[(size_t)g % m->rcap];
}

/* Make room for item g in the ring. */
static int ring_fit(MMap *m, lua_Integer g) {
  while ((size_t)(g - m->lo) >= m->rcap) {
    size_t cap = m->rcap ? 2 * m->rcap : 1024, k;
    struct Slot *r = (struct Slot *)calloc(cap, sizeof *r);
    if (r == NULL) return -1;
    for (k = 0; k < m->rcap; k++) {
      lua_Integer h = m->lo + (lua_Integer)k;
      r[(size_t)h % cap] = m->ring[(size_t)h % m->rcap];
    }
    free(m->ring);
    m->ring = r;
    m->rcap = cap;
  }
  return 0;
}

static int fifo_push(MMap *m, lua_Integer g) {
  if (m->ftail == m->fcap) {
    if (m->fhead > 0) {
      memmove(m->fifo, m->fifo + m->fhead,
              (m->ftail - m->fhead) * sizeof *m->fifo);
      m->ftail -= m->fhead;
      m->fhead = 0;
    } else {
      size_t cap = m->fcap ? 2 * m->fcap : 1024;
      void *v = realloc(m->fifo, cap * sizeof *m->fifo);
      if (v == NULL) return -1;
      m->fifo = (lua_Integer *)v;
      m->fcap = cap;
    }
  }
  m->fifo[m->ftail++] = g;
  return 0;
}

/* A batch of results from rank `from`, the string at index msgi. */
static void take_results(lua_State *L, MMap *m, int msgi, int from) {
  size_t blen, pos = sizeof(MsgHdr);
  const char *b = lua_tolstring(L, msgi, &blen);
  MsgHdr h;
  uint32_t i, k;
  memcpy(&h, b, sizeof h);
  if (m->nmsg + 1 >= m->mcap) {
    uint32_t cap = m->mcap ? 2 * m->mcap : 256;
    void *v = realloc(m->mref, cap * sizeof *m->mref);
    if (v == NULL) nomem(L);
    m->mref = (uint32_t *)v;
    v = realloc((void *)m->mptr, cap * sizeof *m->mptr);
    if (v == NULL) nomem(L);
    m->mptr = (const char **)v;
    m->mcap = cap;
  }
  k = ++m->nmsg;
  m->mref[k] = 0;
  m->mptr[k] = b; /* kept alive by M_PENDING below */
  for (i = 0; i < h.count; i++) {
    unsigned long long g, len;
    struct Slot *sl;
    if (parmap_get_varint(b, blen, &pos, &g) ||
        parmap_get_varint(b, blen, &pos, &len) || len > blen - pos ||
        len < 1 || g < 1 || (lua_Integer)g > m->pulled ||
        (!m->resilient && (lua_Integer)g < m->lo))
      luaL_error(L, "parmap: bad results from rank %d", from);
    if (m->resilient && from != LOCAL) {
      answered(L, m, from, (lua_Integer)g);
      /* sent again after a death that was not one: the first result won */
      if ((lua_Integer)g < m->lo ||
          ((size_t)((lua_Integer)g - m->lo) < m->rcap &&
           slot(m, (lua_Integer)g)->rank != 0)) {
        pos += (size_t)len;
        continue;
      }
    }
    if (ring_fit(m, (lua_Integer)g)) nomem(L);
    sl = slot(m, (lua_Integer)g);
    if (sl->rank != 0) luaL_error(L, "parmap: rank %d sent item %d twice", from, (int)g);
    sl->off = pos;
    sl->len = (uint32_t)len;
    sl->msg = k;
    sl->rank = from;
    pos += (size_t)len;
    m->mref[k]++;
    m->received++;
    if (from != LOCAL) m->as[from].got++;
    if (m->jr && from != LOCAL && b[pos - len] == (char)REC_OK)
      parmap_journal_append(L, m->jr, (lua_Integer)g, b + pos - len, len);
    if (!m->ordered && fifo_push(m, (lua_Integer)g)) nomem(L);
  }
  lua_getiuservalue(L, 1, M_PENDING);
  lua_pushvalue(L, msgi);
  lua_rawseti(L, -2, k);
  lua_pop(L, 1);
  if (m->jr && from != LOCAL) parmap_journal_commit(L, m->jr); /* one write */
}

static void handle(lua_State *L, MMap *m, parmap_buf *b, int msgi, int tag,
                   int from) {
  MsgHdr h = mpi_hdr(b);
  if (m == NULL || h.mapid != m->id || from < 1 || from >= C.size) return;
  if (m->closed && tag != TAG_DONE && tag != TAG_FAIL) return;
  switch (tag) {
    case TAG_CREDIT:
      /* answered at once, or owed while buffersize items are out (an
         agent's engine never waits for items while it holds some, so
         their results come and the loop makes room) */
      send_segment(L, m, from);
      m->as[from].credit_ns = parmap_now_ns();
      break;
    case TAG_RES:
      take_results(L, m, msgi, from);
      break;
    case TAG_DONE:
      if (--m->as[from].open <= 0) m->as[from].done = 1;
      break;
    case TAG_FAIL:
      if (--m->as[from].open <= 0) m->as[from].done = 1;
      if (m->failrank == 0) {
        m->failrank = from;
        lua_pushlstring(L, b->p + sizeof h, b->len - sizeof h);
        lua_setiuservalue(L, 1, M_FAIL);
      }
      break;
    default:
      break;
  }
}

static void agent_died(lua_State *L, MMap *m, int r);

/* Agent k owes work in map m and has sent nothing, heartbeats included,
   past the map's bound: a stopped, cut off or dead host. Resilient maps go
   on without it (agent_died: returns 1); any other map ends the job here,
   naming it (waiting could be for ever: a cut link or a stopped process
   may never make the launcher notice). */
static int check_silence(lua_State *L, MMap *m) {
  uint64_t now = parmap_now_ns();
  int k;
  if (now - C.last_check < 100000000ull) return 0; /* every 0.1 s */
  C.last_check = now;
  for (k = 1; k < C.size; k++) {
    double quiet = (double)(now - C.ag[k].seen_ns);
    if (C.ag[k].dead || !C.ag[k].hb || m->as[k].open <= 0 || quiet <= m->bound)
      continue;
    if (m->resilient) {
      agent_died(L, m, k);
      return 1;
    }
    fprintf(stderr, "parmap-mpi: rank %d on %s sent nothing for %.0f s (its "
            "host is down, cut off or stopped?): the job ends (the bound: "
            "PARMAP_MPI_DEAD_AFTER=%g s%s; resilient = true goes on without "
            "it)\n", k, C.ag[k].host, quiet / 1e9, C.dead_after / 1e9,
            m->bound < C.dead_after ? ", here the map's timeout + 3 s" : "");
    fflush(NULL);
    MPI_Abort(MPI_COMM_WORLD, 1);
    _exit(1);
  }
  return 0;
}

/* Wait for one message from any agent and handle it (or for the silence
   that loses an agent). Polls, then sleeps 10 us doubling to 0.2 ms:
   MPI_Probe would spin a core the workers need. */
static void wait_one(lua_State *L, MMap *m) {
  parmap_buf b = PARMAP_BUF_INIT;
  int tag, from, r, spins = 0;
  long delay = 10000;
  for (;;) {
    mpi_poll(&C.out);
    r = mpi_recv(MPI_ANY_SOURCE, 0, &b, &tag, &from);
    if (r != 0) break;
    /* silence is judged only with nothing left to receive (a loop body
       that took long has heartbeats queued), on a clock of its own (a
       streaming agent, whose messages return here, must not hide a
       silent one) */
    if (m != NULL && !m->closed && check_silence(L, m)) return;
    if (++spins > 64) {
      struct timespec ts;
      ts.tv_sec = 0;
      ts.tv_nsec = delay;
      nanosleep(&ts, NULL);
      if (delay < 200000) delay *= 2;
    }
  }
  if (r < 0) {
    parmap_buf_free(&b);
    nomem(L);
  }
  if (from >= 1 && from < C.size) {
    C.ag[from].seen_ns = parmap_now_ns();
    if (C.ag[from].dead) { /* given up: what it still says is dropped */
      parmap_buf_free(&b);
      return;
    }
  }
  /* handle() may raise: the message's memory goes first into a string */
  lua_pushlstring(L, b.p, b.len);
  parmap_buf_free(&b);
  {
    parmap_buf view;
    size_t n;
    view.p = (char *)lua_tolstring(L, -1, &n);
    view.len = view.cap = n;
    view.mapped = 0;
    handle(L, m, &view, lua_gettop(L), tag, from);
  }
  lua_pop(L, 1);
}

/* Resilient maps: agent r is silent past C.dead_after. Its unanswered
   segments go, after the map's MAP message again, to a live agent as one
   more round (MAP, SEGs, END: its engine runs it after its current one);
   r's later messages are dropped, and r gets no QUIT. */
static void agent_died(lua_State *L, MMap *m, int r) {
  PerAgent *a = &m->as[r];
  int s, i, top = lua_gettop(L);
  C.ag[r].dead = 1;
  C.lost = 1;
  m->nowed -= a->owed; /* what it asked for is not sent */
  a->owed = 0;
  a->open = 0;
  a->done = a->ended = 1;
  for (s = 1; s < C.size; s++)
    if (!C.ag[s].dead) break;
  fprintf(stderr, "parmap-mpi: rank %d on %s sent nothing for %.0f s: given "
          "up, %d of its segments go to rank %d\n", r, C.ag[r].host,
          m->bound / 1e9, a->nsent, s < C.size ? s : -1);
  if (s >= C.size) luaL_error(L, "parmap: every agent is gone (the last: rank %d on %s)", r, C.ag[r].host);
  if (a->nsent > 0) {
    parmap_buf b = PARMAP_BUF_INIT;
    size_t n;
    const char *p;
    /* s still takes segments (no END yet): they join its current round.
       A new round's MAP there would end that round's input early, and
       the segments still coming for it would land after the round's END
       and be dropped: items lost, the map waiting for ever */
    int round = m->as[s].ended;
    if (round) {
      lua_getiuservalue(L, 1, M_MAPMSG);
      p = lua_tolstring(L, -1, &n);
      if (parmap_buf_reserve(&b, n)) nomem(L);
      memcpy(b.p, p, n);
      b.len = n;
      numbering(m, &b, s);
      if (mpi_send(&C.out, &b, s, TAG_MAP)) nomem(L);
    }
    lua_getiuservalue(L, 1, M_SEGS);
    for (i = 0; i < a->nsent; i++) {
      int seg;
      lua_rawgeti(L, -1, a->sent[i].id);
      seg = lua_gettop(L);
      remember(L, m, s, seg);
      p = lua_tolstring(L, seg, &n);
      if (parmap_buf_reserve(&b, n)) nomem(L);
      memcpy(b.p, p, n);
      b.len = n;
      if (mpi_send(&C.out, &b, s, TAG_SEG)) nomem(L);
      lua_pushnil(L);
      lua_rawseti(L, seg - 1, a->sent[i].id);
      lua_pop(L, 1);
    }
    if (round) {
      if (mpi_send_hdr(&C.out, s, TAG_END, m->id, 0)) nomem(L);
      m->as[s].open++;
      m->as[s].done = 0;
    }
    a->nsent = 0;
  }
  lua_settop(L, top);
}

/* ------------------------------------------------------------ the map */

static void stop(lua_State *L, MMap *m) {
  int r;
  if (m->closed) return;
  m->closed = 1;
  C.nopen--;
  if (m->jr) parmap_journal_close(m->jr);
  if (m->finished || C.quit) return;
  /* no wait for the agents' DONE: an agent sees ABORT only between two
     results, which may be long; what they still send for this map is
     dropped, and the next map's messages queue behind */
  for (r = 1; r < C.size; r++)
    if (!C.ag[r].dead && mpi_send_hdr(&C.out, r, TAG_ABORT, m->id, 0)) nomem(L);
}

static int map_close(lua_State *L) {
  MMap *m = (MMap *)luaL_checkudata(L, 1, MAP_META);
  stop(L, m);
  return 0;
}

static int map_gc(lua_State *L) {
  MMap *m = (MMap *)luaL_checkudata(L, 1, MAP_META);
  if (!m->closed && !C.quit) stop(L, m);
  parmap_buf_free(&m->seg);
  parmap_buf_free(&m->jb);
  if (m->as != NULL) {
    int r;
    for (r = 0; r < C.size; r++) free(m->as[r].sent);
  }
  free(m->as);
  free(m->ring);
  free(m->fifo);
  free(m->mref);
  free((void *)m->mptr);
  m->mptr = NULL;
  m->as = NULL;
  m->ring = NULL;
  m->fifo = NULL;
  m->mref = NULL;
  return 0;
}

static void call_progress(lua_State *L, MMap *m, int finished) {
  if (!m->has_progress) return;
  if (lua_getiuservalue(L, 1, M_PROGRESS) == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  lua_pushinteger(L, m->emitted);
  if (m->total >= 0) lua_pushinteger(L, m->total);
  else lua_pushnil(L);
  lua_pushboolean(L, finished);
  lua_call(L, 3, 0);
}

/* The loop took the result in sl. */
static void consumed(MMap *m, struct Slot *sl) {
  sl->rank = -1;
  while (m->lo <= m->pulled && m->rcap > 0 && slot(m, m->lo)->rank == -1) {
    slot(m, m->lo)->rank = 0;
    m->lo++;
  }
  m->emitted++;
}

/* Push item g's results (the map at 1); returns the count with g first. */
static int emit(lua_State *L, MMap *m, lua_Integer g) {
  size_t len, pos = 0;
  const char *s, *err = NULL;
  int rank, n, base, last;
  struct Slot *sl = slot(m, g);
  uint32_t k = sl->msg;
  rank = sl->rank;
  s = m->mptr[k] + sl->off;
  len = sl->len;
  last = --m->mref[k] == 0;
  if (last) { /* the batch string stays on the stack while it is read */
    lua_getiuservalue(L, 1, M_PENDING);
    lua_rawgeti(L, -1, k);
    lua_pushnil(L);
    lua_rawseti(L, -3, k);
    lua_remove(L, -2);
  }
  consumed(m, sl);
  base = lua_gettop(L); /* the batch string, or just below what is pushed */
  if (s[pos] == REC_OK) {
    pos++;
    lua_pushinteger(L, g);
    if ((n = parmap_decode_scalar(L, s, len, &pos)) == 0) {
      lua_getiuservalue(L, 1, M_SCRATCH);
      n = parmap_decode(L, s, len, &pos, base + 2, &err);
      if (n < 0)
        luaL_error(L, "parmap: bad result of item %d (%s)", (int)g, err);
      lua_remove(L, base + 2);
    }
    if (last) lua_remove(L, base);
    call_progress(L, m, 0); /* when s is read: it may take more results */
    return n + 1;
  }
  pos++;
  lua_getiuservalue(L, 1, M_SCRATCH); /* base + 1 */
  lua_getiuservalue(L, 1, M_POLICY); /* base + 2 */
  lua_pushinteger(L, g);
  n = parmap_decode(L, s, len, &pos, base + 1, &err);
  if (n != 5 && n != 6 && n != 9)
    luaL_error(L, "parmap: bad error of item %d", (int)g);
  if (n == 5) lua_pushnil(L); /* attempts: 1 */
  call_progress(L, m, 0);
  if (rank == LOCAL) rank = 0; /* it failed here, on rank 0 */
  lua_createtable(L, 0, 4); /* where it failed */
  lua_pushstring(L, C.ag[rank].host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, rank);
  lua_setfield(L, -2, "rank");
  if (n == 9) { /* ..., attempts, nil worker, signal, oom: a died worker */
    lua_pushvalue(L, base + 11);
    lua_setfield(L, -2, "signal");
    lua_pushvalue(L, base + 12);
    lua_setfield(L, -2, "oom");
    lua_replace(L, base + 10);
    lua_settop(L, base + 10);
  }
  /* the one error policy (lua/parmap/errors.lua) decides; when it raises,
     the map is stopped first */
  /* fail(index, kind, err, message, tb, pid, attempts, {host, rank}) */
  if (lua_pcall(L, 8, 1, 0) != LUA_OK) {
    stop(L, m);
    return lua_error(L);
  }
  lua_pushinteger(L, g);
  lua_insert(L, -2);
  lua_remove(L, base + 1);
  if (last) lua_remove(L, base);
  return 2;
}

/* The map at idx: called once per item, so a size-and-magic test instead
   of luaL_checkudata's registry lookup. */
static MMap *checkmap(lua_State *L, int idx) {
  MMap *m = (MMap *)lua_touserdata(L, idx);
  if (m == NULL || lua_rawlen(L, idx) != sizeof(MMap) || m->magic != MMAP_MAGIC)
    luaL_typeerror(L, idx, MAP_META);
  return m;
}

/* The map could not run on agent m->failrank (its TAG_FAIL in M_FAIL):
   an error object (a worker's init raised) goes to the policy with host
   and rank, as the fork engine's does, which raises it at the caller's
   line; a message is raised naming the rank. The map stops first. */
static int agent_failed(lua_State *L, MMap *m) {
  size_t len, pos = 1;
  const char *s, *err = NULL;
  int r = m->failrank, base;
  stop(L, m);
  lua_getiuservalue(L, 1, M_FAIL);
  s = lua_tolstring(L, -1, &len);
  if (len < 1 || s[0] != FAIL_ERROR)
    return luaL_error(L, "parmap: the map failed on rank %d (%s): %s", r,
                      C.ag[r].host, len > 0 ? s + 1 : "");
  base = lua_gettop(L);
  lua_getiuservalue(L, 1, M_SCRATCH); /* base + 1 */
  lua_getiuservalue(L, 1, M_POLICY);  /* base + 2 */
  lua_pushnil(L);                     /* no item */
  if (parmap_decode(L, s, len, &pos, base + 1, &err) != 7 ||
      lua_type(L, base + 4) != LUA_TSTRING)
    return luaL_error(L, "parmap: the map failed on rank %d (%s): a bad "
                      "error record", r, C.ag[r].host);
  lua_createtable(L, 0, 3); /* where it failed */
  lua_rotate(L, -2, 1);     /* worker (the 7th value) on top */
  lua_setfield(L, -2, "worker");
  lua_pushstring(L, C.ag[r].host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, r);
  lua_setfield(L, -2, "rank");
  /* fail(nil, kind, err, message, tb, pid, attempts, {worker, host, rank}) */
  lua_call(L, 8, 1);
  return lua_error(L); /* the policy returned it (exception = "return") */
}

/* The item the loop takes next when its result is here, else 0;
   pass_ready moves past it. */
static lua_Integer ready(MMap *m) {
  if (m->ordered)
    return m->rcap > 0 && (size_t)(m->want - m->lo) < m->rcap &&
                   slot(m, m->want)->rank > 0
               ? m->want
               : 0;
  return m->fhead < m->ftail ? m->fifo[m->fhead] : 0;
}
static void pass_ready(MMap *m) {
  if (m->ordered) m->want++;
  else m->fhead++;
}

/* Every item is delivered: wait for every live agent's DONE, i.e. for its
   engine's end, its workers' finish included (bounded there by
   finish_timeout), as the fork engine waits for its workers' before the
   loop ends. The owed CREDITs get their END here. */
static void wait_done(lua_State *L, MMap *m) {
  for (;;) {
    int r, all = 1;
    if (m->nowed > 0) pay_owed(L, m);
    for (r = 1; r < C.size; r++)
      if (!C.ag[r].dead && !m->as[r].done) all = 0;
    if (all || m->failrank || m->closed) return;
    wait_one(L, m);
  }
}

/* The next item (the map at 1): pushes its index and values and returns
   their count, or 0 when the map is over (then the items iterator's
   error, if it raised, is raised). */
static int advance(lua_State *L, MMap *m) {
  for (;;) {
    lua_Integer g;
    if (m->closed) return 0; /* closed from a callback: the loop ends */
    if (m->failrank) return agent_failed(L, m);
    if (m->nowed > 0) pay_owed(L, m);
    if ((g = ready(m)) > 0) {
      pass_ready(m);
      /* a send larger than the transport's eager limit (a segment over
         TCP) completes only while this rank calls MPI: the agent waits
         in its receive meanwhile, so a long run of ready results polls */
      if (C.out.n > 0 && (m->emitted & 255) == 0) mpi_poll(&C.out);
      return emit(L, m, g);
    }
    if (m->exhausted && m->emitted == m->pulled) {
      wait_done(L, m);
      if (m->ierr) { /* every item pulled is delivered: now the error */
        stop(L, m);
        lua_getiuservalue(L, 1, M_IERR);
        return lua_error(L);
      }
      /* the journal learns (or checks) the count */
      if (m->jr) parmap_journal_end(L, m->jr, m->pulled);
      m->finished = 1;
      stop(L, m);
      call_progress(L, m, 1);
      return 0;
    }
    wait_one(L, m);
  }
}

static int next_body(lua_State *L) {
  return advance(L, (MMap *)lua_touserdata(L, 1));
}

/* collect's loop (map, t): t[i] = the first value of item i; returns t
   and the highest index. */
#define HOOK_EVERY 1024
static int collect_body(lua_State *L) {
  MMap *m = (MMap *)lua_touserdata(L, 1);
  lua_Integer top = 0;
  unsigned k = 0;
  for (;;) {
    lua_Integer i;
    int n;
    lua_settop(L, 2);
    if (++k % HOOK_EVERY == 0) parmap_run_hooks(L); /* Ctrl-C gets in */
    if ((n = advance(L, m)) == 0) break;
    i = lua_tointeger(L, -n);
    if (n > 1) {
      lua_settop(L, lua_gettop(L) - n + 2);
      lua_rawseti(L, 2, i);
    }
    if (i > top) top = i;
  }
  lua_settop(L, 2);
  lua_pushinteger(L, top);
  return 2;
}

/* Run body on the map at 1 (nargs arguments from there) as one protected
   step, the map busy: a callback (progress, the items iterator, the error
   policy), a finalizer or a hook that steps the map again gets an error,
   and an error stops the map before it goes on up (as the fork engine's
   step does). */
static int step(lua_State *L, MMap *m, lua_CFunction body, int nargs) {
  int status, top;
  if (m->busy)
    return luaL_error(L, "parmap: map is busy (stepped from inside its own "
                         "step: a progress callback, the items iterator, a "
                         "finalizer or a hook)");
  top = lua_gettop(L) - nargs;
  lua_pushcfunction(L, body);
  lua_rotate(L, top + 1, 1);
  m->busy = 1;
  status = lua_pcall(L, nargs, LUA_MULTRET, 0);
  m->busy = 0;
  if (status != LUA_OK) {
    stop(L, m);
    return lua_error(L);
  }
  return lua_gettop(L) - top;
}

/* next(map). The most common result, a number (or boolean, nil) whose
   batch holds more, is taken without a protected call: decoding it
   allocates nothing, so no user code (a finalizer) can run meanwhile. */
static int map_next(lua_State *L) {
  MMap *m = checkmap(L, 1);
  lua_settop(L, 1);
  if (!m->busy && !m->closed && !m->has_progress && !m->failrank &&
      !m->nowed) {
    lua_Integer g = ready(m);
    if (g > 0) {
      struct Slot *sl = slot(m, g);
      const char *p = m->mptr[sl->msg] + sl->off;
      size_t pos = 1;
      if (m->mref[sl->msg] > 1 && p[0] == REC_OK) {
        lua_pushinteger(L, g);
        if (parmap_decode_plain(L, p, sl->len, &pos)) {
          m->mref[sl->msg]--;
          consumed(m, sl);
          pass_ready(m);
          return 2;
        }
        lua_pop(L, 1);
      }
    }
  }
  return step(L, m, next_body, 1);
}

/* collect(map) -> t, n: t[i] = the first value of item i, n the highest
   index; parmap.map without a Lua loop per item. */
static int map_collect(lua_State *L) {
  MMap *m = checkmap(L, 1);
  lua_settop(L, 1);
  lua_createtable(L, m->total > 0 && m->total < (1 << 26) ? (int)m->total : 0,
                  0);
  return step(L, m, collect_body, 2);
}

/* Two segments to every agent, protected (mpi_start). */
static int first_segments(lua_State *L) {
  MMap *m = (MMap *)lua_touserdata(L, 1);
  int r;
  for (r = 1; r < C.size; r++) {
    send_segment(L, m, r);
    send_segment(L, m, r);
  }
  return 0;
}

/* start(spec, fnrecord, agent_opts) -> map: spec as lua/parmap.lua's check
   makes it; agent_opts what the agents' engines get. nil and the type
   found when agent_opts (args, kwargs) holds a value that cannot travel. */
static int mpi_start(lua_State *L) {
  MMap *m;
  parmap_buf msg = PARMAP_BUF_INIT;
  size_t fnlen;
  const char *fnrec = luaL_checklstring(L, 2, &fnlen), *what = NULL;
  int r, rc;
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (C.size < 2) return luaL_error(L, "parmap: backend 'mpi' needs 2 ranks or more");
  for (r = 1; r < C.size && C.ag[r].dead; r++) {}
  if (r >= C.size) return luaL_error(L, "parmap: backend 'mpi': every agent is gone");
  if (C.nopen > 0)
    return luaL_error(L, "parmap: backend 'mpi' runs one map at a time "
                      "(close the other map first)");
  lua_settop(L, 3);
  for (;;) { /* what is left of earlier maps, and heartbeats: dropped */
    parmap_buf b = PARMAP_BUF_INIT;
    int tag, from, got = mpi_recv(MPI_ANY_SOURCE, 0, &b, &tag, &from);
    parmap_buf_free(&b);
    if (got <= 0) break;
  }
  m = (MMap *)lua_newuserdatauv(L, sizeof *m, M_NUV); /* 4 */
  memset(m, 0, sizeof *m);
  m->magic = MMAP_MAGIC;
  m->closed = 1; /* until started */
  luaL_setmetatable(L, MAP_META);
  m->as = (PerAgent *)calloc((size_t)C.size, sizeof *m->as);
  if (m->as == NULL) nomem(L);
  m->id = ++C.nextmap;
  lua_getfield(L, 1, "items");
  lua_setiuservalue(L, 4, M_ITEMS);
  lua_getfield(L, 1, "journal");
  m->jr = parmap_journal_check(L, -1);
  lua_setiuservalue(L, 4, M_JOURNAL);
  lua_newtable(L);
  lua_setiuservalue(L, 4, M_PENDING);
  parmap_pushfield(L, 1, "fail", LUA_TFUNCTION, 0);
  lua_setiuservalue(L, 4, M_POLICY);
  lua_newtable(L);
  lua_setiuservalue(L, 4, M_SCRATCH);
  m->has_progress = lua_getfield(L, 1, "progress") != LUA_TNIL;
  lua_setiuservalue(L, 4, M_PROGRESS);
  lua_getfield(L, 1, "describe");
  lua_setiuservalue(L, 4, M_DESC);
  lua_newtable(L);
  lua_setiuservalue(L, 4, M_SEGS);
  lua_getfield(L, 1, "resilient");
  m->resilient = lua_toboolean(L, -1);
  m->from_table = parmap_boolfield(L, 1, "from_table", 0);
  lua_getfield(L, 1, "total");
  m->total = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : -1; /* an
    iterator's given total: for progress and segment sizes, as the fork
    engine's; the iterator's nil still ends the input */
  m->ordered = parmap_boolfield(L, 1, "ordered", 1);
  /* with a timeout, an agent's owed work is bounded by it as a worker's
     is: heartbeats come every second, so silence past timeout + 3 s is a
     stopped or lost host, not a slow item */
  m->bound = C.dead_after;
  lua_getfield(L, 3, "timeout");
  if (lua_isnumber(L, -1) && lua_tonumber(L, -1) > 0 &&
      (lua_tonumber(L, -1) + 3) * 1e9 < m->bound)
    m->bound = (lua_tonumber(L, -1) + 3) * 1e9;
  if (parmap_boolfield(L, 3, "box", 0)) {
    parmap_read_call(L, 1, &m->cs);
    m->shapecheck = m->cs.star == STAR_TRUE || m->cs.kwstar;
    m->cs.nargs = m->cs.has_kw = 0; /* only the item's shape is looked at */
  }
  lua_getfield(L, 3, "retries");
  m->retries = lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0
                   ? (int)lua_tointeger(L, -1) : 0;
  lua_getfield(L, 3, "N");
  {
    lua_Integer n = lua_tointeger(L, -1); /* 0: each agent's CPUs */
    m->nw = n > PARMAP_MAX_WORKERS ? PARMAP_MAX_WORKERS : n > 0 ? (int)n : 0;
  }
  for (r = 1; r < C.size; r++) /* worker numbers, unique in the job */
    if (!C.ag[r].dead) {
      int n = m->nw > 0 ? m->nw : C.ag[r].share;
      static int warned = 0;
      if (m->nw > C.ag[r].ncpu && !warned) { /* once a job */
        warned = 1;
        fprintf(stderr, "parmap-mpi: warning: N = %d workers on each agent, "
                "but rank %d on %s has %d CPUs (N counts each agent's "
                "workers; without N each agent starts its own CPUs' worth)\n",
                m->nw, r, C.ag[r].host, C.ag[r].ncpu);
      }
      m->as[r].wbase = m->wtotal;
      m->wtotal += n < 1 ? 1 : n > PARMAP_MAX_WORKERS ? PARMAP_MAX_WORKERS : n;
    }
  /* the fork engine's read-ahead bound; by default its own for the job's
     workers, but room for 4 full segments an agent (less halved the rate
     of tiny items from an iterator: the agents starved) */
  lua_getfield(L, 1, "buffersize");
  if (lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0) {
    m->buffersize = lua_tointeger(L, -1);
  } else {
    lua_Integer live = 0;
    for (r = 1; r < C.size; r++) live += !C.ag[r].dead;
    m->buffersize = (lua_Integer)BUFFER_PER_WORKER * (m->wtotal > 0 ? m->wtotal : 1);
    if (m->buffersize < 4 * SEG_MAX * live) m->buffersize = 4 * SEG_MAX * live;
  }
  if (m->from_table) m->buffersize = 0;
  lua_settop(L, 4);
  m->want = 1;
  m->lo = 1;
  m->t0 = parmap_now_ns();
  if (m->from_table && m->total == 0) m->exhausted = 1;

  /* the map message: fn's record, then the agents' options */
  if (mpi_begin(&msg, m->id, 0, 0, 0) || parmap_put_varint(&msg, fnlen) ||
      parmap_buf_reserve(&msg, fnlen)) {
    parmap_buf_free(&msg);
    nomem(L);
  }
  memcpy(msg.p + msg.len, fnrec, fnlen);
  msg.len += fnlen;
  lua_newtable(L); /* 5: scratch */
  rc = parmap_encode(L, 3, 1, &msg, 5, &what);
  lua_pop(L, 1);
  if (rc != PARMAP_OK) { /* the caller finds the value's place, names it */
    parmap_buf_free(&msg);
    lua_pushnil(L);
    lua_pushstring(L, what);
    return 2;
  }
  lua_pushlstring(L, msg.p, msg.len); /* for a round after a death */
  lua_setiuservalue(L, 4, M_MAPMSG);
  m->closed = 0;
  C.nopen++;
  for (r = 1; r < C.size; r++) {
    parmap_buf copy = PARMAP_BUF_INIT;
    if (C.ag[r].dead) {
      m->as[r].done = m->as[r].ended = 1;
      continue;
    }
    m->as[r].open = 1;
    C.ag[r].seen_ns = parmap_now_ns(); /* its silence counts from here */
    if (parmap_buf_reserve(&copy, msg.len)) {
      parmap_buf_free(&msg);
      nomem(L);
    }
    memcpy(copy.p, msg.p, msg.len);
    copy.len = msg.len;
    numbering(m, &copy, r);
    if (mpi_send(&C.out, &copy, r, TAG_MAP)) {
      parmap_buf_free(&copy);
      parmap_buf_free(&msg);
      nomem(L);
    }
  }
  parmap_buf_free(&msg);
  lua_replace(L, 1); /* the map at index 1, as send_segment expects */
  lua_settop(L, 1);
  lua_pushcfunction(L, first_segments);
  lua_pushvalue(L, 1);
  m->busy = 1;
  rc = lua_pcall(L, 1, 0, 0);
  m->busy = 0;
  if (rc != LUA_OK) { /* nothing holds the map yet: it stops here */
    stop(L, m);
    return lua_error(L);
  }
  return 1;
}

static int mpi_size(lua_State *L) {
  lua_pushinteger(L, C.size);
  return 1;
}

/* hosts() -> {[rank] = {host = ..., ncpu = ...}} for the agents */
static int mpi_hosts(lua_State *L) {
  int r;
  lua_createtable(L, C.size, 0);
  for (r = 1; r < C.size; r++) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, C.ag[r].host);
    lua_setfield(L, -2, "host");
    lua_pushinteger(L, C.ag[r].ncpu);
    lua_setfield(L, -2, "ncpu");
    lua_rawseti(L, -2, r);
  }
  return 1;
}

static int mpi_busy(lua_State *L) {
  lua_pushboolean(L, C.nopen > 0);
  return 1;
}

int parmap_mpi_coord_open(lua_State *L) {
  static const luaL_Reg funcs[] = {{"start", mpi_start},
                                   {"next", map_next},
                                   {"collect", map_collect},
                                   {"size", mpi_size},
                                   {"hosts", mpi_hosts},
                                   {"busy", mpi_busy},
                                   {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__close", map_close},
                                  {"__gc", map_gc},
                                  {NULL, NULL}};
  if (luaL_newmetatable(L, MAP_META)) {
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    lua_pushcfunction(L, map_close);
    lua_setfield(L, -2, "close");
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}

void parmap_mpi_coord_init(int size) {
  int i;
  const char *e = getenv("PARMAP_MPI_DEAD_AFTER");
  C.size = size;
  C.dead_after = (e && atof(e) > 0 ? atof(e) : 10.0) * 1e9;
  C.ag = (AgentInfo *)calloc((size_t)size, sizeof *C.ag);
  if (C.ag == NULL) {
    fprintf(stderr, "parmap-mpi: out of memory\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (gethostname(C.ag[0].host, sizeof C.ag[0].host - 1) != 0)
    strcpy(C.ag[0].host, "?");
  { /* parmap's own settings reach the agents without mpirun -x */
    extern char **environ;
    parmap_buf env = PARMAP_BUF_INIT;
    char **v;
    int bad = mpi_begin(&env, 0, 0, 0, 0);
    for (v = environ; !bad && *v != NULL; v++)
      if (strncmp(*v, "PARMAP_", 7) == 0 && strncmp(*v, "PARMAP_MPI=", 11) != 0) {
        size_t n = strlen(*v) + 1;
        bad = parmap_buf_reserve(&env, n);
        if (!bad) {
          memcpy(env.p + env.len, *v, n);
          env.len += n;
        }
      }
    for (i = 1; !bad && i < size; i++) {
      parmap_buf copy = PARMAP_BUF_INIT;
      bad = parmap_buf_reserve(&copy, env.len);
      if (!bad) {
        memcpy(copy.p, env.p, env.len);
        copy.len = env.len;
        bad = mpi_send(&C.out, &copy, i, TAG_ENV);
      }
      parmap_buf_free(&copy);
    }
    parmap_buf_free(&env);
    if (bad) {
      fprintf(stderr, "parmap-mpi: out of memory\n");
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  }
  for (i = 1; i < size; i++) {
    parmap_buf b = PARMAP_BUF_INIT;
    int tag, from;
    size_t n;
    if (mpi_recv(MPI_ANY_SOURCE, 1, &b, &tag, &from) == 1 && tag == TAG_HB) {
      parmap_buf_free(&b);
      i--; /* a heartbeat before another agent's HELLO */
      continue;
    }
    if (tag != TAG_HELLO || from < 1 || from >= size) {
      fprintf(stderr, "parmap-mpi: unexpected message at start\n");
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    C.ag[from].ncpu = (int)mpi_hdr(&b).a;
    C.ag[from].hb = mpi_hdr(&b).b != 0;
    n = b.len - sizeof(MsgHdr);
    if (n >= sizeof C.ag[from].host) n = sizeof C.ag[from].host - 1;
    memcpy(C.ag[from].host, b.p + sizeof(MsgHdr), n);
    C.ag[from].host[n] = '\0';
    parmap_buf_free(&b);
  }
  /* agents that share a host share its CPUs (each sees them all) */
  for (i = 1; i < size; i++) {
    int k, same = 0;
    for (k = 1; k < size; k++) same += strcmp(C.ag[k].host, C.ag[i].host) == 0;
    C.ag[i].share = C.ag[i].ncpu / (same > 0 ? same : 1);
    if (C.ag[i].share < 1) C.ag[i].share = 1;
  }
}

void parmap_mpi_coord_quit(void) {
  int r;
  uint64_t t0;
  if (C.quit) return;
  C.quit = 1;
  /* leaving with a map open (os.exit, the end of the script): its items
     stop on the agents as on a break, rather than run to their end */
  if (C.nopen > 0)
    for (r = 1; r < C.size; r++)
      if (!C.ag[r].dead) mpi_send_hdr(&C.out, r, TAG_ABORT, C.nextmap, 0);
  for (r = 1; r < C.size; r++)
    if (!C.ag[r].dead) /* a = 1: a rank is lost, do not MPI_Finalize */
      mpi_send_hdr(&C.out, r, TAG_QUIT, 0, C.lost);
  /* every message still coming (the DONE of a last map) is received:
     MPI_Finalize with unreceived messages makes some transports warn. An
     agent silent past the bound (heartbeats come until its BYE) is lost */
  t0 = parmap_now_ns();
  for (r = 1; r < C.size; r++) {
    if (C.ag[r].dead) C.ag[r].seen_ns = 1; /* counted as gone */
    else C.ag[r].seen_ns = t0;
  }
  for (;;) {
    parmap_buf b = PARMAP_BUF_INIT;
    int tag, from, k, left = 0, got;
    uint64_t now = parmap_now_ns();
    for (k = 1; k < C.size; k++) {
      if (C.ag[k].dead || C.ag[k].seen_ns == 1) continue;
      if (C.ag[k].hb && (double)(now - C.ag[k].seen_ns) > C.dead_after) {
        fprintf(stderr, "parmap-mpi: rank %d on %s sent nothing for %.0f s "
                "(PARMAP_MPI_DEAD_AFTER) at the end of the job: given up\n",
                k, C.ag[k].host, C.dead_after / 1e9);
        C.ag[k].dead = 1;
        C.lost = 1;
        continue;
      }
      left++;
    }
    if (left == 0) break;
    got = mpi_recv(MPI_ANY_SOURCE, 0, &b, &tag, &from);
    if (got < 0) break;
    if (got == 0) {
      struct timespec ts = {0, 200000};
      nanosleep(&ts, NULL);
    } else if (from >= 1 && from < C.size && C.ag[from].seen_ns != 1) {
      C.ag[from].seen_ns = tag == TAG_BYE ? 1 : parmap_now_ns();
    }
    parmap_buf_free(&b);
    mpi_poll(&C.out);
  }
  if (C.lost) { /* a send to a lost rank may never complete */
    mpi_poll(&C.out);
    return;
  }
  mpi_drain(&C.out);
}

int parmap_mpi_coord_lost(void) { return C.lost; }
