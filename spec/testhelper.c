/*
** testhelper.c: parmap_testhelper, a test-only Lua module for the fault
** specs (spec/faults_*_spec.lua). It does what plain Lua cannot: crash,
** make values that cannot travel, limit memory, run a program on a
** pseudo-terminal, and look at fds, waits and signal dispositions.
** Never installed; built into $(BUILD) by `make`.
*/
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#if defined(__GNUC__)
#define TH_API __attribute__((visibility("default")))
#else
#define TH_API
#endif

static int fileresult(lua_State *L, const char *what) {
  int e = errno;
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, strerror(e));
  lua_pushinteger(L, e);
  return 3;
}

/* ---------------------------------------------------------------- crashes */

/* A real invalid access, not raise(). The address is unmapped but not
   NULL, so UBSan lets it through, and the default action is restored
   first, so ASan's handler does not turn it into an abort. */
static int th_segfault(lua_State *L) {
  volatile uintptr_t bad = 16;
  (void)L;
  signal(SIGSEGV, SIG_DFL);
  *(volatile int *)bad = 42;
  raise(SIGSEGV);
  return 0;
}

static int th_abort(lua_State *L) {
  (void)L;
  abort();
  return 0;
}

/* ---------------------------------------------------------------- values */

static int th_lightuserdata(lua_State *L) {
  lua_pushlightuserdata(L, (void *)(size_t)luaL_optinteger(L, 1, 1));
  return 1;
}

static int th_userdata(lua_State *L) {
  lua_newuserdatauv(L, 16, 0);
  return 1;
}

/* ---------------------------------------------------------------- memory */

/* limit_memory(extra): RLIMIT_AS = this process's current size + extra
   bytes, so that allocating more than `extra` fails (ulimit -v). */
static int th_limit_memory(lua_State *L) {
  lua_Integer extra = luaL_checkinteger(L, 1);
  unsigned long pages = 0;
  struct rlimit rl;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f == NULL) return fileresult(L, "/proc/self/statm");
  if (fscanf(f, "%lu", &pages) != 1) pages = 0;
  fclose(f);
  rl.rlim_cur = rl.rlim_max =
      (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + (rlim_t)extra;
  if (setrlimit(RLIMIT_AS, &rl)) return fileresult(L, "setrlimit");
  lua_pushboolean(L, 1);
  return 1;
}

/* ---------------------------------------------------------------- fds */

/* fds(): {[fd] = link target} of this process ("socket:[123]", a path...). */
static int th_fds(lua_State *L) {
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  int self;
  if (d == NULL) return fileresult(L, "/proc/self/fd");
  self = dirfd(d);
  lua_newtable(L);
  while ((e = readdir(d)) != NULL) {
    char path[64], target[512];
    ssize_t n;
    int fd;
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    fd = atoi(e->d_name);
    if (fd == self) continue;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    n = readlink(path, target, sizeof target - 1);
    if (n < 0) continue;
    target[n] = '\0';
    lua_pushstring(L, target);
    lua_rawseti(L, -2, fd);
  }
  closedir(d);
  return 1;
}

