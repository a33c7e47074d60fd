/*
** process.c: ReturnProcess. One call, target(args...[, kw]), run in a
** forked child; its values (or its error) come back on join.
**
** The child inherits target, args and kwargs (nothing is serialized on the
** way in), runs the call under a message handler, and writes one message:
** a 64-bit length, then a record tag (REC_OK or REC_ERR, as in a map) and a
** codec record. It leaves with _exit(). The parent reads the message while it
** waits, so a child with a large result never blocks on a full socket while
** the parent blocks in waitpid. A child that ends without a whole message
** died: join reports how (exit status or signal).
*/
#define _GNU_SOURCE
#include <errno.h>
#include <lauxlib.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "child.h"
#include "codec.h"
#include "engine.h"
#include "proc.h"
#include "spec.h"
#include "process.h"

#define PROC_MT "parmap.ReturnProcess"
#define POLL_SLICE_MS 100 /* join looks for a vanished child this often */

/* User values of a ReturnProcess userdata. */
enum {
  PV_TARGET = 1,
  PV_ARGS,
  PV_KW,
  PV_MKERR,   /* make_error(index, kind, err, message, traceback, pid) */
  PV_DESC,    /* describe("result", nil, values...) */
  PV_SCRATCH, /* the codec's scratch table */
  PV_RESULT,  /* {n = n, values...}, or the error object */
  PV_FAIL,    /* fail(e): the error policy (lua/parmap/errors.lua) */
  PV_COUNT = PV_FAIL
};

enum { P_NEW, P_RUNNING, P_SETTLED };
enum { RES_NONE, RES_OK, RES_ERR };

typedef struct Proc {
  pid_t pid, owner; /* the child, and the process that started it */
  int fd;           /* our end of the socket, -1 once at end of file */
  int state, result;
  int reaped, status, lost; /* lost: someone else reaped it */
  int has_kw, nargs;
  int settling; /* settle runs: it reads `in`, and may run finalizers */
  parmap_buf in;
} Proc;

static Proc *checkproc(lua_State *L, int idx) {
  return (Proc *)luaL_checkudata(L, idx, PROC_MT);
}

/* ---------------------------------------------------------------- child */

/* child_main(proc, fd): runs under lua_pcall in the child; never returns. */
static int child_main(lua_State *L) {
  Proc *p = (Proc *)lua_touserdata(L, 1);
  int fd = (int)lua_tointeger(L, 2);
  int ud = 3, msgh, fnpos, n, scratch, desc;
  parmap_buf out = PARMAP_BUF_INIT;
  CallSpec cs;
  uint64_t len;
  /* tracebacks stop above child_main; no map's worker */
  parmap_child_start(L, 0, 0, 0);
  parmap_child_gc_defer(L);
  luaL_checkstack(L, 16, NULL);
  lua_pushcfunction(L, parmap_msgh);
  msgh = lua_gettop(L);
  lua_getiuservalue(L, ud, PV_SCRATCH);
  scratch = lua_gettop(L);
  lua_getiuservalue(L, ud, PV_DESC);
  desc = lua_gettop(L);
  lua_getiuservalue(L, ud, PV_TARGET);
  cs.fn = lua_gettop(L);
  lua_getiuservalue(L, ud, PV_ARGS);
  cs.args = lua_gettop(L);
  lua_getiuservalue(L, ud, PV_KW);
  cs.kw = lua_gettop(L);
  cs.star = STAR_NONE;
  cs.kwstar = 0;
  cs.has_kw = p->has_kw;
  cs.nargs = p->nargs;
  n = parmap_push_call(L, &cs, cs.fn, 0); /* the item is not used */
  if (n < 0) return lua_error(L);
  fnpos = lua_gettop(L) - n;
  if (parmap_buf_reserve(&out, 16)) luaL_error(L, "not enough memory");
  out.len = sizeof len;
  if (lua_pcall(L, n, LUA_MULTRET, msgh) == LUA_OK) {
    parmap_put_result(L, &out, fnpos, scratch, desc, 0, getpid());
  } else {
    int box = lua_gettop(L);
    parmap_unbox(L, box); /* err, message, traceback */
    parmap_put_error(L, &out, scratch, "error", box, lua_tostring(L, box + 1),
                     lua_tostring(L, box + 2), getpid());
  }
  len = (uint64_t)(out.len - sizeof len);
  memcpy(out.p, &len, sizeof len);
  parmap_write_all(fd, out.p, out.len); /* if the parent is gone: no one
                                            wants it */
  parmap_child_exit(0);
  return 0;
}

