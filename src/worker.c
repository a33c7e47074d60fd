/*
** worker.c: the worker side of a map: the segment loop, init and finish.
** A worker is a forked copy of the caller: it reads segments of items from
** its socket, calls fn on each, writes result records back, and leaves with
** _exit() at end of file. It never returns into the caller's Lua code.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "child.h"
#include "codec.h"
#include "engine.h"
#include "proc.h"
#include "range.h"

/* ---------------------------------------------------------------- worker */

#define FLUSH_BYTES (256 * 1024)
#define FLUSH_NS (20 * 1000000u)
#define FLUSH_RETRY_NS (1000000u) /* the buffer was busy: look again soon */

/* Who holds the out buffer (WState.hold): the main thread between an
   item's end and the next item's start, the flusher thread while it writes
   what waits there, else nobody (fn runs). */
enum { HOLD_NONE = 0, HOLD_MAIN = 1, HOLD_FLUSHER = 2 };

typedef struct WState {
  lua_State *L;
  const Config *cfg;
  Shm *shm;
  int fd;
  pid_t pid;
  int id, n; /* this worker's number, of n */
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
  uint64_t last;    /* last flush (coarse clock; atomic: the flusher
                       reads it to sleep) */
  /* The flusher thread writes finished results while fn runs, so they are
     never held back by a slow item (DESIGN.md, Frames) */
  int hold;         /* HOLD_*, atomic */
  int fl_tried;     /* start_flusher ran */
  int fl_on;        /* the flusher runs (atomic: it clears it when the
                       parent hung up) */
  int busy;         /* a segment runs (atomic; set under mu) */
  pthread_mutex_t mu; /* held by the flusher but while it waits */
  pthread_cond_t cv;  /* wakes it for a segment */
  uint64_t st_wall, st_cpu; /* stats: when item k started, its CPU then */
  uint64_t st_rss;          /* stats: peak RSS after the previous item */
  int64_t st_item;          /* stats: the item st_wall is of */
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
    parmap_child_exit(0); /* the parent hung up: nobody wants the result */
  w->out.len = FRAME_HDR;
}

/* Take the out buffer for the main thread (it may be in the flusher's
   write: then wait for it), and mark where the next record starts. One
   compare-and-swap an item; the mutex only when the flusher has it. */
static void hold_slow(WState *w) {
  int none = HOLD_NONE;
  pthread_mutex_lock(&w->mu); /* the flusher writes holding it */
  __atomic_compare_exchange_n(&w->hold, &none, HOLD_MAIN, 0, __ATOMIC_ACQUIRE,
                              __ATOMIC_RELAXED);
  pthread_mutex_unlock(&w->mu);
}

