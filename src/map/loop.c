/*
** map/loop.c: a map that an event loop drives (m:fd(), m:poll(),
** m:timeout()), and per-item stats (stats = true, m:stats()). Part of
** src/map.c (one compilation unit).
**
** m:fd() is an epoll descriptor holding the worker sockets (POLLIN, and
** POLLOUT while a segment is unsent), an eventfd that is set while records
** wait for the loop (or the map is over), and a timerfd armed for the
** engine's own deadlines (timeouts, the waitpid check): it is readable
** whenever m:poll() has something to do. Nobody calls epoll_wait on it but
** the host's loop; m:poll() moves bytes with the engine's own poll(2).
*/
#include "internal.h"

#include <fcntl.h>
#include <stdint.h>

#ifdef __linux__
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#define HAVE_EPOLL 1
#endif

#define REAP_MS 10 /* m:poll(): how often to look for workers to reap */
#define SLOWEST 10 /* m:stats(): the slowest items listed */

/* ---------------------------------------------------------------- stats */

/* 32 bytes an item; rss is never 0 for an item that was recorded */
typedef struct ItemStat {
  uint64_t wall, cpu, rss, grow; /* ns, ns, bytes, bytes */
} ItemStat;

/* The REC_STATS prefix of item `index`'s record (STATS_LEN bytes at p). */
static MAP_COLD int stats_take(lua_State *L, Map *m, lua_Integer index,
                               const char *p) {
  ItemStat *e;
  if (index > m->st_cap) {
    lua_Integer cap = m->st_cap ? m->st_cap : 1024;
    ItemStat *q;
    while (cap < index) cap = cap > LUA_MAXINTEGER / 2 ? index : cap * 2;
    if ((uint64_t)cap > SIZE_MAX / sizeof *q) nomem(L);
    q = (ItemStat *)realloc(m->st, (size_t)cap * sizeof *q);
    if (q == NULL) nomem(L);
    memset(q + m->st_cap, 0, (size_t)(cap - m->st_cap) * sizeof *q);
    m->st = q;
    m->st_cap = cap;
  }
  e = &m->st[index - 1];
  if (!e->rss) m->st_n++;
  memcpy(&e->wall, p, 8);
  memcpy(&e->cpu, p + 8, 8);
  memcpy(&e->rss, p + 16, 8);
  memcpy(&e->grow, p + 24, 8);
  if (!e->rss) e->rss = 1; /* recorded, whatever the kernel said */
  return 0;
}

static void push_item_stat(lua_State *L, const ItemStat *e, lua_Integer i) {
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, i);
  lua_setfield(L, -2, "index");
  lua_pushnumber(L, (lua_Number)e->wall / 1e9);
  lua_setfield(L, -2, "wall");
  lua_pushnumber(L, (lua_Number)e->cpu / 1e9);
  lua_setfield(L, -2, "cpu");
  lua_pushinteger(L, (lua_Integer)e->rss);
  lua_setfield(L, -2, "rss");
  lua_pushinteger(L, (lua_Integer)e->grow);
  lua_setfield(L, -2, "rss_growth");
}

static void setnum(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, (lua_Number)v);
  lua_setfield(L, -2, k);
}

