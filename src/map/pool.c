/*
** map/pool.c: the workers of a map and their transport: forking, handing
** out segments (dispatch), pump (poll, sends, reads), deaths, timeouts,
** recycling (maxtasks), stopping. Part of src/map.c (one compilation unit).
*/
#include "internal.h"

/* used before they are defined */
static int send_more(Map *m, Worker *w);
static void on_death(lua_State *L, Map *m, int wi);
static void raise_init(lua_State *L, Map *m, int id, int first);

/* ---------------------------------------------------------------- workers */

/* A worker that takes work: forked, not let go. */
static int live(const Worker *w) { return w->fd >= 0 && !w->retiring; }

/* Workers let go and not yet reaped. */
static int nretiring(const Map *m) {
  int i, n = 0;
  for (i = 0; i < m->nw; i++) n += m->w[i].pid && m->w[i].retiring;
  return n;
}

static void spawn_failed(lua_State *L, Map *m, int err) {
  /* a process that is retiring still counts (RLIMIT_NPROC): once it is
     reaped there is room, so wait for that and fork again */
  if (nretiring(m) > 0) {
    m->spawn_wait = 1;
    return;
  }
  if (m->nlive > 0) { /* carry on with the workers we have */
    m->cfg.N = m->nlive;
    return;
  }
  luaL_error(L, "parmap: cannot start a worker: %s", strerror(err));
}

/* Fork worker wi. Returns 0, or -1 when the fork failed. */
static int spawn(lua_State *L, Map *m, int wi) {
  Worker *w = &m->w[wi];
  int fd;
  pid_t pid;
  int cfd[2] = {-1, -1};
  memset(&m->shm[wi], 0, sizeof m->shm[wi]);
  parmap_child_gc_settle(L);
  if (m->op && out_prepare(m, wi, cfd)) return -1;
  pid = parmap_child_spawn(&fd);
  if (m->op && pid != 0) { /* the child's ends are the child's */
    int e = errno;
    close(cfd[0]);
    close(cfd[1]);
    if (pid < 0) out_close(m, wi);
    errno = e;
  }
  if (pid < 0) return -1;
  if (pid == 0) {
    if (m->op) out_child(m, cfd);
    parmap_worker_main(L, m->self, &m->cfg, &m->shm[wi], fd, wi + 1, m->nw);
    parmap_child_exit(PARMAP_EXIT_INTERNAL); /* not reached */
  }
  memset(w, 0, sizeof *w);
  w->pid = pid;
  w->fd = fd;
  w->born = parmap_now_ns();
  m->nlive++;
  return 0;
}

static int depth(Map *m) {
  /* long chunks gain nothing from a queue, and strand work at the end */
  return (m->item_ns * (double)m->last_size > 4 * TARGET_NS) ? 1 : DEPTH;
}

/* maxtasks: w was handed all the items it may run; maxmemory: its RSS
   passed the limit (the worker says so in its Shm). */
static int spent(const Map *m, const Worker *w) {
  return (m->cfg.maxtasks > 0 && w->handed >= m->cfg.maxtasks) ||
         (m->cfg.maxmemory > 0 &&
          __atomic_load_n(&m->shm[w - m->w].over, __ATOMIC_ACQUIRE));
}

/* Let w go: half-close its socket, so it reads end of file, runs finish
   and exits. It keeps its entry (and number) until it is reaped, so no
   two live processes share a number; its end of file wakes the poll. */
static void retire(Map *m, Worker *w) {
  shutdown(w->fd, SHUT_WR);
  w->retiring = 1;
  w->retire_ns = parmap_now_ns();
  m->nlive--;
}

/* A retiring worker was reaped with status st (r: parmap_wait's answer):
   a signal that we did not send ended its finish, and nothing else would
   say so (an error in finish is the worker's own line on stderr). */
static void say_finish_death(const Map *m, const Worker *w, int r, int st) {
  char how[160];
  if (r != 1 || !WIFSIGNALED(st) || w->term_ns || WTERMSIG(st) == SIGINT)
    return;
  parmap_child_how(how, sizeof how, 0, st);
  fprintf(stderr, "parmap worker %d (pid %d): %s in finish\n",
          (int)(w - m->w) + 1, (int)w->pid, how);
}

