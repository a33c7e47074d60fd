/*
** proc.c: the OS layer (see proc.h). POSIX, with Linux extras where noted.
*/
#define _GNU_SOURCE
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* then SIGPIPE must be ignored by the host */
#endif

/* ---------------------------------------------------------------- fds */

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static int *reg_fds = NULL;
static size_t reg_n = 0, reg_cap = 0;

/* Room for one more fd; call with reg_lock held. 0 or -1. */
static int reg_reserve(void) {
  if (reg_n == reg_cap) {
    size_t cap = reg_cap ? reg_cap * 2 : 16;
    int *p = realloc(reg_fds, cap * sizeof *p);
    if (p == NULL) return -1;
    reg_fds = p;
    reg_cap = cap;
  }
  return 0;
}

void parmap_fd_register(int fd) {
  pthread_mutex_lock(&reg_lock);
  if (reg_reserve() == 0) reg_fds[reg_n++] = fd;
  /* else: only the fd hygiene of later children suffers */
  pthread_mutex_unlock(&reg_lock);
}

void parmap_fd_close(int fd) {
  size_t i;
  if (fd < 0) return;
  pthread_mutex_lock(&reg_lock);
  for (i = 0; i < reg_n; i++)
    if (reg_fds[i] == fd) {
      reg_fds[i] = reg_fds[--reg_n];
      break;
    }
  pthread_mutex_unlock(&reg_lock);
  close(fd); /* never retried: the fd is gone even on EINTR */
}

/* An engine fd is never 0, 1 or 2: when the caller runs with a standard
   descriptor closed (`2>&-`), a new socket would get it, and Lua code that
   writes to io.stderr would write into the engine's socket. Such an fd is
   moved to 3 or above (close-on-exec). */
int parmap_socketpair(int fds[2]) {
  int e;
#ifdef SOCK_CLOEXEC
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds)) return -1;
#else
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds)) return -1;
  fcntl(fds[0], F_SETFD, FD_CLOEXEC);
  fcntl(fds[1], F_SETFD, FD_CLOEXEC);
#endif
  /* both moved only after both exist: the standard slots stay taken while
     the other is moved, so neither lands on a standard fd again */
  if (fds[0] > 2 && fds[1] > 2) return 0;
  {
    int a = fds[0], b = fds[1];
    int ra, rb;
    if (a <= 2) a = fcntl(fds[0], F_DUPFD_CLOEXEC, 3);
    if (b <= 2) b = fcntl(fds[1], F_DUPFD_CLOEXEC, 3);
    e = errno;
    ra = (a != fds[0]);
    rb = (b != fds[1]);
    if (a < 0 || b < 0) { /* out of fds: close everything */
      close(fds[0]);
      close(fds[1]);
      if (a >= 0 && ra) close(a);
      if (b >= 0 && rb) close(b);
      errno = e;
      return -1;
    }
    if (ra) close(fds[0]);
    if (rb) close(fds[1]);
    fds[0] = a;
    fds[1] = b;
  }
  return 0;
}

/* ---------------------------------------------------------------- fork */

#ifdef __GLIBC__
/* exit() in a child (os.exit by a reference taken before the fork, or C
   code): the caller's atexit handlers must not run here. on_exit handlers
   run last registered first, so this one comes before them all. */
static void child_exit(int status, void *arg) {
  (void)arg;
  fflush(NULL);
  _exit(status);
}
#endif

static void child_setup(int keep_fd, pid_t parent) {
  size_t i;
  struct sigaction sa;
#ifdef __GLIBC__
  on_exit(child_exit, NULL); /* if it fails, exit() runs them: no worse */
#endif
  for (i = 0; i < reg_n; i++)
    if (reg_fds[i] != keep_fd) close(reg_fds[i]);
  reg_n = 0;
  if (keep_fd >= 0) reg_fds[reg_n++] = keep_fd; /* room: reg_reserve */
#ifdef __linux__
  prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
  if (getppid() != parent) _exit(127); /* the parent is already gone */
  if (sigaction(SIGINT, NULL, &sa) == 0 && sa.sa_handler != SIG_IGN &&
      sa.sa_handler != SIG_DFL) {
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
  }
}

