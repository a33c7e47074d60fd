/*
** proc.h: the OS layer. Sockets, fork, waiting for children, clocks.
** Knows nothing of Lua. Every function retries on EINTR where that is safe
** and never raises SIGPIPE in the caller.
*/
#ifndef PARMAP_PROC_H
#define PARMAP_PROC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* A connected pair of AF_UNIX stream sockets, close-on-exec. 0 or -1. */
int parmap_socketpair(int fds[2]);

/*
** The engine's fds in this process. A forked child closes every registered
** fd but its own, so one worker never holds another's socket (which would
** hide that worker's death from the parent).
*/
void parmap_fd_register(int fd);
void parmap_fd_close(int fd); /* unregister and close; ignores -1 */

/*
** Fork a worker that keeps only `keep_fd` of the engine's fds. Flushes stdio
** first so that the child cannot write the parent's buffered output again.
** In the child: the other engine fds are closed, the child dies with its
** parent (Linux), and an inherited SIGINT handler is reset to the default so
** Ctrl-C stops it instead of raising inside its Lua code. Returns the pid in
** the parent, 0 in the child, -1 (errno set) on failure.
*/
pid_t parmap_fork(int keep_fd);
/* Forks made by parmap_fork in this process (in a child: before it). */
uint64_t parmap_fork_count(void);

/* Non-blocking send: bytes written, 0 when it would block, -1 on error. */
ssize_t parmap_send_some(int fd, const void *a, size_t na, const void *b,
                         size_t nb);
/* Non-blocking receive: bytes read, 0 at end of file, -1 on error,
   -2 when it would block. */
ssize_t parmap_recv_some(int fd, void *p, size_t n);

/* Blocking whole transfers (for workers). 0 on success, 1 at a clean end of
   file before any byte, -1 on error or a truncated read. */
int parmap_write_all(int fd, const void *p, size_t n);
int parmap_read_all(int fd, void *p, size_t n);

/*
** Wait for child `pid` for at most `timeout_ms` (negative: forever).
** Returns 1 with *status set when it was reaped, 0 if it is still running,
** -1 if it is not our child any more (someone else reaped it).
*/
int parmap_wait(pid_t pid, int *status, int timeout_ms);

/* Describe a wait status: "exited with status 3", "killed by signal 9 (Killed)". */
void parmap_status_text(int status, char *out, size_t n);

uint64_t parmap_now_ns(void);
/* Sleep until the monotonic `deadline` (ns): 0 then, -1 when a signal cut
   it short (the caller runs its hooks and sleeps again). */
int parmap_sleep_until(uint64_t deadline);
int parmap_ncpu(void);

#endif