static void run_child(lua_State *L, Proc *p, int ud, int fd) {
  int code = PARMAP_EXIT_INTERNAL;
  parmap_clear_interrupt(L); /* a Ctrl-C pending in the parent is its own */
  if (lua_checkstack(L, 8)) {
    lua_pushcfunction(L, child_main);
    lua_pushlightuserdata(L, p);
    lua_pushinteger(L, fd);
    lua_pushvalue(L, ud);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK)
      fprintf(stderr, "parmap ReturnProcess %d: %s\n", (int)getpid(),
              lua_isstring(L, -1) ? lua_tostring(L, -1) : "internal error");
  }
  parmap_child_exit(code); /* child_main never returns when all goes
                               well */
}

/* ---------------------------------------------------------------- parent */

/* Read what is there without blocking; close at end of file. */
static void drain(Proc *p) {
  while (p->fd >= 0) {
    size_t want = 65536;
    ssize_t r;
    if (p->in.len >= sizeof(uint64_t)) { /* the whole message at once */
      uint64_t len;
      memcpy(&len, p->in.p, sizeof len);
      if (len + sizeof len > p->in.len && len < ((uint64_t)1 << 40))
        want = (size_t)(len + sizeof len - p->in.len);
      if (want < 65536) want = 65536;
    }
    if (parmap_buf_reserve(&p->in, want)) want = p->in.cap - p->in.len;
    if (want == 0) break; /* out of memory: the message will be short */
    r = parmap_recv_some(p->fd, p->in.p + p->in.len, p->in.cap - p->in.len);
    if (r > 0) {
      p->in.len += (size_t)r;
      continue;
    }
    if (r == -2) return; /* nothing more for now */
    parmap_fd_close(p->fd); /* end of file, or an error: the child is done */
    p->fd = -1;
  }
}

/* Reap the child if it has ended, by the deadline (ns; negative: wait
   until it does; 0: only look). 1 once it is reaped (lost: by someone
   else, such as a host's SIGCHLD handler), 0 while it runs. */
static int try_reap(lua_State *L, Proc *p, int64_t deadline_ns) {
  int st = 0, r;
  if (p->reaped) return 1;
  r = parmap_child_reap(L, p->pid, &st, deadline_ns);
  if (r == 0) return 0;
  p->reaped = 1;
  p->status = st;
  p->lost = r < 0;
  return 1;
}

/* The child is gone: what it sent is all in the socket by now. Read it and
   close, without waiting for end of file (a process it forked may hold the
   socket open). */
static void drain_rest(Proc *p) {
  drain(p);
  if (p->fd >= 0) {
    parmap_fd_close(p->fd);
    p->fd = -1;
  }
}

/* The error object for a child that ended without a whole message. */
static void push_died(lua_State *L, Proc *p, int ud, const char *why) {
  char how[160], msg[400];
  parmap_child_how(how, sizeof how, p->lost, p->status);
  snprintf(msg, sizeof msg, "process %d %s %s", (int)p->pid, how, why);
  lua_getiuservalue(L, ud, PV_MKERR);
  lua_pushnil(L);
  lua_pushliteral(L, "died");
  lua_pushstring(L, msg);
  lua_pushstring(L, msg);
  lua_pushliteral(L, "");
  lua_pushinteger(L, (lua_Integer)p->pid);
  lua_call(L, 6, 1);
}