/* Reap retiring worker wi if it is gone (waiting at most ms): its entry is
   then free for a fresh process. */
static void reap_retired(lua_State *L, Map *m, int wi, int ms) {
  Worker *w = &m->w[wi];
  int st = 0, r = parmap_wait(w->pid, &st, ms);
  if (r == 0) return;
  say_finish_death(m, w, r, st);
  unwatch(m, wi);
  parmap_fd_close(w->fd);
  if (m->op) out_reaped(L, m, wi);
  memset(w, 0, sizeof *w);
  w->fd = -1;
  m->spawn_wait = 0;
}

/* finish_timeout for retiring worker w at `now`: SIGTERM once it is past,
   SIGKILL a grace later. quiet: the map is being stopped (no message). */
static void bound_finish(Map *m, Worker *w, uint64_t now, int quiet) {
  double lim = m->cfg.finish_timeout;
  if (w->term_ns == 0) {
    if (lim <= 0 || (double)(now - w->retire_ns) < lim * 1e9) return;
    if (!quiet)
      fprintf(stderr, "parmap worker %d (pid %d): finish did not end within "
              "%g s (finish_timeout): stopped\n", (int)(w - m->w) + 1,
              (int)w->pid, lim);
    kill(w->pid, SIGTERM); /* still our unreaped child: safe */
    w->term_ns = now;
  } else if (now - w->term_ns >= TERM_GRACE_NS) {
    kill(w->pid, SIGKILL);
    w->term_ns = now - TERM_GRACE_NS / 2; /* again later, if need be */
  }
}

/* maxtasks: a worker that was handed its last item and sent its result
   goes; dispatch forks a fresh process under its number once it is
   reaped (its finish bounded by finish_timeout). */
static void recycle(Map *m) {
  int i;
  if (m->cfg.maxtasks <= 0 && m->cfg.maxmemory <= 0) return;
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (live(w) && w->qn == 0 && spent(m, w)) retire(m, w);
  }
}

/* A worker to give a segment to: an idle one, a new one, or one with room.
   Returns its index, -2 when one must be forked, -1 when none can take. */
static int pick_worker(Map *m) {
  int i, best = -1, d = depth(m), fresh = 0;
  for (i = 0; i < m->nw; i++) {
    if (live(&m->w[i]) && m->w[i].qn == 0 && !spent(m, &m->w[i])) return i;
    if (!m->w[i].pid) fresh = 1;
  }
  if (m->nlive < m->cfg.N && fresh && !m->spawn_wait) return -2;
  for (i = 0; i < m->nw; i++)
    if (live(&m->w[i]) && m->w[i].qn < d && !spent(m, &m->w[i]) &&
        (best < 0 || m->w[i].qn < m->w[best].qn))
      best = i;
  return best;
}

static void assign(Map *m, int wi, Slot *s) {
  Worker *w = &m->w[wi];
  Seg *g = &w->q[w->qn++];
  lua_Integer end = s->start + s->count, stop = next_failure(s, s->next, NULL);
  g->slot = (int)(s - m->slots);
  g->from = s->next;
  g->to = (stop > 0 && stop < end) ? stop : end;
  g->tries = 0;
  if (s->ntries > 0) cut_tried(s, g);
  if (m->cfg.maxtasks > 0 && g->to - g->from > m->cfg.maxtasks - w->handed)
    g->to = g->from + (m->cfg.maxtasks - w->handed); /* its last items */
  w->handed += g->to - g->from;
  s->next = g->to;
  s->busy = 1;
}

/* An entry with no process (pick_worker saw one). */
static int free_entry(Map *m) {
  int i;
  for (i = 0; m->w[i].pid; i++) {
  }
  return i;
}

/* With nothing left to hand out, let idle workers go: they exit while the
   loop still consumes results, instead of in its last call. */
static void retire_idle(Map *m) {
  int i;
  if (!m->exhausted) return;
  for (i = 0; i < m->nslots; i++) {
    const Slot *s = &m->slots[i];
    if (s->used && s->next < s->start + s->count) return;
  }
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (live(w) && w->qn == 0) retire(m, w);
  }
}

