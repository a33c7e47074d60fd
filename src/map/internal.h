/*
** map/internal.h: what the three rooms of a map share: its types, its
** limits, and the calls that cross from one room to another. Private to
** src/map.c, which compiles the rooms as one unit (so these static calls
** stay inlinable, as luv compiles src/luv.c).
*/
#ifndef PARMAP_MAP_INTERNAL_H
#define PARMAP_MAP_INTERNAL_H

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <lauxlib.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../child.h"
#include "../codec.h"
#include "../engine.h"
#include "../journal.h"
#include "../map.h"
#include "../proc.h"
#include "../range.h"
#include "../spec.h"

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
#define TERM_GRACE_NS 1000000000ull /* SIGTERM, then SIGKILL after this */
#define FINISH_TIMEOUT 30.0 /* default bound on a worker's finish (s) */
#define RELAYED (-1000)    /* emit: the record went to the sink */
#define SINK_STOP (-1001)  /* ... and the sink stops the map */
/* collect preallocates its result table up to this many slots (as the
   codec does, PARMAP_MAX_PREALLOC): a wrong total cannot make it take
   gigabytes before the first result */
#define COLLECT_PREALLOC PARMAP_MAX_PREALLOC

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
  uint64_t due; /* retry_delay: not handed out before (monotonic ns) */
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
  uint64_t born;      /* when it was forked (init_timeout) */
  int retiring;       /* let go (its socket half-closed): it runs finish;
                         its entry is its own until it is reaped */
  uint64_t retire_ns, term_ns; /* when it was let go; SIGTERMed (0: not) */
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

/* output = "lines" | "item" (output.c): worker entry wi's streams */
typedef struct OutPipe {
  int fd[2];        /* stdout, stderr: a pipe's read end (lines) or the
                       memfd the worker writes (item); -1: none */
  int ep[2];        /* fd[k] is in the event loop's epoll set */
  parmap_buf line[2]; /* lines: the partial line of each stream */
} OutPipe;

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
  int spawn_wait; /* a fork failed while workers retire: fork again once
                     one of them is reaped */
  const ParmapRawSource *raw; /* items from a C source (the MPI agent) */
  int (*ready)(lua_State *L); /* that source's: would its next item wait? */
  ParmapSink sink;            /* results to a C sink (parmap_map_relay) */
  int relay_held; /* a failure taken, not yet handed out by the relay: the
                     agent holds its result (must_not_wait) */
  int (*tick)(lua_State *L);  /* ... and the source's tick */
  void *sink_ud;
  /* an event loop drives it (loop.c): m:fd(), m:poll(); -1 until m:fd() */
  int ep;         /* epoll fd: the sockets, evfd, tfd */
  int evfd, tfd;  /* eventfd: records are ready; timerfd: time is due */
  int ev_on;      /* evfd is set */
  int reaping;    /* m:poll(): all delivered, workers not all gone yet */
  int *ep_fd;     /* per worker entry: the fd registered, -1 none */
  unsigned *ep_ev; /* ... and its events */
  /* stats = true (loop.c): per item, by index - 1; kept after the stop */
  ParmapJournal *jr; /* option journal: NULL without (U_JOURNAL) */
  struct ItemStat *st;
  lua_Integer st_cap, st_n;
  uint64_t t_start, t_end; /* the map's start, its end (0: not yet) */
  OutPipe *op;          /* output != "direct": per worker entry */
  parmap_buf pend[2];   /* whole lines to write to stdout, stderr */
  int death_out;        /* item: on_death's stack index of what the dead
                           item wrote (stdout, stderr strings), else 0 */
} Map;

/* The window (window.c): chunks and their slots, the items pulled from an
   iterator, the failure list of each slot, which record is next. */
static void add_failure_sig(lua_State *L, Map *m, Slot *s, lua_Integer index,
                            const char *kind, const char *message, pid_t pid,
                            int sig);
static void add_failure(lua_State *L, Map *m, Slot *s, lua_Integer index,
                        const char *kind, const char *message, pid_t pid);
static int finished(Map *m);
static lua_Integer next_failure(const Slot *s, lua_Integer from, size_t *at);
static lua_Integer tries_of(const Slot *s, lua_Integer index);
static lua_Integer add_try(lua_State *L, Slot *s, lua_Integer index,
                           lua_Integer failed);
static void cut_tried(const Slot *s, Seg *g);
static void nomem(lua_State *L);
static Slot *ready(Map *m);
static void release(Map *m);
static void release_slot(Map *m, Slot *s);
static void reserve(lua_State *L, parmap_buf *b, size_t n);
static lua_Integer seg_first_open(Map *m, const Worker *w, int k);
static int seg_len(const Seg *g);
static void unbusy(Map *m, Slot *s);
static Slot *work_slot(lua_State *L, Map *m);

/* Worker output (output.c): the streams of output = "lines" | "item". */
static int out_prepare(Map *m, int wi, int cfd[2]);
static void out_child(Map *m, int cfd[2]);
static void out_read(Map *m, int wi, int k);
static void out_reaped(lua_State *L, Map *m, int wi);
static void out_flush(lua_State *L, Map *m);
static void out_write(lua_State *L, Map *m, int k, const char *p, size_t n);
static void out_close_all(Map *m);

/* The pool (pool.c): forking, feeding and reaping workers, the transport
   (pump: dispatch, sends, reads, deaths, timeouts), stopping them. */
static void dispatch(lua_State *L, Map *m);
static void pump(lua_State *L, Map *m, int block);
static void stop(Map *m, int kill_them);

/* Off the per-item path: kept out of line so that its callers stay small
   enough to be inlined where they were; and the per-item step (emit),
   inlined into both of its callers (the for loop's and m:poll()'s). */
#if defined(__GNUC__)
#define MAP_COLD __attribute__((noinline, cold))
#define MAP_INLINE __inline__ __attribute__((always_inline))
#else
#define MAP_COLD
#define MAP_INLINE
#endif

/* The event loop and stats (loop.c). */
static void unwatch(Map *m, int wi);
static MAP_COLD int stats_take(lua_State *L, Map *m, lua_Integer index,
                               const char *p);
static void loop_close(Map *m);
static void loop_release(Map *m);
static int map_fd(lua_State *L);
static int map_events(lua_State *L);
static int map_poll(lua_State *L);
static int map_timeout(lua_State *L);
static int map_stats(lua_State *L);

#endif