static inline void hold(WState *w) {
  int none = HOLD_NONE;
  if (!__atomic_compare_exchange_n(&w->hold, &none, HOLD_MAIN, 0,
                                   __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
    hold_slow(w);
  w->mark = w->out.len;
}

/* fn is about to run: the flusher may take what is in the buffer. */
static inline void unhold(WState *w) {
  __atomic_store_n(&w->hold, HOLD_NONE, __ATOMIC_RELEASE);
}

/* The flusher thread: while a segment runs, every FLUSH_NS after the last
   flush it writes the results that wait in out, if fn runs (the buffer is
   not held); so a finished result reaches the parent within the interval
   even while fn runs a slow item, blocks in C or loops. It calls no Lua,
   no malloc, no stdio: fn may fork (the child has no flusher), and exit
   at any time (a frame cut short by the exit is dropped by the parent, as
   with any death). */
static void *flusher(void *arg) {
  WState *w = (WState *)arg;
  pthread_mutex_lock(&w->mu);
  for (;;) {
    uint64_t now, last, wait_ns;
    struct timespec ts;
    int none = HOLD_NONE;
    if (!__atomic_load_n(&w->busy, __ATOMIC_ACQUIRE)) {
      pthread_cond_wait(&w->cv, &w->mu); /* between segments: sleep */
      continue;
    }
    now = coarse_ns();
    last = __atomic_load_n(&w->last, __ATOMIC_RELAXED);
    if (now - last >= FLUSH_NS) {
      if (__atomic_compare_exchange_n(&w->hold, &none, HOLD_FLUSHER, 0,
                                      __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        if (w->pending > 0) {
          ResultHdr h;
          h.magic = MAGIC_RESULT;
          h.nitems = w->pending;
          h.bodylen = w->out.len - FRAME_HDR;
          h.elapsed_ns = 0;
          h.flags = 0;
          memcpy(w->out.p, &h, sizeof h);
          if (parmap_write_all(w->fd, w->out.p, w->out.len)) {
            /* the parent hung up: the main thread finds it at its next
               flush, which its own clock now times, and leaves */
            __atomic_store_n(&w->fl_on, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&w->hold, HOLD_NONE, __ATOMIC_RELEASE);
            break;
          }
          w->out.len = FRAME_HDR;
          w->pending = 0;
        }
        __atomic_store_n(&w->last, coarse_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&w->hold, HOLD_NONE, __ATOMIC_RELEASE);
        wait_ns = FLUSH_NS;
      } else {
        wait_ns = FLUSH_RETRY_NS; /* the main thread is between items */
      }
    } else {
      wait_ns = last + FLUSH_NS - now;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(wait_ns / 1000000000u);
    ts.tv_nsec += (long)(wait_ns % 1000000000u);
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&w->cv, &w->mu, &ts);
  }
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

/* Start the flusher, once. Without it (no thread to be had: RLIMIT_NPROC
   counts threads) results go out between items only, as they did. */
static void start_flusher(WState *w) {
  pthread_attr_t attr;
  pthread_condattr_t ca;
  pthread_t t;
  sigset_t all, old;
  size_t stack = 256 * 1024;
  w->fl_tried = 1;
  if (pthread_mutex_init(&w->mu, NULL)) return;
  if (pthread_condattr_init(&ca)) return;
  if (pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) ||
      pthread_cond_init(&w->cv, &ca)) {
    pthread_condattr_destroy(&ca);
    return;
  }
  pthread_condattr_destroy(&ca);
  if (pthread_attr_init(&attr)) return;
#ifdef PTHREAD_STACK_MIN
  if (stack < (size_t)PTHREAD_STACK_MIN) stack = (size_t)PTHREAD_STACK_MIN;
#endif
  pthread_attr_setstacksize(&attr, stack);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  /* every signal stays with the main thread (fn's handlers, lua.c's
     Ctrl-C): the thread starts with all blocked */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  __atomic_store_n(&w->fl_on, 1, __ATOMIC_RELAXED); /* before it runs */
  if (pthread_create(&t, &attr, flusher, w))
    __atomic_store_n(&w->fl_on, 0, __ATOMIC_RELAXED);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
}

/* The result of item `index`: values from `first` to the top. */
static void put_result(WState *w, lua_Integer index, int first) {
  parmap_put_result_after(w->L, &w->out, first, w->base + U_SCRATCH,
                          w->base + U_DESC, index, w->pid,
                          w->tries_k == w->k ? (lua_Integer)w->tries : 0);
}

/* fn raised: err, message, traceback at e. With retries the record says
   how many runs failed before (retry_if may have stopped them early). */
static void put_failure(WState *w, int e) {
  lua_State *L = w->L;
  parmap_put_error_after(L, &w->out, w->oscratch, "error", e,
                         lua_tostring(L, e + 1), lua_tostring(L, e + 2),
                         w->pid,
                         w->cfg->retries > 0 ? (lua_Integer)w->tries - 1 : -1);
}

/* fn raised in item `index` (err, message, traceback at e), which has runs
   left: does retry_if let it run again (its message, when it raised,
   replaces err and message at e)? Then sleep retry_delay here: the
   segment's later items wait, the other workers do not (see README,
   "Retries"). The timeout clock sees a start in the future meanwhile,
   which it does not count (the run's own start comes after). */
static int retry_again(WState *w, int64_t index, int e) {
  lua_State *L = w->L;
  uint64_t d, until;
  if (w->cfg->has_retry_if) {
    int fn = lua_gettop(L) + 1, rec = fn + 1, again;
    luaL_checkstack(L, 6, NULL);
    lua_getiuservalue(L, w->map, U_RETRY);
    lua_pushliteral(L, "error");
    lua_pushvalue(L, e);
    lua_pushvalue(L, e + 1);
    lua_pushvalue(L, e + 2);
    again = parmap_retry_decide(L, fn, (lua_Integer)index,
                                rec, w->pid, (lua_Integer)w->tries, 0);
    lua_copy(L, rec + 1, e);
    lua_copy(L, rec + 2, e + 1);
    lua_settop(L, fn - 1);
    if (!again) return 0;
  }
  d = parmap_retry_delay_ns(w->cfg->retry_delay, w->cfg->retry_delay_max,
                            (lua_Integer)w->tries);
  if (d == 0) return 1;
  until = parmap_now_ns() + d;
  /* a death while it waits costs the item the runs that failed so far */
  __atomic_store_n(&w->shm->fails, w->tries, __ATOMIC_RELEASE);
  if (w->cfg->timeout > 0)
    __atomic_store_n(&w->shm->start, until, __ATOMIC_RELEASE);
  while (parmap_sleep_until(until) < 0) {
  }
  return 1;
}

/* ---------------------------------------------------------------- stats */

/* stats = true: this thread's CPU time (the worker may run other threads),
   and the process's peak RSS in bytes. */
static uint64_t cpu_ns(void) {
  struct rusage ru;
#ifdef RUSAGE_THREAD
  getrusage(RUSAGE_THREAD, &ru);
#else
  getrusage(RUSAGE_SELF, &ru);
#endif
  return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) *
             1000000000u +
         ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000u;
}

static uint64_t peak_rss(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (uint64_t)ru.ru_maxrss * 1024u; /* KiB on Linux */
}

static void stats_begin(WState *w) {
  w->st_wall = parmap_now_ns();
  w->st_cpu = cpu_ns();
  w->st_item = w->h->from + (int64_t)w->k;
}

/* Put the REC_STATS prefix in front of the record that starts at w->mark
   (the buffer held: the flusher never sees a record without it). Its
   numbers are known only once the item is over. Returns 0, or -1 with no
   memory for it. */
static int stats_end(WState *w) {
  uint64_t v[4];
  size_t n = w->out.len - w->mark;
  v[0] = parmap_now_ns() - w->st_wall;
  v[1] = cpu_ns() - w->st_cpu;
  v[2] = peak_rss();
  v[3] = v[2] > w->st_rss ? v[2] - w->st_rss : 0;
  w->st_rss = v[2];
  if (parmap_buf_reserve(&w->out, 1 + STATS_LEN)) return -1;
  memmove(w->out.p + w->mark + 1 + STATS_LEN, w->out.p + w->mark, n);
  w->out.p[w->mark] = (char)REC_STATS;
  memcpy(w->out.p + w->mark + 1, v, sizeof v);
  w->out.len += 1 + STATS_LEN;
  return 0;
}

/* ---------------------------------------------------------------- output */

/* What fd (a memfd, output = "item") holds, appended to out; then it is
   emptied. Returns the bytes, or -1 with no memory. */
static int64_t take_fd(WState *w, int fd) {
  struct stat sb;
  off_t at = 0;
  if (fstat(fd, &sb) || sb.st_size <= 0) return 0; /* not ours any more */
  if (parmap_buf_reserve(&w->out, (size_t)sb.st_size)) return -1;
  while (at < sb.st_size) {
    ssize_t r = pread(fd, w->out.p + w->out.len, (size_t)(sb.st_size - at), at);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    w->out.len += (size_t)r;
    at += r;
  }
  /* empty, and the next write at its start (fd 1 and 2 keep an offset) */
  if (ftruncate(fd, 0) == 0) lseek(fd, 0, SEEK_SET);
  return (int64_t)at;
}

/* output = "item": put the REC_OUT prefix (what the item wrote on stdout
   and stderr) in front of the record that starts at w->mark, the buffer
   held. Nothing when it wrote nothing. Returns 0, or -1 with no memory. */
static int output_end(WState *w) {
  size_t rec = w->out.len - w->mark, hdr = 1 + 2 * sizeof(uint64_t), len;
  uint64_t n[2];
  int64_t a, b;
  fflush(stdout); /* C stdio holds what io.write and print wrote */
  fflush(stderr);
  a = take_fd(w, 1);
  b = a < 0 ? -1 : take_fd(w, 2);
  if (a < 0 || b < 0) return -1;
  if (a == 0 && b == 0) return 0;
  n[0] = (uint64_t)a;
  n[1] = (uint64_t)b;
  len = (size_t)(a + b);
  if (parmap_buf_reserve(&w->out, hdr)) return -1;
  /* out is now: record, text; make it: REC_OUT, n, text, record */
  {
    char *p = w->out.p + w->mark;
    char *tmp = (char *)malloc(rec ? rec : 1);
    if (tmp == NULL) return -1;
    memcpy(tmp, p, rec);
    memmove(p + hdr, p + rec, len);
    p[0] = (char)REC_OUT;
    memcpy(p + 1, n, sizeof n);
    memcpy(p + hdr + len, tmp, rec);
    free(tmp);
  }
  w->out.len += hdr;
  return 0;
}

/* maxmemory: once this process's RSS passes it, say so in its Shm; the
   parent then hands it nothing more and replaces it, as for maxtasks.
   Checked at the end of each segment and at the main thread's flushes, so
   tiny items do not pay a read of statm each. */
static void mem_check(WState *w) {
  static int fd = -1; /* this process's statm, kept open */
  static pid_t owner = 0;
  char buf[128];
  ssize_t r;
  unsigned long long size, rss;
  if (w->cfg->maxmemory <= 0 || w->shm->over) return;
  if (owner != w->pid) { /* inherited from the worker that forked this one:
                            it reads that process's statm */
    if (fd >= 0) close(fd);
    fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    owner = w->pid;
  }
  if (fd < 0) return;
  do r = pread(fd, buf, sizeof buf - 1, 0);
  while (r < 0 && errno == EINTR);
  if (r <= 0) return;
  buf[r] = '\0';
  if (sscanf(buf, "%llu %llu", &size, &rss) != 2) return;
  if (rss * (unsigned long long)sysconf(_SC_PAGESIZE) >
      (unsigned long long)w->cfg->maxmemory)
    __atomic_store_n(&w->shm->over, 1u, __ATOMIC_RELEASE);
}

/* After each item (the buffer held): count it, and flush when enough has
   piled up; the flusher thread, when there is one, keeps the interval. */
static void item_done(WState *w) {
  w->pending++;
  if (w->k + 1 >= w->h->count) return; /* the end frame follows at once */
  if (w->out.len >= FLUSH_BYTES ||
      (!__atomic_load_n(&w->fl_on, __ATOMIC_RELAXED) &&
       coarse_ns() - w->last >= FLUSH_NS)) {
    mem_check(w);
    flush(w, w->pending, 0, 0);
    w->pending = 0;
    __atomic_store_n(&w->last, coarse_ns(), __ATOMIC_RELAXED);
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
               w->cs.nargs == 0 && !cfg->stats && cfg->output != OUT_ITEM;
  /* this call's own frame: the map (argument 2)'s values at base + U_* */
  w->base = 2;
  for (u = 1; u <= U_COUNT; u++) lua_getiuservalue(L, 2, u);
  w->cs.fn = w->base + U_FN;
  w->cs.args = w->base + U_ARGS;
  w->cs.kw = w->base + U_KW;
  seeder = cfg->has_seed && parmap_push_randomseed(L) ? lua_gettop(L) : 0;
  top = lua_gettop(L);
  if (!lua_checkstack(L, 8)) luaL_error(L, "parmap: stack overflow");
  for (; w->k < w->h->count; w->k++) {
    lua_Integer index = (lua_Integer)w->h->from + (lua_Integer)w->k;
    int nargs, fnpos;
    w->mark_pos = w->pos;
    /* start before cur: the parent never pairs an old start with a new
       item (it reads cur, start, cur) */
    if (cfg->timeout > 0)
      __atomic_store_n(&w->shm->start, parmap_now_ns(), __ATOMIC_RELEASE);
    if (cfg->retries > 0) /* a death now costs the item these runs too */
      __atomic_store_n(&w->shm->fails, w->tries_k == w->k ? w->tries : 0,
                       __ATOMIC_RELEASE);
    __atomic_store_n(&w->shm->cur, (int64_t)index, __ATOMIC_RELEASE);
    if (seeder) { /* seed option: the item's stream depends on it alone */
      lua_pushvalue(L, seeder);
      lua_pushinteger(L, cfg->seed);
      lua_pushinteger(L, index);
      lua_call(L, 2, 0);
    }
    if (simple) lua_pushvalue(L, w->cs.fn); /* fn(item): no adapter */
    if (cfg->from_table) {
      if (cfg->range) parmap_range_push(L, cfg->range, index);
      else lua_geti(L, w->base + U_ITEMS, index);
    } else if (!parmap_decode_scalar(L, w->in.p, w->in.len, &w->pos)) {
      const char *err;
      if (parmap_decode(L, w->in.p, w->in.len, &w->pos, w->base + U_SCRATCH,
                        &err) != 1) {
        fprintf(stderr, "parmap worker: bad item message: %s\n",
                err ? err : "not one value");
        parmap_child_exit(PARMAP_EXIT_INTERNAL);
      }
    }
    if (simple) {
      lua_call(L, 1, LUA_MULTRET);
      hold(w);
      put_result(w, index, top + 1);
      lua_settop(L, top);
      item_done(w);
      unhold(w);
      continue;
    }
    if (cfg->stats) stats_begin(w); /* never on the simple path */
    nargs = parmap_push_call(L, &w->cs, top + 1, index);
    if (nargs < 0) {
      hold(w);
      parmap_put_error(L, &w->out, w->base + U_SCRATCH, "shape",
                       lua_gettop(L), lua_tostring(L, -1), "", w->pid);
    } else {
      fnpos = lua_gettop(L) - nargs;
      lua_call(L, nargs, LUA_MULTRET);
      hold(w);
      put_result(w, index, fnpos); /* results replace fn and its args */
    }
    if (cfg->stats && stats_end(w)) luaL_error(L, "parmap: not enough memory");
    if (cfg->output == OUT_ITEM && output_end(w))
      luaL_error(L, "parmap: not enough memory");
    lua_settop(L, top);
    item_done(w);
    unhold(w);
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
  /* a segment of one item flushes as it ends: no thread for it (threads
     count against RLIMIT_NPROC, and slow items come one a segment) */
  if (!w->fl_tried && h->count > 1) start_flusher(w);
  __atomic_store_n(&w->last, coarse_ns(), __ATOMIC_RELAXED);
  if (__atomic_load_n(&w->fl_on, __ATOMIC_RELAXED)) { /* wake the flusher:
                                                          a segment runs */
    pthread_mutex_lock(&w->mu);
    __atomic_store_n(&w->busy, 1, __ATOMIC_RELEASE);
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
  }
  while (w->k < h->count) {
    lua_pushcfunction(L, run_items);
    lua_pushlightuserdata(L, w);
    lua_pushvalue(L, w->map);
    w->mark_pos = w->pos;
    if (lua_pcall(L, 2, 0, w->msgh) != LUA_OK) {
      /* item w->k raised. When that was the codec running out of memory
         (the buffer is held then), out may end in part of its result
         record and the scratch table hold entries: drop both, or the next
         records come out garbled. An item whose own record was not read
         cannot be skipped: leave, and the parent reports the item (the
         rest of the segment runs again). */
      if (!w->cfg->from_table && w->pos == w->mark_pos) parmap_child_exit(PARMAP_EXIT_INTERNAL);
      if (__atomic_load_n(&w->hold, __ATOMIC_RELAXED) == HOLD_MAIN)
        w->out.len = w->mark;
      else
        hold(w); /* fn raised: what out holds is whole */
      clear_table(L, w->oscratch);
      parmap_unbox(L, lua_gettop(L)); /* err, message, traceback */
      if (w->cfg->retries > 0) { /* runs left? then again, here */
        if (w->tries_k != w->k) {
          w->tries_k = w->k;
          w->tries = 0;
        }
        if ((lua_Integer)++w->tries <= w->cfg->retries) {
          /* unheld: while retry_if runs and the wait lasts, the flusher
             sends the segment's earlier results */
          unhold(w);
          if (retry_again(w, h->from + (int64_t)w->k, lua_gettop(L) - 2)) {
            lua_settop(L, top);
            w->pos = w->mark_pos; /* its item is decoded again */
            continue;
          }
          hold(w);
        }
      }
      put_failure(w, lua_gettop(L) - 2);
      if (w->cfg->stats) { /* the last run's cost, as for a result */
        if (w->st_item != h->from + (int64_t)w->k) { /* raised before fn */
          w->st_wall = parmap_now_ns();
          w->st_cpu = cpu_ns();
        }
        if (stats_end(w)) parmap_child_exit(PARMAP_EXIT_INTERNAL);
      }
      if (w->cfg->output == OUT_ITEM && output_end(w))
        parmap_child_exit(PARMAP_EXIT_INTERNAL);
      lua_settop(L, top);
      w->k++;
      item_done(w);
      unhold(w);
    }
  }
  /* the segment's end, for the parent's deadline of the next one: start
     before cur, as for an item */
  if (w->cfg->timeout > 0)
    __atomic_store_n(&w->shm->start, parmap_now_ns(), __ATOMIC_RELEASE);
  __atomic_store_n(&w->shm->cur, 0, __ATOMIC_RELEASE);
  mem_check(w); /* before the end frame: the parent decides on reading it */
  hold(w);
  flush(w, w->pending, parmap_now_ns() - t0, FLAG_END);
  w->pending = 0;
  __atomic_store_n(&w->busy, 0, __ATOMIC_RELEASE); /* the flusher sleeps */
  unhold(w);
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
  lua_pushinteger(L, w->id);
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
  hold(w);
  parmap_put_error(L, &w->out, w->oscratch, "init", box,
                   lua_tostring(L, box + 1), lua_tostring(L, box + 2), w->pid);
  flush(w, 0, 0, FLAG_INIT);
  for (;;) {
    ssize_t r = read(w->fd, sink, sizeof sink);
    if (r > 0 || (r < 0 && errno == EINTR)) continue;
    break;
  }
  parmap_child_exit(1);
}

/* The parent closed the socket: the map ended, or this worker ran its
   maxtasks items. finish's error cannot reach the map any more (every
   result is delivered): it goes to stderr. */
static void run_finish(WState *w) {
  lua_State *L = w->L;
  if (call_user(w, U_FINISH)) return;
  fprintf(stderr, "parmap worker %d (pid %d): finish failed: %s\n%s\n",
          w->id, (int)w->pid, lua_tostring(L, -2), lua_tostring(L, -1));
  parmap_child_exit(1);
}

/* worker_loop(wstate, map): runs under lua_pcall, so every stack index
   below is of this call's frame. */
static int worker_loop(lua_State *L) {
  WState *w = (WState *)lua_touserdata(L, 1);
  if (!lua_checkstack(L, U_COUNT + 16)) parmap_child_exit(PARMAP_EXIT_INTERNAL);
  /* tracebacks stop above run_items, under which fn runs */
  parmap_child_start(L, 1, w->id, w->n);
  w->map = 2;
  lua_pushcfunction(L, parmap_msgh);
  w->msgh = lua_gettop(L);
  lua_getiuservalue(L, w->map, U_SCRATCH);
  w->oscratch = lua_gettop(L);
  w->cs.star = w->cfg->star;
  w->cs.kwstar = w->cfg->kwstar;
  w->cs.has_kw = w->cfg->has_kw;
  w->cs.nargs = w->cfg->nargs;
  if (!call_user(w, U_INIT)) init_failed(w);
  /* the first item's deadline counts from here, not from the fork: start
     before inited, as start before cur */
  if (w->cfg->timeout > 0)
    __atomic_store_n(&w->shm->start, parmap_now_ns(), __ATOMIC_RELEASE);
  __atomic_store_n(&w->shm->inited, 1, __ATOMIC_RELEASE);
  for (;;) {
    TaskHdr h;
    int r = parmap_read_all(w->fd, &h, sizeof h);
    if (r == 1) { /* the parent closed: done */
      run_finish(w); /* under the exit guard: user code */
      parmap_child_disarm();
      return 0;
    }
    if (r < 0 || h.magic != MAGIC_TASK) parmap_child_exit(r < 0 ? 0 : PARMAP_EXIT_INTERNAL);
    w->in.len = 0;
    if (h.bodylen) {
      if (parmap_buf_reserve(&w->in, (size_t)h.bodylen))
        luaL_error(L, "parmap: not enough memory");
      if (parmap_read_all(w->fd, w->in.p, (size_t)h.bodylen)) parmap_child_exit(0);
      w->in.len = (size_t)h.bodylen;
    }
    run_segment(w, &h);
  }
}

/* The MPI agent numbers its workers within the job: worker id of its
   map is number_base + id of number_total (engine.h). */
static int number_base = 0, number_total = 0;
void parmap_worker_numbering(int base, int total) {
  number_base = base > 0 ? base : 0;
  number_total = total > 0 ? total : 0;
}

void parmap_worker_main(lua_State *L, int map_idx, const Config *cfg,
                        Shm *shm, int fd, int id, int n) {
  WState w;
  memset(&w, 0, sizeof w);
  parmap_clear_interrupt(L);
  w.id = number_base + id;
  w.n = number_total > 0 ? number_total : n;
  number_base = number_total = 0; /* a map run inside this worker counts
                                     its own workers from 1 */
  parmap_child_gc_defer(L);
  w.L = L;
  w.cfg = cfg;
  w.shm = shm;
  w.fd = fd;
  w.pid = getpid();
  if (cfg->stats) w.st_rss = peak_rss();
  if (parmap_buf_reserve(&w.out, FRAME_HDR)) parmap_child_exit(PARMAP_EXIT_INTERNAL);
  w.out.len = FRAME_HDR;
  if (!lua_checkstack(L, 8)) parmap_child_exit(PARMAP_EXIT_INTERNAL);
  lua_pushcfunction(L, worker_loop);
  lua_pushlightuserdata(L, &w);
  lua_pushvalue(L, map_idx);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    fprintf(stderr, "parmap worker %d: %s\n", (int)w.pid,
            lua_isstring(L, -1) ? lua_tostring(L, -1) : "internal error");
    parmap_child_exit(PARMAP_EXIT_INTERNAL);
  }
  parmap_child_exit(0);
}