static void dispatch(lua_State *L, Map *m) {
  recycle(m);
  for (;;) {
    Slot *s;
    int wi = pick_worker(m);
    if (wi == -1) return;
    if ((s = work_slot(L, m)) == NULL) return;
    if (wi == -2) {
      int i;
      /* a pending Ctrl-C (lua.c's hook) raises here, not in the child */
      parmap_run_hooks(L);
      i = free_entry(m);
      if (spawn(L, m, i)) {
        spawn_failed(L, m, errno);
        if ((wi = pick_worker(m)) < 0) return; /* s waits, unassigned */
      } else {
        wi = i;
      }
    }
    assign(m, wi, s);
    /* send now: a socket with room needs no poll first */
    if (m->w[wi].nsent == m->w[wi].qn - 1 && send_more(m, &m->w[wi]) < 0)
      on_death(L, m, wi);
  }
}

/* ---------------------------------------------------------------- deaths */

/* A death or timeout cost item `index` of s its n-th run, and retries
   allows more; its message is on top. Does retry_if let it run again
   (when the predicate raised, its message replaces the one on top)? If
   so, it is held back from hand-out for retry_delay. */
static int retry_later(lua_State *L, Map *m, Slot *s, lua_Integer index,
                       lua_Integer n, const char *kind, pid_t pid, int sig) {
  uint64_t d;
  if (m->cfg.has_retry_if) {
    int top = lua_gettop(L), again;
    luaL_checkstack(L, 8, NULL);
    lua_getiuservalue(L, m->self, U_RETRY); /* top + 1 */
    lua_pushstring(L, kind);                /* the record: top + 2.. */
    lua_pushvalue(L, top);
    lua_pushvalue(L, top);
    lua_pushliteral(L, "");
    if (sig > 0) {
      lua_createtable(L, 0, 1);
      lua_pushinteger(L, sig);
      lua_setfield(L, -2, "signal");
    }
    again = parmap_retry_decide(L, top + 1, index, top + 2, pid, n,
                                sig > 0 ? top + 6 : 0);
    lua_copy(L, top + 4, top);
    lua_settop(L, top);
    if (!again) return 0;
  }
  d = parmap_retry_delay_ns(m->cfg.retry_delay, m->cfg.retry_delay_max, n);
  if (d > 0) set_due(s, index, parmap_now_ns() + d);
  return 1;
}