/* Turn the message into the result (the child is reaped). */
static void settle(lua_State *L, Proc *p, int ud) {
  uint64_t len = 0;
  size_t pos = sizeof len + 1;
  int top = lua_gettop(L);
  p->settling = 1; /* decoding allocates: a finalizer may call p:close() */
  if (p->in.len >= sizeof len) memcpy(&len, p->in.p, sizeof len);
  if (p->in.len < sizeof len || len == 0 || len != p->in.len - sizeof len) {
    push_died(L, p, ud, "before it returned");
    p->result = RES_ERR;
  } else {
    const char *err = NULL;
    int tag = (unsigned char)p->in.p[sizeof len];
    int n;
    lua_getiuservalue(L, ud, PV_SCRATCH);
    n = parmap_decode(L, p->in.p, p->in.len, &pos, top + 1, &err);
    if (n < 0 || pos != p->in.len || (tag != REC_OK && tag != REC_ERR) ||
        (tag == REC_ERR &&
         (n != 5 || lua_type(L, top + 2) != LUA_TSTRING ||
          lua_type(L, top + 4) != LUA_TSTRING))) {
      lua_settop(L, top);
      push_died(L, p, ud, "and sent a corrupt result");
      p->result = RES_ERR;
    } else if (tag == REC_OK) {
      int k;
      lua_createtable(L, n, 1);
      for (k = n; k >= 1; k--) {
        lua_pushvalue(L, -2);
        lua_rawseti(L, -2, k);
        lua_remove(L, -2);
      }
      lua_pushinteger(L, n);
      lua_setfield(L, -2, "n");
      p->result = RES_OK;
    } else {
      int k;
      lua_getiuservalue(L, ud, PV_MKERR);
      lua_pushnil(L);
      for (k = 1; k <= 5; k++) lua_pushvalue(L, top + 1 + k);
      lua_call(L, 6, 1);
      p->result = RES_ERR;
    }
  }
  lua_setiuservalue(L, ud, PV_RESULT);
  lua_settop(L, top);
  parmap_buf_free(&p->in);
  p->state = P_SETTLED;
  p->settling = 0;
}

/* Wait until the result is in, or until the deadline (ns, negative: none).
   Returns 1 when settled, 0 on timeout. */
static int finish(lua_State *L, Proc *p, int ud, int64_t deadline) {
  /* Lua code runs in here (hooks, finalizers): it may close p, or join it
     (settle it) before we do, so look again after each wait */
  if (p->state == P_SETTLED) return 1;
  while (p->fd >= 0 && p->state != P_SETTLED) {
    struct pollfd pfd;
    int ms = parmap_deadline_ms(deadline, POLL_SLICE_MS), r;
    pfd.fd = p->fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    r = poll(&pfd, 1, ms);
    if (r < 0) {
      if (errno != EINTR)
        luaL_error(L, "parmap: ReturnProcess: poll: %s", strerror(errno));
      parmap_run_hooks(L);
      continue;
    }
    if (r > 0) drain(p);
    else parmap_run_hooks(L); /* a signal that came between two polls */
    if (p->fd >= 0) { /* no end of file yet: is the child gone anyway? */
      if (try_reap(L, p, 0))
        drain_rest(p);
      else if (deadline >= 0 && (int64_t)parmap_now_ns() >= deadline)
        return 0;
    }
  }
  if (p->state == P_SETTLED) return 1;
  if (!try_reap(L, p, deadline)) return 0;
  if (p->state != P_SETTLED) settle(L, p, ud);
  return 1;
}

/* The settled result: its values, or what the policy makes of its error. */
static int deliver(lua_State *L, Proc *p, int ud) {
  lua_getiuservalue(L, ud, PV_RESULT);
  if (p->result == RES_OK) {
    lua_Integer n, k;
    int t = lua_gettop(L);
    lua_getfield(L, t, "n");
    n = lua_tointeger(L, -1);
    lua_pop(L, 1);
    luaL_checkstack(L, (int)n, "too many results");
    for (k = 1; k <= n; k++) lua_rawgeti(L, t, k);
    return (int)n;
  }
  lua_getiuservalue(L, ud, PV_FAIL);
  lua_insert(L, -2);
  lua_call(L, 1, 1); /* raises, or returns the error object */
  return 1;
}

/* The deadline (ns) of join/wait's timeout argument at idx, -1 for none.
   A number only, never a numeric string, as every option of parmap; the
   message shows the value as lua/parmap.lua's option errors do. */
