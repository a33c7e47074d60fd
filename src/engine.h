/*
** engine.h: what the parent side (map.c) and the worker side (worker.c)
** of one parallel map share: the configuration, the frame headers on the
** sockets, the shared-memory slot of each worker, the call adapter.
*/
#ifndef PARMAP_ENGINE_H
#define PARMAP_ENGINE_H

#include <lua.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"

enum { STAR_FALSE = 0, STAR_TRUE = 1, STAR_NONE = 2 };

/* Limits on what the options may ask of the C core (whatever reaches it:
   the Lua front checks them too, with its own messages).
   PARMAP_MAX_ARGS: extra positional arguments (args.n), and the values of
   one star item; each is a stack slot of every call.
   PARMAP_MAX_WORKERS: workers of one map; a larger N is lowered to it (and
   to the item count of a table input) before anything is allocated.
   PARMAP_MAX_CHUNK: items per chunk; a larger chunksize is lowered to it. */
#define PARMAP_MAX_ARGS 100000
#define PARMAP_MAX_WORKERS 1024
#define PARMAP_MAX_CHUNK 1000000

/* User values of a Map userdata, and the worker's stack slots (same order). */
enum {
  U_FN = 1,
  U_ITEMS,    /* the sequence table, or the iterator function */
  U_ARGS,     /* extra positional arguments (a sequence) */
  U_KW,       /* kwargs table, or nil */
  U_PROGRESS, /* progress(done, total, finished), or nil */
  U_FAIL,     /* fail(index, kind, err, message, traceback, pid[, fields]):
                 the error policy (lua/parmap/errors.lua); raises or
                 returns the error object */
  U_DESC,     /* describe(prefix, values...) -> message */
  U_SCRATCH,  /* the codec's scratch table */
  U_INIT,     /* init(id), run once in each worker before its items, or nil */
  U_FINISH,   /* finish(id), run in a worker that ends normally, or nil */
  U_OUTPUT,   /* output = "lines" | "item": write(stream, text), or nil */
  U_RETRY,    /* retry_check(index, kind, err, message, tb, pid, attempts,
                 fields) -> again[, message] (errors.lua), or nil */
  U_IERR,     /* the error the items iterator raised (parent side only) */
  U_JOURNAL,  /* the journal (src/journal.c), or nil (parent side only) */
  U_COUNT = U_JOURNAL
};

typedef struct Config {
  int star, kwstar, has_kw, nargs;
  int from_table; /* items is a table: workers index their own copy */
  int ordered;
  lua_Integer total;     /* -1 when unknown */
  lua_Integer chunksize; /* 0: automatic */
  lua_Integer buffersize; /* iterator input: most items pulled ahead of the
                             loop (pulled but not yet consumed) */
  int N;
  double timeout; /* seconds per item, 0: none */
  int has_seed;   /* seed option: math.randomseed(seed, index) per item */
  lua_Integer seed;
  lua_Integer maxtasks; /* items a worker process runs in all, 0: no limit */
  lua_Integer retries;  /* runs more an item that failed may get, 0: none */
  lua_Integer maxmemory; /* bytes of RSS past which a worker is replaced, 0:
                            no limit */
  struct ParmapRange *range; /* items is a parmap.range: workers compute
                                their items (range.h), else NULL */
  int has_init;         /* an init option: a death before it ends is its */
  double init_timeout;   /* seconds init may run, 0: none */
  double finish_timeout; /* seconds finish may run, 0: none */
  int stats;            /* each record comes after a REC_STATS prefix */
  int output;           /* OUT_DIRECT, OUT_LINES, OUT_ITEM */
  char prefix[64];      /* lines: each line's prefix, "%d" the worker */
  int has_retry_if;     /* retry_if: U_RETRY decides which failures rerun */
  double retry_delay, retry_delay_max; /* seconds before the 2nd run
                            (doubling per run), its cap; 0: none, no cap */
} Config;
enum { OUT_DIRECT = 0, OUT_LINES = 1, OUT_ITEM = 2 };

/* Frame headers. Both ends are the same machine: native byte order. */
#define FRAME_HDR 32
#define MAGIC_TASK 0x504d5431u   /* parent -> worker: a segment of items */
#define MAGIC_RESULT 0x504d5231u /* worker -> parent: results */

typedef struct TaskHdr {
  uint32_t magic, count;
  int64_t from;     /* index of the first item */
  uint64_t bodylen; /* serialized items (iterator input), else 0 */
  uint64_t tries;   /* retries: runs item `from` already had (and lost to
                       a death or a timeout); the other items had none */
} TaskHdr;

typedef struct ResultHdr {
  uint32_t magic, nitems;
  uint64_t bodylen;
  uint64_t elapsed_ns; /* time spent on the segment, with FLAG_END */
  uint64_t flags;
} ResultHdr;
#define FLAG_END 1u /* the segment is complete */
#define FLAG_INIT 2u /* no items: the body is the REC_ERR record of a
                        failed init; the worker then only waits for EOF */

/* A result record starts with one of these bytes, then a codec record:
   REC_OK: the values fn returned.
   REC_ERR: kind, err, message, traceback, pid.
   REC_STATS (stats = true): STATS_LEN bytes, the item's wall and CPU ns and
   the worker's peak RSS and its growth in bytes (4 native uint64), then
   the item's REC_OK or REC_ERR record.
   REC_OUT (output = "item"): two native uint64 n1, n2, then what the item
   wrote on stdout (n1 bytes) and stderr (n2), then the REC_STATS, REC_OK or
   REC_ERR record; only when it wrote something. */
enum { REC_OK = 0, REC_ERR = 1, REC_STATS = 2, REC_OUT = 3 };
#define STATS_LEN 32

/* Written by a worker, read by the parent: what it is doing now. */
typedef struct Shm {
  int64_t cur;      /* index of the item being run, 0 when none */
  uint64_t start;   /* when it started (monotonic ns), if timeouts are on;
                       set when init ended too */
  uint64_t inited;  /* init ended (or there was none): 1; 0 while it runs */
  uint64_t fails;   /* retries: runs of item cur that failed before this
                       one (those its segment header gave included) */
  uint32_t over;    /* maxmemory: the worker's RSS passed it */
  char pad[28];     /* one cache line each */
} Shm;

/* Stack layout needed by the call adapter (absolute indices). */
typedef struct CallSpec {
  int star, kwstar, has_kw, nargs;
  int fn, args, kw;
} CallSpec;

/*
** Push fn and its arguments for `item` (at absolute index item) following
** the call table. Returns the argument count n: fn is at top - n, and
** there may be scratch values below it. Returns -1 with an error message
** pushed when the item does not have the shape its mode needs.
*/
int parmap_push_call(lua_State *L, const CallSpec *cs, int item,
                     lua_Integer index);

/* Run the worker side in a forked child as worker `id` of `n`; never
   returns. */
void parmap_worker_main(lua_State *L, int map_idx, const Config *cfg,
                        Shm *shm, int fd, int id, int n);

/* The MPI agent: the workers this process forks from now on are numbered
   base + 1.. of total (parmap.worker(), init's and finish's argument),
   unique across the job; (0, 0) numbers them 1..N again. */
void parmap_worker_numbering(int base, int total);

#endif