static void on_death(lua_State *L, Map *m, int wi) {
  Worker *w = &m->w[wi];
  char how[160], msg[400];
  int st = 0, r, k;
  int64_t cur;
  int obase;
  lua_Integer bad = 0;
  pid_t pid = w->pid;
  unwatch(m, wi);
  parmap_fd_close(w->fd);
  w->fd = -1;
  if (w->exited) {
    r = w->lost ? -1 : 1;
    st = w->status;
  } else {
    r = parmap_wait(w->pid, &st, 1000);
  }
  if (r == 0) { /* it closed its socket but lives on: stop it */
    kill(w->pid, SIGKILL);
    r = parmap_wait(w->pid, &st, -1);
  }
  parmap_child_how(how, sizeof how, r != 1, st);
  m->nlive--;
  /* read once it is gone: what it did last stands */
  cur = __atomic_load_n(&m->shm[wi].cur, __ATOMIC_ACQUIRE);
  obase = lua_gettop(L);
  if (m->op && m->cfg.output == OUT_ITEM && cur != 0) {
    /* what the item wrote goes with its error (the memfds hold it: the
       worker empties them as each item ends), not to the streams now */
    luaL_checkstack(L, 4, NULL);
    out_held(L, m, wi, 0);
    out_held(L, m, wi, 1);
    m->death_out = obase + 1;
    if (ftruncate(m->op[wi].fd[0], 0) || ftruncate(m->op[wi].fd[1], 0)) {
      /* cannot be: our own memfds; the text is then written twice */
    }
  }
  if (m->op) out_reaped(L, m, wi);
  if (m->cfg.has_init && !__atomic_load_n(&m->shm[wi].inited, __ATOMIC_ACQUIRE)
      && !(r == 1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGINT)) {
    /* it died in init: no item ran, and the next would fare alike */
    int timed_out = w->timed_out, base = lua_gettop(L);
    if (timed_out)
      snprintf(msg, sizeof msg, "init did not end within %g s (init_timeout; "
               "worker %d was killed)", m->cfg.init_timeout, (int)pid);
    else
      snprintf(msg, sizeof msg, "worker %d %s while running init", (int)pid,
               how);
    memset(w, 0, sizeof *w); /* reaped: stop must not wait for it */
    w->fd = -1;
    luaL_checkstack(L, 8, NULL);
    lua_pushliteral(L, "init");
    lua_pushstring(L, msg);
    lua_pushstring(L, msg);
    lua_pushliteral(L, "");
    lua_pushinteger(L, (lua_Integer)pid);
    raise_init(L, m, wi + 1, base + 1);
  }
  for (k = 0; k < w->qn; k++) {
    lua_Integer open = seg_first_open(m, w, k);
    if (cur >= open && cur < w->q[k].to) bad = (lua_Integer)cur;
  }
  if (w->qn > 0 && bad == 0) bad = seg_first_open(m, w, 0);
  for (k = 0; k < w->qn; k++) {
    Slot *s = &m->slots[w->q[k].slot];
    lua_Integer open = seg_first_open(m, w, k);
    s->next = open;
    unbusy(m, s);
    /* retries: the item goes back with the others, for a fresh worker;
       the runs it failed in this worker before (fn raised) count too */
    if (bad >= open && bad < w->q[k].to) {
      lua_Integer n = add_try(L, s, bad, bad == cur ? (lua_Integer)
                      __atomic_load_n(&m->shm[wi].fails, __ATOMIC_ACQUIRE) : 0);
      int sig = !w->timed_out && r == 1 && WIFSIGNALED(st) ? WTERMSIG(st) : 0;
      const char *kind = w->timed_out ? "timeout" : "died";
      if (w->timed_out)
        snprintf(msg, sizeof msg,
                 "item %lld timed out after %g s (worker %d was killed)",
                 (long long)bad, m->cfg.timeout, (int)w->pid);
      else
        snprintf(msg, sizeof msg, "worker %d %s while running item %lld",
                 (int)w->pid, how, (long long)bad);
      lua_pushstring(L, msg);
      if (n > m->cfg.retries || !retry_later(L, m, s, bad, n, kind, w->pid,
                                             sig))
        add_failure_sig(L, m, s, bad, kind, lua_tostring(L, -1), w->pid, sig);
      else
        lua_pop(L, 1);
    }
  }
  if (m->death_out) {
    lua_settop(L, obase);
    m->death_out = 0;
  }
  {
    int intr = r == 1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGINT &&
               !w->timed_out;
    /* a worker that never got to run an item: the next would fare alike */
    if (!w->delivered && cur == 0 && !w->timed_out)
      m->stillborn++;
    else
      m->stillborn = 0;
    memset(w, 0, sizeof *w);
    w->fd = -1;
    m->spawn_wait = 0; /* reaped: room for a process again */
    if (intr) { /* Ctrl-C on the process group: not a reason to fork again */
      parmap_run_hooks(L); /* lua.c's hook raises "interrupted!" here */
      luaL_error(L, "parmap: worker %d was interrupted (SIGINT)", (int)pid);
    }
    if (m->stillborn > m->nw + 2)
      luaL_error(L, "parmap: %d workers in a row died before running any "
                    "item (the last one %s)", m->stillborn, how);
  }
}

/* ---------------------------------------------------------------- i/o */

/* Send what can be sent. Returns -1 if the worker is gone. */
static int send_more(Map *m, Worker *w) {
  while (w->nsent < w->qn) {
    Seg *g = &w->q[w->nsent];
    Slot *s = &m->slots[g->slot];
    const char *body = NULL;
    size_t blen = 0, total;
    ssize_t r;
    if (!m->cfg.from_table) {
      body = s->in.p + s->offs[g->from - s->start];
      blen = s->offs[g->to - s->start] - s->offs[g->from - s->start];
    }
    if (w->sent == 0) {
      w->shdr.magic = MAGIC_TASK;
      w->shdr.count = (uint32_t)seg_len(g);
      w->shdr.from = (int64_t)g->from;
      w->shdr.bodylen = blen;
      w->shdr.tries = g->tries;
    }
    total = FRAME_HDR + blen;
    if (w->sent < FRAME_HDR)
      r = parmap_send_some(w->fd, (char *)&w->shdr + w->sent,
                           FRAME_HDR - w->sent, body, blen);
    else
      r = parmap_send_some(w->fd, NULL, 0, body + (w->sent - FRAME_HDR),
                           total - w->sent);
    if (r < 0) return -1;
    if (r == 0) return 0;
    if (w->nsent == 0 && w->due == 0 && m->cfg.timeout > 0)
      w->due = parmap_now_ns(); /* timeouts: due from its first bytes */
    w->sent += (size_t)r;
    if (w->sent == total) {
      w->nsent++;
      w->sent = 0;
    }
  }
  return 0;
}