static int th_write(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  size_t n, done = 0;
  const char *s = luaL_checklstring(L, 2, &n);
  while (done < n) {
    ssize_t r = write(fd, s + done, n - done);
    if (r < 0) {
      if (errno == EINTR) continue;
      return fileresult(L, "write");
    }
    done += (size_t)r;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* read(fd, timeout_ms): what is there (waiting up to timeout_ms for the
   first byte), "" on timeout, nil at end of file or on error. */
static int th_read(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  int ms = (int)luaL_optinteger(L, 2, 0);
  lua_Integer most = luaL_optinteger(L, 3, 4096); /* bytes at most */
  struct pollfd p;
  char buf[4096];
  ssize_t r;
  int pr;
  p.fd = fd;
  p.events = POLLIN;
  do pr = poll(&p, 1, ms);
  while (pr < 0 && errno == EINTR);
  if (pr < 0) return fileresult(L, "poll");
  if (pr == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  do r = read(fd, buf, most > 0 && most < 4096 ? (size_t)most : sizeof buf);
  while (r < 0 && errno == EINTR);
  if (r <= 0) /* a pty master reads EIO once the slave side is gone */
    return (r == 0 || errno == EIO) ? 0 : fileresult(L, "read");
  lua_pushlstring(L, buf, (size_t)r);
  return 1;
}

/* inq(fd): bytes waiting to be read on a socket (FIONREAD). */
/* pipe() -> read fd, write fd (the event loop specs' markers) */
static int th_pipe(lua_State *L) {
  int p[2];
  if (pipe(p)) return fileresult(L, "pipe");
  lua_pushinteger(L, p[0]);
  lua_pushinteger(L, p[1]);
  return 2;
}

/* poll(fd, ms) -> true when fd is readable within ms (-1: forever), else
   false: what a host's loop does with a map's m:fd() */
static int th_poll(lua_State *L) {
  struct pollfd p;
  int pr;
  p.fd = (int)luaL_checkinteger(L, 1);
  p.events = POLLIN;
  p.revents = 0;
  do pr = poll(&p, 1, (int)luaL_optinteger(L, 2, -1));
  while (pr < 0 && errno == EINTR);
  if (pr < 0) return fileresult(L, "poll");
  lua_pushboolean(L, pr > 0 && (p.revents & POLLIN));
  return 1;
}

static int th_inq(lua_State *L) {
  int n = 0;
  if (ioctl((int)luaL_checkinteger(L, 1), FIONREAD, &n))
    return fileresult(L, "ioctl");
  lua_pushinteger(L, n);
  return 1;
}

static int th_close(lua_State *L) {
  close((int)luaL_checkinteger(L, 1));
  return 0;
}

/* ---------------------------------------------------------------- processes */

/* pty_spawn(cmd): run /bin/sh -c cmd in a new session whose controlling
   terminal is a new pseudo-terminal (stdin, stdout and stderr). Returns
   pid, master fd (non-blocking reads via read()). */
static int th_pty_spawn(lua_State *L) {
  const char *cmd = luaL_checkstring(L, 1);
  int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  const char *name;
  pid_t pid;
  if (master < 0) return fileresult(L, "posix_openpt");
  if (grantpt(master) || unlockpt(master) || (name = ptsname(master)) == NULL) {
    int e = errno;
    close(master);
    errno = e;
    return fileresult(L, "pty");
  }
  fflush(NULL);
  pid = fork();
  if (pid < 0) {
    int e = errno;
    close(master);
    errno = e;
    return fileresult(L, "fork");
  }
  if (pid == 0) {
    int slave;
    struct sigaction sa;
    setsid();
    slave = open(name, O_RDWR); /* the first tty opened: controlling */
    if (slave < 0) _exit(126);
    ioctl(slave, TIOCSCTTY, 0);
    dup2(slave, 0);
    dup2(slave, 1);
    dup2(slave, 2);
    if (slave > 2) close(slave);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGPIPE, &sa, NULL);
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(127);
  }
  lua_pushinteger(L, pid);
  lua_pushinteger(L, master);
  return 2;
}

/* wait(pid, timeout_ms): "exit", code | "signal", signo once reaped;
   nil if still running after timeout_ms (negative: wait forever). */
static int th_wait(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int ms = (int)luaL_optinteger(L, 2, -1), st;
  struct timespec t0, now;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    pid_t r = waitpid(pid, &st, ms < 0 ? 0 : WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return fileresult(L, "waitpid");
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (ms >= 0 && (now.tv_sec - t0.tv_sec) * 1000 +
                           (now.tv_nsec - t0.tv_nsec) / 1000000 >=
                       ms)
      return 0;
    if (r == 0) {
      struct timespec ts = {0, 2000000};
      nanosleep(&ts, NULL);
    }
  }
  if (WIFEXITED(st)) {
    lua_pushliteral(L, "exit");
    lua_pushinteger(L, WEXITSTATUS(st));
  } else {
    lua_pushliteral(L, "signal");
    lua_pushinteger(L, WIFSIGNALED(st) ? WTERMSIG(st) : -1);
  }
  return 2;
}

static int th_kill(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  if (pid <= 0) return luaL_argerror(L, 1, "a positive pid");
  if (kill(pid, (int)luaL_optinteger(L, 2, SIGKILL)))
    return fileresult(L, "kill");
  lua_pushboolean(L, 1);
  return 1;
}

/* alive(pid): true while pid exists and is not a zombie. */
static int th_alive(lua_State *L) {
  char path[64], buf[512], *p;
  FILE *f;
  size_t n;
  snprintf(path, sizeof path, "/proc/%d/stat",
           (int)luaL_checkinteger(L, 1));
  f = fopen(path, "r");
  if (f == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  p = strrchr(buf, ')'); /* "pid (comm) S ..." */
  lua_pushboolean(L, !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X')));
  return 1;
}

/* disposition(signo): "default", "ignore" or "handler". */
static int th_disposition(lua_State *L) {
  struct sigaction sa;
  if (sigaction((int)luaL_checkinteger(L, 1), NULL, &sa))
    return fileresult(L, "sigaction");
  lua_pushstring(L, sa.sa_handler == SIG_DFL   ? "default"
                    : sa.sa_handler == SIG_IGN ? "ignore"
                                               : "handler");
  return 1;
}

/* no_pdeathsig(): this process no longer dies with its parent (Linux), so
   only end of file on its socket can make a worker leave. */
static int th_no_pdeathsig(lua_State *L) {
#ifdef __linux__
  prctl(PR_SET_PDEATHSIG, 0);
#endif
  (void)L;
  return 0;
}

/* ignore(signo): this process ignores the signal from now on. */
static int th_ignore(lua_State *L) {
  signal((int)luaL_checkinteger(L, 1), SIG_IGN);
  return 0;
}

/* sleep(seconds), without a busy loop. */
static int th_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  struct timespec ts;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) && errno == EINTR) {
  }
  return 0;
}

/* fork_sleep(seconds): fork a child that keeps every fd this process has
   (no exec), sleeps, and leaves with _exit; returns its pid. */
static int th_fork_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  pid_t pid = fork();
  if (pid < 0) return fileresult(L, "fork");
  if (pid == 0) {
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
    _exit(0);
  }
  lua_pushinteger(L, (lua_Integer)pid);
  return 1;
}

