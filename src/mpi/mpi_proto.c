/*
** mpi_proto.c: the message layer of the MPI backend (see parmap_mpi.h).
*/
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <time.h>
#include <string.h>

#include "parmap_mpi.h"

int mpi_begin(parmap_buf *b, uint32_t mapid, uint32_t count, int64_t a,
              int64_t b2) {
  MsgHdr h;
  b->len = 0;
  if (parmap_buf_reserve(b, sizeof h)) return -1;
  h.mapid = mapid;
  h.count = count;
  h.a = a;
  h.b = b2;
  memcpy(b->p, &h, sizeof h);
  b->len = sizeof h;
  return 0;
}

MsgHdr mpi_hdr(const parmap_buf *b) {
  MsgHdr h;
  memset(&h, 0, sizeof h);
  if (b->len >= sizeof h) memcpy(&h, b->p, sizeof h);
  return h;
}

/* The largest message sent whole: 1 GiB, or PARMAP_MPI_MAXMSG (tests). */
static size_t max_msg(void) {
  static size_t m = 0;
  if (m == 0) {
    const char *e = getenv("PARMAP_MPI_MAXMSG");
    unsigned long long v = e ? strtoull(e, NULL, 10) : 0;
    m = (v >= 64 && v <= ((size_t)1 << 30)) ? (size_t)v : (size_t)1 << 30;
  }
  return m;
}

static int post(Outbox *o, Shared *sh, const char *p, size_t n, int dest,
                int tag) {
  struct Pending *q;
  if (o->n == o->cap) {
    int cap = o->cap ? 2 * o->cap : 16;
    void *v = realloc(o->v, (size_t)cap * sizeof *o->v);
    if (v == NULL) return -1;
    o->v = (struct Pending *)v;
    o->cap = cap;
  }
  q = &o->v[o->n];
  if (MPI_Isend((void *)p, (int)n, MPI_BYTE, dest, tag, MPI_COMM_WORLD,
                &q->req) != MPI_SUCCESS)
    return -1;
  q->sh = sh;
  sh->refs++;
  o->n++;
  return 0;
}

static void unref(Shared *sh) {
  if (--sh->refs == 0) {
    parmap_buf_free(&sh->buf);
    free(sh);
  }
}

int mpi_send(Outbox *o, parmap_buf *b, int dest, int tag) {
  size_t max = max_msg(), off;
  Shared *sh = (Shared *)calloc(1, sizeof *sh);
  int rc = 0;
  if (sh == NULL) return -1;
  sh->buf = *b;
  sh->refs = 1; /* ours, until every part is posted */
  memset(b, 0, sizeof *b);
  if (sh->buf.len <= max) {
    rc = post(o, sh, sh->buf.p, sh->buf.len, dest, tag);
  } else {
    parmap_buf h = PARMAP_BUF_INIT;
    if (mpi_begin(&h, 0, (uint32_t)tag, (int64_t)sh->buf.len, 0) ||
        mpi_send(o, &h, dest, TAG_BIG)) {
      parmap_buf_free(&h);
      rc = -1;
    }
    for (off = 0; rc == 0 && off < sh->buf.len; off += max) {
      size_t n = sh->buf.len - off < max ? sh->buf.len - off : max;
      rc = post(o, sh, sh->buf.p + off, n, dest, TAG_PART);
    }
  }
  if (rc && sh->refs == 1) { /* nothing posted: the caller keeps b */
    *b = sh->buf;
    free(sh);
    return -1;
  }
  unref(sh);
  return rc;
}

int mpi_send_hdr(Outbox *o, int dest, int tag, uint32_t mapid, int64_t a) {
  parmap_buf b = PARMAP_BUF_INIT;
  if (mpi_begin(&b, mapid, 0, a, 0) || mpi_send(o, &b, dest, tag)) {
    parmap_buf_free(&b);
    return -1;
  }
  return 0;
}

void mpi_poll(Outbox *o) {
  int i = 0;
  while (i < o->n) {
    int done = 0;
    MPI_Test(&o->v[i].req, &done, MPI_STATUS_IGNORE);
    if (done) {
      unref(o->v[i].sh);
      o->v[i] = o->v[--o->n];
    } else {
      i++;
    }
  }
}