static void protocol_error(lua_State *L, Worker *w, const char *what) {
  luaL_error(L, "parmap: protocol error from worker %d: %s", (int)w->pid,
             what);
}

/* Worker number id's init failed: kind, err, message, traceback, pid at
   first..first+4. No item ran there, so the map cannot go on as asked:
   stop it, and hand the record with the worker's number to the policy
   (which raises an error object of kind "init"). */
static void raise_init(lua_State *L, Map *m, int id, int first) {
  int k;
  if (m->op) { /* what init wrote goes before its error */
    out_reaped(L, m, id - 1);
    out_flush(L, m);
  }
  stop(m, 1);
  luaL_checkstack(L, 12, NULL);
  lua_getiuservalue(L, m->self, U_FAIL);
  lua_pushnil(L); /* no item */
  for (k = 0; k < 5; k++) lua_pushvalue(L, first + k);
  lua_pushnil(L); /* attempts */
  lua_createtable(L, 0, 1);
  lua_pushinteger(L, id);
  lua_setfield(L, -2, "worker");
  lua_call(L, 8, 1); /* fail(nil, "init", err, message, tb, pid, nil,
                        {worker = id}) */
  lua_error(L);
}

/* A FLAG_INIT frame: w's init raised. Its record (REC_ERR, then kind, err,
   message, traceback, pid) is p[0..len). */
static void init_error(lua_State *L, Map *m, Worker *w, const char *p,
                       size_t len) {
  int base = lua_gettop(L), n;
  size_t pos = 1;
  const char *err = NULL;
  if (len < 1 || p[0] != (char)REC_ERR)
    protocol_error(L, w, "bad init error record");
  luaL_checkstack(L, 12, NULL);
  lua_getiuservalue(L, m->self, U_SCRATCH);
  n = parmap_decode(L, p, len, &pos, base + 1, &err);
  if (n != 5 || lua_type(L, base + 2) != LUA_TSTRING ||
      lua_type(L, base + 4) != LUA_TSTRING)
    protocol_error(L, w, "bad init error record");
  raise_init(L, m, (int)(w - m->w) + 1, base + 2);
}

static void segment_done(Map *m, Worker *w, uint64_t elapsed) {
  Seg *g = &w->q[0];
  double per = (double)elapsed / (double)(seg_len(g) > 0 ? seg_len(g) : 1);
  unbusy(m, &m->slots[g->slot]);
  if (seg_len(g) > 0) m->item_ns = m->item_ns > 0 ? (m->item_ns + per) / 2 : per;
  memmove(&w->q[0], &w->q[1], sizeof(Seg) * (size_t)(w->qn - 1));
  w->qn--;
  w->nsent--;
  /* the next segment is due from now if it is (partly) sent already */
  w->due = (m->cfg.timeout > 0 && w->qn > 0 && (w->nsent > 0 || w->sent > 0))
               ? parmap_now_ns() : 0;
}