/* m:stats([i]): the summary, or item i's numbers (nil: none recorded). */
static int map_stats(lua_State *L) {
  Map *m = checkmap(L, 1);
  lua_Integer i, n = 0, top[SLOWEST];
  int ntop = 0, k;
  double busy = 0, cpu = 0, wall, cap;
  uint64_t maxrss = 0, end;
  if (!m->cfg.stats)
    return luaL_error(L, "parmap: this map records no stats (start it with "
                         "the option stats = true)");
  if (!lua_isnoneornil(L, 2)) {
    i = luaL_checkinteger(L, 2);
    if (i < 1 || i > m->st_cap || !m->st[i - 1].rss) return 0;
    push_item_stat(L, &m->st[i - 1], i);
    return 1;
  }
  for (i = 1; i <= m->st_cap; i++) {
    const ItemStat *e = &m->st[i - 1];
    if (!e->rss) continue;
    n++;
    busy += (double)e->wall;
    cpu += (double)e->cpu;
    if (e->rss > maxrss) maxrss = e->rss;
    /* the SLOWEST slowest so far, slowest first (insertion) */
    if (ntop < SLOWEST || e->wall > m->st[top[ntop - 1] - 1].wall) {
      k = ntop < SLOWEST ? ntop++ : ntop - 1;
      while (k > 0 && m->st[top[k - 1] - 1].wall < e->wall) {
        top[k] = top[k - 1];
        k--;
      }
      top[k] = i;
    }
  }
  end = m->t_end ? m->t_end : parmap_now_ns();
  wall = (double)(end - m->t_start) / 1e9;
  busy /= 1e9;
  cpu /= 1e9;
  cap = wall * m->cfg.N; /* the workers' time the map had */
  lua_createtable(L, 0, 14);
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "items");
  lua_pushinteger(L, m->cfg.N);
  lua_setfield(L, -2, "workers");
  setnum(L, "wall", wall);
  setnum(L, "busy", busy);
  setnum(L, "cpu", cpu);
  lua_createtable(L, 0, 2);
  setnum(L, "wall", n ? busy / (double)n : 0);
  setnum(L, "cpu", n ? cpu / (double)n : 0);
  lua_setfield(L, -2, "mean");
  lua_pushinteger(L, (lua_Integer)maxrss);
  lua_setfield(L, -2, "maxrss");
  setnum(L, "parallelism", wall > 0 ? busy / wall : 0);
  setnum(L, "overhead", cap > busy ? cap - busy : 0);
  setnum(L, "overhead_share", cap > busy ? (cap - busy) / cap : 0);
  setnum(L, "overhead_per_item", n && cap > busy ? (cap - busy) / (double)n : 0);
  lua_createtable(L, ntop, 0);
  for (k = 0; k < ntop; k++) {
    push_item_stat(L, &m->st[top[k] - 1], top[k]);
    lua_rawseti(L, -2, k + 1);
  }
  lua_setfield(L, -2, "slowest");
  lua_pushboolean(L, m->t_end != 0);
  lua_setfield(L, -2, "over");
  return 1;
}

/* ---------------------------------------------------------------- loop */

/* ms until the engine wants a step without any socket being ready
   (timeouts, the waitpid check, reaping at the end), or -1: never. */
static int wake_ms(Map *m) {
  int i, any = 0, t, h;
  if (m->state != M_RUNNING || m->w == NULL) return -1;
  if (m->reaping) return REAP_MS;
  for (i = 0; i < m->nw && !any; i++) any = m->w[i].pid > 0;
  h = held_ms(m); /* retry_delay: an item waits its time */
  if (!any) return h;
  t = check_timeouts(m, 0);
  if (t < 0 || t > EXIT_CHECK_MS) t = EXIT_CHECK_MS;
  return h >= 0 && h < t ? h : t;
}

/* Something for m:poll() without I/O: records to take, or the end. */
static int due_now(Map *m) {
  return m->state != M_RUNNING || m->close_req || ready(m) != NULL ||
         (finished(m) && !m->reaping);
}

#ifdef HAVE_EPOLL
static void ev_set(Map *m, int on) {
  uint64_t v = 1;
  ssize_t r;
  if (m->ev_on == on) return;
  if (on)
    r = write(m->evfd, &v, sizeof v);
  else
    r = read(m->evfd, &v, sizeof v);
  (void)r; /* EAGAIN: already so */
  m->ev_on = on;
}

static void arm(Map *m, int ms) {
  struct itimerspec it;
  memset(&it, 0, sizeof it);
  if (ms >= 0) { /* 0 disarms: the shortest wait is 1 ns */
    it.it_value.tv_sec = ms / 1000;
    it.it_value.tv_nsec = (long)(ms % 1000) * 1000000L + 1;
  }
  timerfd_settime(m->tfd, 0, &it, NULL); /* re-arming clears a tick */
}

/* The epoll set as the engine is now: every live worker's socket, with
   POLLOUT while it has something unsent; the eventfd; the timer. */