static uint64_t forks = 0; /* in a child: the forks made before it */

uint64_t parmap_fork_count(void) { return forks; }

pid_t parmap_fork(int keep_fd) {
  pid_t parent = getpid(), pid;
  int saved;
  fflush(NULL); /* a child must not write the parent's buffers again */
  __atomic_add_fetch(&forks, 1, __ATOMIC_RELAXED);
  pthread_mutex_lock(&reg_lock); /* the child gets a consistent list */
  if (reg_reserve()) {
    pthread_mutex_unlock(&reg_lock);
    errno = ENOMEM;
    return -1;
  }
  pid = fork();
  saved = errno;
  pthread_mutex_unlock(&reg_lock);
  if (pid == 0) child_setup(keep_fd, parent);
  errno = saved;
  return pid;
}

/* ---------------------------------------------------------------- i/o */

ssize_t parmap_send_some(int fd, const void *a, size_t na, const void *b,
                         size_t nb) {
  struct iovec iov[2];
  struct msghdr m;
  ssize_t r;
  memset(&m, 0, sizeof m);
  iov[0].iov_base = (void *)a;
  iov[0].iov_len = na;
  iov[1].iov_base = (void *)b;
  iov[1].iov_len = nb;
  m.msg_iov = na ? iov : iov + 1;
  m.msg_iovlen = (na ? 1 : 0) + (nb ? 1 : 0);
  if (m.msg_iovlen == 0) return 0;
  do r = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
  while (r < 0 && errno == EINTR);
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
  return r;
}

ssize_t parmap_recv_some(int fd, void *p, size_t n) {
  ssize_t r;
  do r = recv(fd, p, n, MSG_DONTWAIT);
  while (r < 0 && errno == EINTR);
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return -2;
  return r;
}

int parmap_write_all(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n > 0) {
    ssize_t r = send(fd, c, n, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    c += r;
    n -= (size_t)r;
  }
  return 0;
}

int parmap_read_all(int fd, void *p, size_t n) {
  char *c = p;
  size_t got = 0;
  while (got < n) {
    ssize_t r = recv(fd, c + got, n - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) return got == 0 ? 1 : -1;
    got += (size_t)r;
  }
  return 0;
}

/* ---------------------------------------------------------------- children */

int parmap_wait(pid_t pid, int *status, int timeout_ms) {
  uint64_t deadline = parmap_now_ns() + (uint64_t)timeout_ms * 1000000u;
  for (;;) {
    pid_t r = waitpid(pid, status, timeout_ms < 0 ? 0 : WNOHANG);
    if (r == pid) return 1;
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1; /* ECHILD: reaped behind our back */
    }
    if (timeout_ms >= 0 && parmap_now_ns() >= deadline) return 0;
    {
      struct timespec ts = {0, 200000}; /* 0.2 ms */
      nanosleep(&ts, NULL);
    }
  }
}

int parmap_sleep_until(uint64_t deadline) {
  uint64_t now = parmap_now_ns();
  struct timespec ts;
  if (now >= deadline) return 0;
  ts.tv_sec = (time_t)((deadline - now) / 1000000000u);
  ts.tv_nsec = (long)((deadline - now) % 1000000000u);
  if (nanosleep(&ts, NULL) == 0) return 0;
  return parmap_now_ns() >= deadline ? 0 : -1;
}

void parmap_status_text(int status, char *out, size_t n) {
  if (WIFEXITED(status))
    snprintf(out, n, "exited with status %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    snprintf(out, n, "killed by signal %d (%s)", WTERMSIG(status),
             strsignal(WTERMSIG(status)));
  else
    snprintf(out, n, "ended with wait status %d", status);
}

/* ---------------------------------------------------------------- misc */

uint64_t parmap_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int parmap_ncpu(void) {
#if defined(__linux__) && defined(CPU_COUNT)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
  }
}
