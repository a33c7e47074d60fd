/*
** child.h: the life of a forked child, shared by a map's workers (worker.c)
** and a ReturnProcess (process.c): the fork, the child's bootstrap and exit,
** its collector over the inherited heap, how its result and errors are
** encoded, and, in the parent, waiting for a child and telling its death.
*/
#ifndef PARMAP_CHILD_H
#define PARMAP_CHILD_H

#include <lua.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"

/* A child's exit code for an internal failure (sysexits' EX_SOFTWARE):
   the parent reports "exited with status 70". */
#define PARMAP_EXIT_INTERNAL 70

/* ------------------------------------------------------------ the fork */

/* A socketpair and a fork: in the parent returns the child's pid, *fd its
   own end (registered with proc.c); in the child returns 0, *fd the
   child's end; -1 with errno set (nothing left open) on failure. */
pid_t parmap_child_spawn(int *fd);

/* ------------------------------------------------------------ the child */

/* Before the child's first call into Lua: drop a Ctrl-C inherited from the
   parent (the hook lua.c's SIGINT handler sets: all four events, count 1,
   not yet run). The parent is interrupted, not the child. */
void parmap_clear_interrupt(lua_State *L);

/* From the C function under which the child runs the caller's Lua code:
   tracebacks stop `extra` levels above it (frames below are the caller's),
   os.exit leaves with _exit(), math.random gets a stream of its own, and
   an exit guard makes lua_close (os.exit(code, true)) leave with _exit()
   before any of the caller's __close or __gc. id, n: the child's worker
   number and count (0, 0 for a ReturnProcess). */
void parmap_child_start(lua_State *L, int extra, int id, int n);

/* The child's Lua code has returned normally: the guard stands down. */
void parmap_child_disarm(void);

/* Leave: flush stdio, then _exit(code). Never runs the caller's atexit
   handlers or finalizers. */
void parmap_child_exit(int code);

/* Push package.loaded.math.randomseed (the math library's, even when the
   global `math` was replaced), or nothing: returns 1 if pushed. */
int parmap_push_randomseed(lua_State *L);

/* This process's worker number and its map's worker count (both 0
   outside a map's worker). */
int parmap_worker_id(int *n);

/* The collector over the inherited heap: stopped, so that a short child
   never walks (and so copies) every inherited page, and restarted once the
   child's own garbage outweighs that heap (at least 1 MiB), checked at every
   allocation (the child's allocator is wrapped), so inside a long call too.
   A collector the caller had stopped stays stopped. */
void parmap_child_gc_defer(lua_State *L);
/* In the caller before a fork: end generational mode's fallback to full
   collections, so the children inherit old objects. */
void parmap_child_gc_settle(lua_State *L);

/* ------------------------------------------------------------ records */

/* Message handler: boxes an error with its string form and a traceback
   that stops at the child's floor. */
int parmap_msgh(lua_State *L);
/* Replace the error value at idx (and all above it) by three values:
   err, message, traceback. Returns 3. */
int parmap_unbox(lua_State *L, int idx);

/* Append an REC_ERR record (kind, err, message, traceback, pid); err that
   cannot travel goes as message. Raises only when out of memory. */
void parmap_put_error(lua_State *L, parmap_buf *b, int scratch,
                      const char *kind, int err_idx, const char *message,
                      const char *traceback, pid_t pid);
/* The same with a sixth value when prior >= 0: the runs of the item that
   failed before this one (its attempts less one). */
void parmap_put_error_after(lua_State *L, parmap_buf *b, int scratch,
                            const char *kind, int err_idx,
                            const char *message, const char *traceback,
                            pid_t pid, lua_Integer prior);

/* Append the result record of the values from `first` to the top (item
   `index`; 0 for a ReturnProcess): REC_OK and their codec record, or,
   when one cannot travel, a REC_ERR record of kind "value" whose message
   (from describe, at absolute index desc) says where it sits. */
void parmap_put_result(lua_State *L, parmap_buf *b, int first, int scratch,
                       int desc, lua_Integer index, pid_t pid);
/* retry_delay: the wait before the run that follows `failed` failed runs
   (1: before the 2nd): base doubled per run after the 2nd, at most max
   (seconds; max 0: no cap but the option's bound). In ns. */
uint64_t parmap_retry_delay_ns(double base, double max, lua_Integer failed);

/* retry_if: call the spec's retry_check (at absolute index fn) on a
   failure whose kind, err, message, traceback are at absolute index rec
   (four values), of item `index` after `attempts` runs; fields: absolute
   index of the error object's extra fields, or 0. Returns 1: run it
   again; 0: not, and then, when the predicate raised, its message that
   names retry_if replaces err and message (rec + 1, rec + 2). Never
   raises but for memory. */
int parmap_retry_decide(lua_State *L, int fn, lua_Integer index, int rec,
                        pid_t pid, lua_Integer attempts, int fields);

/* The same for a run that had `prior` runs before it (a worker's retries
   of the item): a "value" error record then carries that count as a sixth
   value, for the error's attempts. */
void parmap_put_result_after(lua_State *L, parmap_buf *b, int first,
                             int scratch, int desc, lua_Integer index,
                             pid_t pid, lua_Integer prior);

/* ------------------------------------------------------------ the parent */

/* Call an empty Lua function: a hook that a signal handler set (lua.c's
   Ctrl-C) runs at a call, so C code that waits calls this after EINTR, or
   after a timed wait, lest the interrupt be lost. */
void parmap_run_hooks(lua_State *L);

/* Is the value at idx the error lua.c's SIGINT hook raises ("...:
   interrupted!")? An items iterator's error is kept until the items pulled
   before it have run; Ctrl-C must not wait for them. */
int parmap_is_interrupt(lua_State *L, int idx);

/* Milliseconds to wait for a deadline (ns of parmap_now_ns; negative:
   none): at most cap, 0 once it has passed, else rounded up. */
int parmap_deadline_ms(int64_t deadline_ns, int cap);

/* Reap child pid by the deadline (ns, negative: none; 0: only look), in
   slices that let a Ctrl-C hook run (none when L is NULL: from __gc). 1 (status set) when reaped, -1 when someone else
   reaped it, 0 when the deadline passed first. */
int parmap_child_reap(lua_State *L, pid_t pid, int *status,
                      int64_t deadline_ns);

/* How a reaped child ended, for a death message: "exited with status 3",
   "killed by signal 9 (Killed)"; lost: reaped by someone else. */
void parmap_child_how(char *how, size_t n, int lost, int status);

#endif