/* atexit_note(pid_prefix): an atexit handler, as a host might register,
   that writes "atexit in <pid>\n" to stdout when the process exits
   through exit(). The module stays loaded: lua.c closes the state (and
   unloads C modules) before its exit() runs the handlers. */
static void at_exit_note(void) {
  char buf[64];
  int n = snprintf(buf, sizeof buf, "atexit in %d\n", (int)getpid());
  if (n > 0 && write(1, buf, (size_t)n) < 0) {
  }
}

static int th_atexit_note(lua_State *L) {
  Dl_info info;
  if (dladdr((void *)at_exit_note, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  lua_pushboolean(L, atexit(at_exit_note) == 0);
  return 1;
}

TH_API int luaopen_parmap_testhelper(lua_State *L);

TH_API int luaopen_parmap_testhelper(lua_State *L) {
  static const luaL_Reg funcs[] = {{"segfault", th_segfault},
                                   {"abort", th_abort},
                                   {"lightuserdata", th_lightuserdata},
                                   {"userdata", th_userdata},
                                   {"limit_memory", th_limit_memory},
                                   {"fds", th_fds},
                                   {"write", th_write},
                                   {"read", th_read},
                                   {"inq", th_inq},
                                   {"pipe", th_pipe},
                                   {"poll", th_poll},
                                   {"close", th_close},
                                   {"pty_spawn", th_pty_spawn},
                                   {"wait", th_wait},
                                   {"kill", th_kill},
                                   {"alive", th_alive},
                                   {"disposition", th_disposition},
                                   {"ignore", th_ignore},
                                   {"no_pdeathsig", th_no_pdeathsig},
                                   {"sleep", th_sleep},
                                   {"fork_sleep", th_fork_sleep},
                                   {"atexit_note", th_atexit_note},
                                   {NULL, NULL}};
  luaL_newlib(L, funcs);
  lua_pushinteger(L, SIGINT);
  lua_setfield(L, -2, "SIGINT");
  lua_pushinteger(L, SIGKILL);
  lua_setfield(L, -2, "SIGKILL");
  lua_pushinteger(L, SIGTERM);
  lua_setfield(L, -2, "SIGTERM");
  lua_pushinteger(L, SIGSEGV);
  lua_setfield(L, -2, "SIGSEGV");
  lua_pushinteger(L, SIGABRT);
  lua_setfield(L, -2, "SIGABRT");
  lua_pushinteger(L, SIGPIPE);
  lua_setfield(L, -2, "SIGPIPE");
  return 1;
}