/* Read what has arrived. Returns 1 at end of file (the worker is gone). */
static int recv_more(lua_State *L, Map *m, Worker *w) {
  for (;;) {
    Slot *s;
    ssize_t r;
    if (w->rhave < FRAME_HDR) {
      r = parmap_recv_some(w->fd, (char *)&w->rhdr + w->rhave,
                           FRAME_HDR - w->rhave);
      if (r == -2) return 0;
      if (r <= 0) return 1;
      w->rhave += (size_t)r;
      if (w->due) w->due = parmap_now_ns(); /* it delivers: not stuck */
      if (w->rhave < FRAME_HDR) continue;
      if (w->rhdr.magic != MAGIC_RESULT) protocol_error(L, w, "bad magic");
      if (w->qn == 0 || (w->nsent == 0 && !(w->rhdr.flags & FLAG_INIT)))
        protocol_error(L, w, "unasked result");
      s = &m->slots[w->q[0].slot];
      if ((lua_Integer)w->rhdr.nitems > w->q[0].to - (s->start + s->recv))
        protocol_error(L, w, "too many results");
      reserve(L, &s->out, (size_t)w->rhdr.bodylen);
      w->rleft = w->rhdr.bodylen;
    }
    s = &m->slots[w->q[0].slot];
    if (w->rleft > 0) {
      size_t have = (size_t)(w->rhdr.bodylen - w->rleft);
      r = parmap_recv_some(w->fd, s->out.p + s->out.len + have,
                           (size_t)w->rleft);
      if (r == -2) return 0;
      if (r <= 0) return 1;
      w->rleft -= (uint64_t)r;
      if (w->due) w->due = parmap_now_ns();
      if (w->rleft > 0) continue;
    }
    if (w->rhdr.flags & FLAG_INIT)
      init_error(L, m, w, s->out.p + s->out.len, (size_t)w->rhdr.bodylen);
    else if (m->jr && w->rhdr.nitems > 0)
      journal_frame(L, m, s->start + s->recv, s->out.p + s->out.len,
                    (size_t)w->rhdr.bodylen, w->rhdr.nitems);
    s->out.len += (size_t)w->rhdr.bodylen;
    s->recv += w->rhdr.nitems;
    if (w->rhdr.nitems > 0) {
      w->delivered = 1;
      m->stillborn = 0;
    }
    m->done += w->rhdr.nitems;
    w->rhave = 0;
    if (w->rhdr.flags & FLAG_END) {
      if (s->start + s->recv != w->q[0].to)
        protocol_error(L, w, "segment ended early");
      segment_done(m, w, w->rhdr.elapsed_ns);
    }
  }
}

/* Timeouts watch the work a worker owes from the moment it is handed
   over, not only while an item runs: the item running has its own start;
   between items (cur = 0), the segment at the head of its queue is due
   from the later of when its first bytes were sent (w->due) and when the
   worker's previous segment ended (the worker writes that time to start
   before clearing cur). A worker stopped while idle, or one whose queued
   segment was read by fn off its socket, is thus killed in time too.
   Kill (when `kill_them`) workers past their deadline; return ms to the
   next deadline (-1: none). Only kill after reading what the sockets
   hold: a segment's end frame may be waiting there. */
static int check_timeouts(Map *m, int kill_them) {
  uint64_t now = parmap_now_ns(), lim, ilim, next = 0;
  int i;
  if (m->cfg.timeout <= 0 && m->cfg.init_timeout <= 0) return -1;
  lim = (uint64_t)(m->cfg.timeout * 1e9); /* <= 1e18: map_start clamps */
  ilim = (uint64_t)(m->cfg.init_timeout * 1e9);
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    int64_t c1, c2;
    uint64_t start, base, left, l = lim;
    if (!live(w) || w->qn == 0 || w->timed_out) continue;
    if (m->cfg.has_init &&
        !__atomic_load_n(&m->shm[i].inited, __ATOMIC_ACQUIRE)) {
      /* init runs: its own bound, from the fork; the items' clock starts
         when it ends (the worker sets start then) */
      if (ilim == 0) continue;
      base = w->born;
      l = ilim;
    } else {
      if (lim == 0) continue;
      c1 = __atomic_load_n(&m->shm[i].cur, __ATOMIC_ACQUIRE);
      start = __atomic_load_n(&m->shm[i].start, __ATOMIC_ACQUIRE);
      c2 = __atomic_load_n(&m->shm[i].cur, __ATOMIC_ACQUIRE);
      if (c1 != c2 || start > now) {
        base = now; /* it moves: look again later */
      } else if (c1 != 0) {
        base = start; /* an item runs */
      } else if (w->due) {
        base = w->due > start ? w->due : start; /* work it has not begun */
      } else {
        continue; /* nothing sent yet: it owes nothing */
      }
    }
    if (now - base >= l) {
      if (kill_them) {
        kill(w->pid, SIGKILL); /* still our unreaped child: safe */
        w->timed_out = 1;
        continue;
      }
      left = 0;
    } else {
      left = l - (now - base);
    }
    if (next == 0 || left < next) next = left ? left : 1;
  }
  if (next == 0) return -1;
  next = next / 1000000u + 1;
  return next > EXIT_CHECK_MS ? EXIT_CHECK_MS : (int)next;
}