static int64_t deadline_arg(lua_State *L, int idx, const char *method) {
  lua_Number t = 0;
  if (lua_isnoneornil(L, idx)) return -1;
  if (lua_type(L, idx) == LUA_TNUMBER) t = lua_tonumber(L, idx);
  if (lua_type(L, idx) != LUA_TNUMBER || !(t >= 0)) {
    const char *got;
    if (lua_type(L, idx) == LUA_TNUMBER)
      got = t != t ? "nan" : luaL_tolstring(L, idx, NULL);
    else if (lua_type(L, idx) == LUA_TSTRING)
      got = lua_pushfstring(L, "string \"%s\"", lua_tostring(L, idx));
    else
      got = luaL_typename(L, idx);
    luaL_error(L, "parmap: ReturnProcess: bad argument #1 'timeout' to '%s' "
               "(non-negative number of seconds expected, got %s)", method,
               got);
  }
  if (t > 1e9) return -1; /* forever, near enough */
  return (int64_t)parmap_now_ns() + (int64_t)(t * 1e9);
}

/* A forked copy of p (in p's own child, or in a worker or child forked by
   the process that started p) holds the state p had at the fork: it must
   neither wait for the child nor read the fd number, which the fork closed
   and may now name another file. Only the process that started p may. */
static void need_started(lua_State *L, Proc *p, const char *what) {
  if (p->state == P_NEW)
    luaL_error(L, "parmap: ReturnProcess: %s before start", what);
  if (p->state == P_RUNNING && p->owner != getpid()) {
    if (p->pid == getpid())
      luaL_error(L, "parmap: ReturnProcess: cannot %s a process from inside "
                 "itself", what);
    luaL_error(L, "parmap: ReturnProcess: cannot %s a process started by "
               "another process (pid %d)", what, (int)p->owner);
  }
}

/* p:start(): fork; returns p. */
static int p_start(lua_State *L) {
  Proc *p = checkproc(L, 1);
  int fd;
  pid_t pid;
  if (p->state != P_NEW)
    return luaL_error(L, "parmap: ReturnProcess: already started");
  lua_settop(L, 1);
  parmap_run_hooks(L); /* a pending Ctrl-C raises here, not in the child */
  parmap_child_gc_settle(L);
  pid = parmap_child_spawn(&fd);
  if (pid < 0)
    return luaL_error(L, "parmap: ReturnProcess: cannot fork: %s",
                      strerror(errno));
  if (pid == 0) { /* the child's copy of p reads as started, by its parent */
    p->pid = getpid();
    p->owner = getppid();
    p->fd = -1;
    p->state = P_RUNNING;
    run_child(L, p, 1, fd); /* never returns */
  }
  p->pid = pid;
  p->owner = getpid();
  p->fd = fd;
  p->state = P_RUNNING;
  return 1;
}

/* p:join([timeout]): target's values; nil, "timeout" when it passes. */
static int p_join(lua_State *L) {
  Proc *p = checkproc(L, 1);
  int64_t deadline = deadline_arg(L, 2, "join");
  need_started(L, p, "join");
  lua_settop(L, 1);
  if (!finish(L, p, 1, deadline)) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  return deliver(L, p, 1);
}

/* p:wait([timeout]): true once the result is in, false on timeout. */
static int p_wait(lua_State *L) {
  Proc *p = checkproc(L, 1);
  int64_t deadline = deadline_arg(L, 2, "wait");
  need_started(L, p, "wait");
  lua_settop(L, 1);
  lua_pushboolean(L, finish(L, p, 1, deadline));
  return 1;
}