static void sync_loop(lua_State *L, Map *m) {
  int i;
  if (m->ep < 0 || m->owner != getpid()) return;
  if (m->state == M_RUNNING && m->w) {
    for (i = 0; i < m->nw; i++) {
      Worker *w = &m->w[i];
      unsigned ev = EPOLLIN | (w->nsent < w->qn ? EPOLLOUT : 0u);
      struct epoll_event e;
      memset(&e, 0, sizeof e);
      e.events = ev;
      e.data.u32 = (uint32_t)i;
      if (m->ep_fd[i] >= 0 && m->ep_fd[i] != w->fd) unwatch(m, i);
      if (w->fd < 0) continue;
      if (m->ep_fd[i] < 0) {
        if (epoll_ctl(m->ep, EPOLL_CTL_ADD, w->fd, &e) && errno != EEXIST)
          luaL_error(L, "parmap: epoll_ctl: %s", strerror(errno));
        m->ep_fd[i] = w->fd;
        m->ep_ev[i] = ev;
      } else if (m->ep_ev[i] != ev) {
        if (epoll_ctl(m->ep, EPOLL_CTL_MOD, w->fd, &e))
          luaL_error(L, "parmap: epoll_ctl: %s", strerror(errno));
        m->ep_ev[i] = ev;
      }
    }
    if (m->op && m->cfg.output == OUT_LINES) /* a worker's lines wake it */
      for (i = 0; i < m->nw; i++) {
        OutPipe *o = &m->op[i];
        int k;
        for (k = 0; k < 2; k++) {
          struct epoll_event e;
          if (o->fd[k] < 0 || o->ep[k]) continue;
          memset(&e, 0, sizeof e);
          e.events = EPOLLIN;
          e.data.u32 = UINT32_MAX;
          if (epoll_ctl(m->ep, EPOLL_CTL_ADD, o->fd[k], &e))
            luaL_error(L, "parmap: epoll_ctl: %s", strerror(errno));
          o->ep[k] = 1;
        }
      }
  }
  ev_set(m, due_now(m));
  arm(m, wake_ms(m));
}
#else
static void sync_loop(lua_State *L, Map *m) {
  (void)L;
  (void)m;
}
#endif

/* Worker entry wi's socket is about to close: out of the epoll set first
   (the set holds open files, not numbers; a copy of the fd in a child
   could keep a closed socket in it). */
static void unwatch(Map *m, int wi) {
#ifdef HAVE_EPOLL
  if (m->ep < 0 || m->ep_fd == NULL || m->ep_fd[wi] < 0) return;
  epoll_ctl(m->ep, EPOLL_CTL_DEL, m->ep_fd[wi], NULL);
  m->ep_fd[wi] = -1;
#else
  (void)m;
  (void)wi;
#endif
}

static void loop_close(Map *m) {
  int mine = m->owner == getpid(); /* a forked copy's numbers are not its */
  if (m->op) {
    int i;
    for (i = 0; i < m->nw; i++) m->op[i].ep[0] = m->op[i].ep[1] = 0;
  }
  if (m->ep >= 0 && mine) {
    parmap_fd_close(m->ep);
    parmap_fd_close(m->evfd);
    parmap_fd_close(m->tfd);
  }
  m->ep = m->evfd = m->tfd = -1;
  free(m->ep_fd);
  free(m->ep_ev);
  m->ep_fd = NULL;
  m->ep_ev = NULL;
}

static void loop_release(Map *m) {
  loop_close(m);
  free(m->st);
  m->st = NULL;
  m->st_cap = m->st_n = 0;
}

#ifdef HAVE_EPOLL
/* An engine fd is never 0, 1 or 2 (see parmap_socketpair). */
static int high_fd(int fd) {
  int h;
  if (fd < 0 || fd > 2) return fd;
  h = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  close(fd);
  return h;
}
#endif