void mpi_drain(Outbox *o) {
  int i;
  for (i = 0; i < o->n; i++) {
    MPI_Wait(&o->v[i].req, MPI_STATUS_IGNORE);
    unref(o->v[i].sh);
  }
  o->n = 0;
  free(o->v);
  o->v = NULL;
  o->cap = 0;
}

/* The one receive still arriving (from a single source: see mpi_recv). */
static struct {
  MPI_Request req;
  parmap_buf b;
  int active, tag, from;
} inflight = {MPI_REQUEST_NULL, PARMAP_BUF_INIT, 0, 0, 0};

/* The in-flight message into b once it has all arrived (or, with block,
   when it has): 1, else 0. */
static int inflight_done(int block, parmap_buf *b, int *tag, int *from) {
  int done = 0;
  long delay = 10000; /* ns, as mpi_recv's wait */
  for (;;) {
    MPI_Test(&inflight.req, &done, MPI_STATUS_IGNORE);
    if (done || !block) break;
    {
      struct timespec ts;
      ts.tv_sec = 0;
      ts.tv_nsec = delay;
      nanosleep(&ts, NULL);
      if (delay < 200000) delay *= 2;
    }
  }
  if (!done) return 0;
  inflight.active = 0;
  parmap_buf_free(b);
  *b = inflight.b;
  memset(&inflight.b, 0, sizeof inflight.b);
  *tag = inflight.tag;
  *from = inflight.from;
  return 1;
}

int mpi_recv(int src, int block, parmap_buf *b, int *tag, int *from) {
  MPI_Status st;
  int n = 0, flag = 0, spins = 0;
  long delay = 10000; /* ns */
  if (inflight.active) return inflight_done(block, b, tag, from);
  /* MPI_Probe spins on a CPU while it waits (Open MPI, MPICH): rank 0
     shares its node with an agent's workers, and an agent with its own, so
     a wait here polls, then sleeps, 10 us doubling up to 0.2 ms */
  for (;;) {
    MPI_Iprobe(src, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, &st);
    if (flag || !block) break;
    if (++spins > 64) {
      struct timespec ts;
      ts.tv_sec = 0;
      ts.tv_nsec = delay;
      nanosleep(&ts, NULL); /* EINTR: just polls again */
      if (delay < 200000) delay *= 2;
    }
  }
  if (!flag) return 0;
  MPI_Get_count(&st, MPI_BYTE, &n);
  if (!block && src != MPI_ANY_SOURCE && st.MPI_TAG != TAG_BIG) {
    /* from one source, matched in order: nothing overtakes it */
    inflight.b.len = 0;
    if (parmap_buf_reserve(&inflight.b, (size_t)n + 1)) return -1;
    if (MPI_Irecv(inflight.b.p, n, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG,
                  MPI_COMM_WORLD, &inflight.req) != MPI_SUCCESS)
      return -1;
    inflight.b.len = (size_t)n;
    inflight.tag = st.MPI_TAG;
    inflight.from = st.MPI_SOURCE;
    inflight.active = 1;
    return inflight_done(0, b, tag, from);
  }
  if (!flag) return 0;
  MPI_Get_count(&st, MPI_BYTE, &n);
  b->len = 0;
  if (parmap_buf_reserve(b, (size_t)n + 1)) return -1;
  MPI_Recv(b->p, n, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG, MPI_COMM_WORLD,
           MPI_STATUS_IGNORE);
  b->len = (size_t)n;
  *tag = st.MPI_TAG;
  *from = st.MPI_SOURCE;
  if (*tag == TAG_BIG) { /* the parts follow, in order, from the same rank */
    MsgHdr h = mpi_hdr(b);
    size_t total = (size_t)h.a, got = 0;
    *tag = (int)h.count;
    b->len = 0;
    if (parmap_buf_reserve(b, total + 1)) return -1;
    while (got < total) {
      MPI_Status ps;
      int k = 0;
      size_t room = total - got < 0x7fffffff ? total - got : 0x7fffffff;
      MPI_Recv(b->p + got, (int)room, MPI_BYTE, *from, TAG_PART,
               MPI_COMM_WORLD, &ps);
      MPI_Get_count(&ps, MPI_BYTE, &k);
      if (k <= 0) return -1;
      got += (size_t)k;
    }
    b->len = total;
  }
  return 1;
}