/* p:is_alive(): is target still running? (never blocks) */
static int p_is_alive(lua_State *L) {
  Proc *p = checkproc(L, 1);
  lua_settop(L, 1);
  if (p->state != P_RUNNING) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (p->owner != getpid() && p->pid == getpid()) { /* asked by itself */
    lua_pushboolean(L, 1);
    return 1;
  }
  need_started(L, p, "check on");
  drain(p); /* lets a child with a large result finish */
  if (!try_reap(L, p, 0)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  drain_rest(p);
  lua_pushboolean(L, !finish(L, p, 1, -1));
  return 1;
}

static int p_pid(lua_State *L) {
  Proc *p = checkproc(L, 1);
  if (p->state == P_NEW) lua_pushnil(L);
  else lua_pushinteger(L, (lua_Integer)p->pid);
  return 1;
}

/* p:exitcode(): nil while it runs; its exit status, or -signal. */
static int p_exitcode(lua_State *L) {
  Proc *p = checkproc(L, 1);
  if (!p->reaped || p->lost) lua_pushnil(L);
  else if (WIFEXITED(p->status)) lua_pushinteger(L, WEXITSTATUS(p->status));
  else if (WIFSIGNALED(p->status)) lua_pushinteger(L, -WTERMSIG(p->status));
  else lua_pushnil(L);
  return 1;
}

static int p_signal(lua_State *L, int sig) {
  Proc *p = checkproc(L, 1);
  need_started(L, p, sig == SIGTERM ? "terminate" : "kill");
  if (!p->reaped && p->owner == getpid()) kill(p->pid, sig);
  lua_settop(L, 1);
  return 1;
}

static int p_terminate(lua_State *L) { return p_signal(L, SIGTERM); }
static int p_kill(lua_State *L) { return p_signal(L, SIGKILL); }

/* Kill and reap a child still running; close our end. Only in the process
   that started it: a forked copy of ours must not touch it (nor the fd
   number, which the fork closed and may have been reused). */
static void stop(Proc *p) {
  if (p->state != P_RUNNING || p->owner != getpid()) return;
  if (!p->reaped) {
    kill(p->pid, SIGKILL);
    try_reap(NULL, p, -1); /* from __gc too: no hooks */
  }
  if (p->fd >= 0) {
    parmap_fd_close(p->fd);
    p->fd = -1;
  }
}

/* p:close() and <close>: a result already in is kept; else the child is
   killed and join reports that. */
static int p_close(lua_State *L) {
  Proc *p = checkproc(L, 1);
  lua_settop(L, 1);
  if (p->state != P_RUNNING || p->owner != getpid()) return 0;
  if (p->settling) return 0; /* reaped already; its result is on the way */
  drain(p);
  stop(p);
  settle(L, p, 1);
  return 0;
}

static int p_gc(lua_State *L) {
  Proc *p = checkproc(L, 1);
  stop(p);
  parmap_buf_free(&p->in);
  return 0;
}

static int p_tostring(lua_State *L) {
  Proc *p = checkproc(L, 1);
  if (p->state == P_NEW)
    lua_pushfstring(L, "%s (not started)", PROC_MT);
  else
    lua_pushfstring(L, "%s (pid %d, %s)", PROC_MT, (int)p->pid,
                    p->state == P_SETTLED ? "done" : "running");
  return 1;
}

/* A spec's fields kept as user values (besides the call's). */
static const int CALL_UV[3] = {PV_TARGET, PV_ARGS, PV_KW};
static const ParmapField FIELDS[] = {{"make_error", PV_MKERR, LUA_TFUNCTION, 0},
                                     {"describe", PV_DESC, LUA_TFUNCTION, 0},
                                     {"fail", PV_FAIL, LUA_TFUNCTION, 0},
                                     {NULL, 0, 0, 0}};

/* core.process(spec): a ReturnProcess, not started. spec: target, args,
   nargs, kwargs, has_kw, make_error, describe, fail. */
static int p_new(lua_State *L) {
  Proc *p;
  int ud;
  CallSpec cs;
  luaL_checktype(L, 1, LUA_TTABLE);
  p = (Proc *)lua_newuserdatauv(L, sizeof(Proc), PV_COUNT);
  memset(p, 0, sizeof *p);
  p->fd = -1;
  p->state = P_NEW;
  luaL_setmetatable(L, PROC_MT);
  ud = lua_gettop(L);
  parmap_read_call(L, 1, &cs);
  p->nargs = cs.nargs;
  p->has_kw = cs.has_kw;
  parmap_setfields(L, 1, ud, "target", p->nargs, CALL_UV, FIELDS,
                   PV_SCRATCH);
  return 1;
}

void parmap_process_register(lua_State *L) {
  static const luaL_Reg meta[] = {{"__gc", p_gc},
                                  {"__close", p_close},
                                  {"__tostring", p_tostring},
                                  {NULL, NULL}};
  static const luaL_Reg methods[] = {
      {"start", p_start},         {"join", p_join},
      {"wait", p_wait},           {"is_alive", p_is_alive},
      {"pid", p_pid},             {"exitcode", p_exitcode},
      {"terminate", p_terminate}, {"kill", p_kill},
      {"close", p_close},         {NULL, NULL}};
  if (luaL_newmetatable(L, PROC_MT)) {
    luaL_setfuncs(L, meta, 0);
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, p_new);
  lua_setfield(L, -2, "process");
}