/* m:fd(): the descriptor to watch for reading (made on the first call). */
static int map_fd(lua_State *L) {
  Map *m = checkmap(L, 1);
  if (m->owner != getpid())
    return luaL_error(L, "parmap: m:fd() of a map that belongs to process %d",
                      (int)m->owner);
#ifdef HAVE_EPOLL
  if (m->ep < 0) {
    struct epoll_event e;
    int i, err;
    m->ep_fd = (int *)malloc((size_t)m->nw * sizeof *m->ep_fd);
    m->ep_ev = (unsigned *)calloc((size_t)m->nw, sizeof *m->ep_ev);
    if (!m->ep_fd || !m->ep_ev) {
      loop_close(m);
      nomem(L);
    }
    for (i = 0; i < m->nw; i++) m->ep_fd[i] = -1;
    m->ep = high_fd(epoll_create1(EPOLL_CLOEXEC));
    m->evfd = high_fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    m->tfd = high_fd(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    memset(&e, 0, sizeof e);
    e.events = EPOLLIN;
    e.data.u32 = UINT32_MAX;
    if (m->ep < 0 || m->evfd < 0 || m->tfd < 0 ||
        epoll_ctl(m->ep, EPOLL_CTL_ADD, m->evfd, &e) ||
        epoll_ctl(m->ep, EPOLL_CTL_ADD, m->tfd, &e)) {
      err = errno;
      if (m->ep >= 0) close(m->ep);
      if (m->evfd >= 0) close(m->evfd);
      if (m->tfd >= 0) close(m->tfd);
      m->ep = m->evfd = m->tfd = -1;
      loop_close(m);
      return luaL_error(L, "parmap: m:fd(): %s", strerror(err));
    }
    /* a worker or ReturnProcess forked later closes them */
    parmap_fd_register(m->ep);
    parmap_fd_register(m->evfd);
    parmap_fd_register(m->tfd);
    m->ev_on = 0;
    sync_loop(L, m);
  }
  lua_pushinteger(L, m->ep);
  return 1;
#else
  return luaL_error(L, "parmap: m:fd() needs epoll (Linux); drive the map "
                       "with m:poll() and m:timeout()");
#endif
}

/* m:events(): what to watch m:fd() for (cqueues asks its objects so). */
static int map_events(lua_State *L) {
  checkmap(L, 1);
  lua_pushliteral(L, "r");
  return 1;
}

/* m:timeout(): seconds until m:poll() is due even if m:fd() stays quiet
   (0: now; nil: never), for a loop that does not watch the fd alone. */
static int map_timeout(lua_State *L) {
  Map *m = checkmap(L, 1);
  int ms;
  if (due_now(m)) {
    lua_pushnumber(L, 0);
    return 1;
  }
  ms = wake_ms(m);
  if (ms < 0) return 0;
  lua_pushnumber(L, (lua_Number)ms / 1000.0);
  return 1;
}

/* With every item delivered, the workers must be gone before the map ends
   (their finish is over when the loop ends): let the idle ones go and reap
   those that left, without waiting; a finish past finish_timeout is
   stopped as in stop. Returns 1 when none is left. */
static int all_reaped(lua_State *L, Map *m) {
  int i, left = 0;
  uint64_t now = parmap_now_ns();
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (live(w)) retire(m, w); /* its work is done: it runs finish and goes */
    if (w->pid) {
      reap_retired(L, m, i, 0);
      if (w->pid) {
        bound_finish(m, w, now, 0);
        left = 1;
      }
    }
  }
  m->reaping = left;
  return !left;
}

/* The body of m:poll(), run by step_with: the next ready record (index
   and values), false when none is ready yet, nothing when the map is
   over. Takes what is ready first; moves bytes at most once, and never
   waits. */
static int poll_body(lua_State *L) {
  Map *m = (Map *)lua_touserdata(L, 1);
  int pass;
  m->self = 1;
  for (pass = 0;; pass++) {
    Slot *s;
    uint64_t now;
    if (m->close_req) return 0; /* closed from a callback: step stops it */
    s = ready(m);
    if (s) return emit(L, m, s);
    if (finished(m)) {
      if (!all_reaped(L, m)) break;
      return over(L, m);
    }
    if (pass) break;
    pump(L, m, 0);
    now = parmap_now_ns(); /* deaths that no end of file shows */
    if (now - m->exit_check >= (uint64_t)EXIT_CHECK_MS * 1000000u) {
      m->exit_check = now;
      check_exits(L, m);
    }
    /* what a death left (the item's failure record, its other items, a
       worker to fork) is dispatched now: the blocking loop's next pump
       would, and no fd would wake this loop for it */
    if (!m->close_req) dispatch(L, m);
    progress(L, m, 0);
  }
  lua_pushboolean(L, 0);
  return 1;
}

static int poll_entry(lua_State *L) {
  Map *m = (Map *)lua_touserdata(L, 1);
  return step_with(L, m, 1, poll_body);
}

/* m:poll(): one step that never blocks: `i, values...` of a ready item
   (as the for loop gets them), false when none is ready yet, nothing when
   the map is over. An item's failure goes to the map's policy, as in the
   for loop. Afterwards m:fd() is readable exactly when another call has
   something to do. */
static int map_poll(lua_State *L) {
  Map *m = checkmap(L, 1);
  int status, n;
  if (m->owner != getpid()) /* a forked copy: its records are stale */
    return luaL_error(L, "parmap: a map cannot be stepped from a worker or "
                      "child process (it belongs to process %d)",
                      (int)m->owner);
  lua_settop(L, 1);
  lua_pushcfunction(L, poll_entry);
  lua_pushvalue(L, 1);
  status = lua_pcall(L, 1, LUA_MULTRET, 0);
  n = lua_gettop(L) - 1;
  if (status != LUA_OK) {
    sync_loop(L, m); /* stopped: readable, and later calls say so */
    return lua_error(L);
  }
#ifdef HAVE_EPOLL
  if (m->ep >= 0) {
    if (n > 0 && lua_toboolean(L, 2))
      ev_set(m, 1); /* an item: call again (what it set going may need
                       POLLOUT); the call that finds nothing syncs */
    else
      sync_loop(L, m);
  }
#endif
  return n;
}