/* A worker's death shows as end of file on its socket, unless a process
   that fn forked (without exec) holds the socket open: then the worker is
   found by waitpid, every so often while the parent waits. All it sent is
   in the socket by then: read it, then report the death. */

static void check_exits(lua_State *L, Map *m) {
  int i;
  uint64_t now = parmap_now_ns();
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    int st = 0, r;
    if (w->pid > 0 && w->retiring) { /* running finish, or gone */
      reap_retired(L, m, i, 0);
      if (w->pid > 0) bound_finish(m, w, now, 0);
      continue;
    }
    if (w->fd < 0 || w->pid <= 0) continue;
    r = parmap_wait(w->pid, &st, 0);
    if (r == 0) continue;
    w->exited = 1;
    w->status = st;
    w->lost = r < 0;
    recv_more(L, m, w);
    on_death(L, m, i);
  }
}

/* A retiring worker's socket is readable: end of file once it exited (it
   owes nothing; stray bytes are dropped). Reap it: its entry, and so its
   number, is then free. */
static void retiring_readable(lua_State *L, Map *m, int wi) {
  Worker *w = &m->w[wi];
  char sink[512];
  int k;
  ssize_t r = parmap_recv_some(w->fd, sink, sizeof sink);
  if (r == -2 || r > 0) return;
  unwatch(m, wi);
  parmap_fd_close(w->fd);
  w->fd = -1;
  /* its files close just before it is a zombie: yield to it a moment
     (a fresh fork for its number waits for this), then sleep in slices */
  for (k = 0; k < 200 && w->pid; k++) {
    reap_retired(L, m, wi, 0);
    if (w->pid) sched_yield();
  }
  if (w->pid) reap_retired(L, m, wi, 100);
}

/* One round: hand out work, wait for sockets (or not), move bytes. */
static void pump(lua_State *L, Map *m, int block) {
  int i, n = 0, r, timeout, retiring, nsock, held;
  if (m->owner != getpid()) /* a forked copy: the workers and fds are not
                               ours (the fd numbers may name other files) */
    luaL_error(L, "parmap: a map cannot be stepped from a worker or child "
               "process (it belongs to process %d)", (int)m->owner);
  dispatch(L, m);
  if (block && (ready(m) || finished(m))) block = 0; /* dispatch made some */
  if (m->close_req) return; /* closed from a callback: step stops it */
  timeout = block ? check_timeouts(m, 0) : 0;
  if (block && (timeout < 0 || timeout > EXIT_CHECK_MS)) timeout = EXIT_CHECK_MS;
  held = block ? held_ms(m) : -1; /* retry_delay: an item waits its time */
  if (held >= 0 && held < timeout) timeout = held;
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (w->fd < 0) continue;
    m->pfd[n].fd = w->fd;
    m->pfd[n].events = POLLIN | (w->nsent < w->qn ? POLLOUT : 0);
    m->pfd[n].revents = 0;
    m->pfd_w[n++] = i;
  }
  nsock = n;
  if (m->op && m->cfg.output == OUT_LINES) /* the workers' lines */
    for (i = 0; i < m->nw; i++) {
      int k;
      for (k = 0; k < 2; k++) {
        if (m->op[i].fd[k] < 0) continue;
        m->pfd[n].fd = m->op[i].fd[k];
        m->pfd[n].events = POLLIN;
        m->pfd[n].revents = 0;
        m->pfd_w[n++] = 2 * i + k;
      }
    }
  retiring = nretiring(m);
  if (nsock == 0 && retiring == 0 && held >= 0) { /* a fork follows its time */
    poll(NULL, 0, timeout);
    parmap_run_hooks(L);
    return;
  }
  if (nsock == 0 && retiring == 0) { /* fine while records wait */
    if (block) luaL_error(L, "parmap: no worker left and none can be started");
    return;
  }
  if (block && retiring == 0 && held < 0) { /* nothing out would hang */
    int out = 0;
    for (i = 0; i < m->nw; i++) out += m->w[i].qn;
    if (out == 0) luaL_error(L, "parmap: internal error: the map stalled");
  }
  /* work may wait for a retiring worker's entry: its end of file (or the
     waitpid check, for one whose socket is gone) brings it */
  r = poll(m->pfd, (nfds_t)n, timeout);
  if (r < 0) {
    if (errno != EINTR) luaL_error(L, "parmap: poll: %s", strerror(errno));
    parmap_run_hooks(L); /* a signal: lua.c's Ctrl-C hook runs now */
    return;
  }
  for (i = nsock; i < n; i++) /* lines first: a death then writes after */
    if (m->pfd[i].revents) out_read(m, m->pfd_w[i] / 2, m->pfd_w[i] % 2);
  for (i = 0; i < nsock; i++) {
    Worker *w = &m->w[m->pfd_w[i]];
    int dead = 0;
    if (w->retiring) {
      if (m->pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
        retiring_readable(L, m, m->pfd_w[i]);
      continue;
    }
    if (m->pfd[i].revents & POLLOUT) dead = send_more(m, w) < 0;
    if (m->pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
      dead = recv_more(L, m, w) || dead;
    if (dead) on_death(L, m, m->pfd_w[i]);
  }
  if (m->cfg.timeout > 0 || m->cfg.init_timeout > 0) check_timeouts(m, 1);
  /* a signal that came between two polls (no EINTR), or while results
     stream in (poll never waits): lua.c's Ctrl-C hook runs now */
  if (block) parmap_run_hooks(L);
  if (block) {
    uint64_t now = parmap_now_ns();
    if (now - m->exit_check >= (uint64_t)EXIT_CHECK_MS * 1000000u) {
      m->exit_check = now;
      check_exits(L, m);
      if (m->tick && m->tick(L)) m->close_req = 1; /* the MPI agent: rank 0
                                                      left the map */
    }
  }
  retire_idle(m);
  if (m->op) out_flush(L, m);
}

/* Stop the map: every worker is let go (it runs finish, or is killed
   with kill_them) and reaped; a finish past finish_timeout gets SIGTERM,
   then SIGKILL a grace later, as does a killed worker that lingers. */
static void stop(Map *m, int kill_them) {
  int i, st = 0, left, r;
  uint64_t now = parmap_now_ns();
  if (m->state == M_CLOSED) return;
  if (m->state != M_DONE) m->state = M_CLOSED; /* an ended map stays so */
  if (m->owner != getpid()) return; /* a worker's copy: not its children */
  if (m->jr) parmap_journal_close(m->jr);
  if (m->w == NULL) return;
  for (i = 0; i < m->nw; i++) {
    Worker *w = &m->w[i];
    if (w->pid && !w->retiring) {
      w->retiring = 1;
      w->retire_ns = now;
    }
    unwatch(m, i);
    parmap_fd_close(w->fd);
    w->fd = -1;
    if (kill_them && w->pid && !w->term_ns) {
      if (parmap_wait(w->pid, &st, 0) != 0) { /* gone already */
        w->pid = 0;
        continue;
      }
      kill(w->pid, SIGTERM); /* still our unreaped child: safe */
      w->term_ns = now;
    }
  }
  for (;;) {
    struct timespec ts = {0, 2000000}; /* 2 ms */
    for (i = 0, left = 0; i < m->nw; i++) {
      Worker *w = &m->w[i];
      if (!w->pid) continue;
      if ((r = parmap_wait(w->pid, &st, 0)) != 0) {
        if (!kill_them) say_finish_death(m, w, r, st);
        w->pid = 0;
        continue;
      }
      bound_finish(m, w, parmap_now_ns(), kill_them);
      left++;
    }
    if (left == 0) break;
    if (m->op && m->cfg.output == OUT_LINES) /* a finish may write more
                                                than a pipe holds */
      for (i = 0; i < m->nw; i++) {
        out_read(m, i, 0);
        out_read(m, i, 1);
      }
    nanosleep(&ts, NULL);
  }
  if (m->op) { /* item: the items a stopped map never yields write
                   nothing (their records are dropped too) */
    for (i = 0; i < m->nw; i++)
      if (m->cfg.output == OUT_LINES || !kill_them)
        out_reaped(NULL, m, i);
      else
        out_close(m, i);
    out_flush(NULL, m);
  }
  m->nlive = 0;
  release(m); /* nothing reads the slots once stopped */
}
