/*
** map/output.c: a worker's stdout and stderr relayed by the engine.
** output = "lines": fd 1 and 2 of each worker are pipes the parent reads
** in pump; whole lines (with the prefix) go to the caller's streams
** through the map's writer (above a progress bar). output = "item": fd 1
** and 2 are memfds the worker empties into each item's record (REC_OUT);
** the parent holds its own descriptor of each, so what a worker wrote
** before it died is read there. Part of src/map.c (one compilation unit).
*/
#include "internal.h"

#include <fcntl.h>
#include <sys/stat.h>

#ifdef __linux__
#include <sys/epoll.h>
#endif

#define LINE_MAX_BYTES (64 * 1024) /* a longer line is written in pieces */

/* An fd the engine keeps is never 0, 1 or 2 (the caller may have closed
   them: a worker's dup2 onto 1 and 2 must not hit ours). */
static int out_high(int fd) {
  int h;
  if (fd < 0 || fd > 2) return fd;
  h = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  close(fd);
  return h;
}

static void out_unwatch(Map *m, OutPipe *o, int k) {
#ifdef __linux__
  if (o->ep[k] && m->ep >= 0) epoll_ctl(m->ep, EPOLL_CTL_DEL, o->fd[k], NULL);
#endif
  o->ep[k] = 0;
}

static void out_close(Map *m, int wi) {
  OutPipe *o = &m->op[wi];
  int k;
  for (k = 0; k < 2; k++) {
    if (o->fd[k] < 0) continue;
    out_unwatch(m, o, k);
    parmap_fd_close(o->fd[k]);
    o->fd[k] = -1;
  }
}

/* Before worker wi's fork: its streams. cfd gets the child's ends
   (close-on-exec, unregistered: the parent closes them after the fork).
   Returns 0, or -1 with errno set and nothing left open. */
static int out_prepare(Map *m, int wi, int cfd[2]) {
  OutPipe *o = &m->op[wi];
  int k, e;
  out_close(m, wi); /* what a worker before it left (never two) */
  cfd[0] = cfd[1] = -1;
  for (k = 0; k < 2; k++) {
    if (m->cfg.output == OUT_LINES) {
      int p[2];
      if (pipe2(p, O_CLOEXEC)) goto fail;
      o->fd[k] = out_high(p[0]);
      cfd[k] = out_high(p[1]);
      if (o->fd[k] >= 0) fcntl(o->fd[k], F_SETFL, O_NONBLOCK);
    } else {
      o->fd[k] = out_high(memfd_create("parmap-output", MFD_CLOEXEC));
      cfd[k] = o->fd[k] < 0 ? -1 : fcntl(o->fd[k], F_DUPFD_CLOEXEC, 3);
    }
    if (o->fd[k] < 0 || cfd[k] < 0) goto fail;
    parmap_fd_register(o->fd[k]); /* later children close it */
  }
  return 0;
fail:
  e = errno;
  for (k = 0; k < 2; k++) {
    if (cfd[k] >= 0) close(cfd[k]);
    if (o->fd[k] >= 0) {
      parmap_fd_close(o->fd[k]);
      o->fd[k] = -1;
    }
  }
  errno = e;
  return -1;
}

/* In the worker, right after the fork: fd 1 and 2 are its streams. A pipe
   makes C stdio's stdout fully buffered: lines mode wants it by line. */
static void out_child(Map *m, int cfd[2]) {
  if (dup2(cfd[0], 1) < 0 || dup2(cfd[1], 2) < 0)
    parmap_child_exit(PARMAP_EXIT_INTERNAL);
  close(cfd[0]);
  close(cfd[1]);
  if (m->cfg.output == OUT_LINES) setvbuf(stdout, NULL, _IOLBF, BUFSIZ);
}

static void out_append(Map *m, int k, const char *p, size_t n) {
  parmap_buf *b = &m->pend[k];
  if (parmap_buf_reserve(b, n)) return; /* no memory: the bytes go */
  memcpy(b->p + b->len, p, n);
  b->len += n;
}

/* One line (or the piece of one) of worker entry wi on stream k, with the
   prefix ("%d": the worker's number, "%%": a percent sign). */
static void out_line(Map *m, int wi, int k, const char *p, size_t n,
                     int nl) {
  const char *f = m->cfg.prefix;
  char num[16];
  for (; *f; f++) {
    if (f[0] == '%' && f[1] == 'd') {
      int len = snprintf(num, sizeof num, "%d", wi + 1);
      out_append(m, k, num, (size_t)len);
      f++;
    } else if (f[0] == '%' && f[1] == '%') {
      out_append(m, k, "%", 1);
      f++;
    } else {
      out_append(m, k, f, 1);
    }
  }
  out_append(m, k, p, n);
  if (nl) out_append(m, k, "\n", 1);
}

/* Move the whole lines of wi's stream k to the pending text; at end of
   file (eof) the partial last line too, ended with a newline. */
static void out_lines(Map *m, int wi, int k, int eof) {
  parmap_buf *b = &m->op[wi].line[k];
  size_t at = 0;
  while (at < b->len) {
    char *nl = memchr(b->p + at, '\n', b->len - at);
    size_t n;
    if (nl == NULL) {
      if (!eof && b->len - at < LINE_MAX_BYTES) break;
      out_line(m, wi, k, b->p + at, b->len - at, 1);
      at = b->len;
      break;
    }
    n = (size_t)(nl - (b->p + at)) + 1;
    out_line(m, wi, k, b->p + at, n, 0);
    at += n;
  }
  memmove(b->p, b->p + at, b->len - at);
  b->len -= at;
}

/* lines: read what worker entry wi's stream k holds, never waiting. End
   of file (the worker and every process it forked closed it) closes it. */
static void out_read(Map *m, int wi, int k) {
  OutPipe *o = &m->op[wi];
  int eof = 0;
  if (o->fd[k] < 0) return;
  for (;;) {
    parmap_buf *b = &o->line[k];
    ssize_t r;
    if (parmap_buf_reserve(b, 65536)) break;
    r = read(o->fd[k], b->p + b->len, 65536);
    if (r > 0) {
      b->len += (size_t)r;
      out_lines(m, wi, k, 0);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    eof = r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
    break;
  }
  if (eof) {
    out_lines(m, wi, k, 1);
    out_unwatch(m, o, k);
    parmap_fd_close(o->fd[k]);
    o->fd[k] = -1;
  }
}

/* item: what the memfd of wi's stream k holds (since the worker's last
   item ended), pushed as a string; "" when nothing. */
static void out_held(lua_State *L, Map *m, int wi, int k) {
  int fd = m->op[wi].fd[k];
  struct stat sb;
  luaL_Buffer B;
  off_t at = 0;
  luaL_buffinit(L, &B);
  if (fd >= 0 && fstat(fd, &sb) == 0) {
    while (at < sb.st_size) {
      size_t want = (size_t)(sb.st_size - at) < LUAL_BUFFERSIZE
                        ? (size_t)(sb.st_size - at) : LUAL_BUFFERSIZE;
      ssize_t r = pread(fd, luaL_prepbuffer(&B), want, at);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      luaL_addsize(&B, (size_t)r);
      at += r;
    }
  }
  luaL_pushresult(&B);
}

/* Worker entry wi is gone (reaped or found dead). lines: what its pipes
   hold now is written, the partial lines ended; a process it forked that
   still holds a pipe loses what it writes later (we do not wait for it).
   item: what it wrote after its last item (finish, or a death's item,
   whose error took it already) is written as it is. */
static void out_reaped(lua_State *L, Map *m, int wi) {
  int k;
  (void)L;
  if (m->op == NULL) return;
  for (k = 0; k < 2; k++) {
    OutPipe *o = &m->op[wi];
    if (o->fd[k] < 0) continue;
    if (m->cfg.output == OUT_LINES) {
      out_read(m, wi, k);
      if (o->fd[k] >= 0) out_lines(m, wi, k, 1);
    } else {
      struct stat sb;
      parmap_buf *b = &m->pend[k];
      off_t at = 0;
      if (fstat(o->fd[k], &sb) || sb.st_size <= 0 ||
          parmap_buf_reserve(b, (size_t)sb.st_size))
        continue;
      while (at < sb.st_size) {
        ssize_t r = pread(o->fd[k], b->p + b->len, (size_t)(sb.st_size - at),
                          at);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        b->len += (size_t)r;
        at += r;
      }
    }
  }
  out_close(m, wi);
}

/* Write text p[0..n) to the caller's stream k (0 stdout, 1 stderr):
   through the map's writer (it clears and redraws a progress bar) when L
   can call it, else straight to the fd. */
static void out_write(lua_State *L, Map *m, int k, const char *p, size_t n) {
  if (n == 0) return;
  if (L != NULL && lua_getiuservalue(L, m->self, U_OUTPUT) == LUA_TFUNCTION) {
    lua_pushinteger(L, k + 1);
    lua_pushlstring(L, p, n);
    lua_call(L, 2, 0);
    return;
  }
  if (L != NULL) lua_pop(L, 1);
  fflush(k ? stderr : stdout); /* what the caller printed goes first */
  parmap_write_all(k + 1, p, n);
}

/* Write the whole lines waiting (stdout's, then stderr's). */
static void out_flush(lua_State *L, Map *m) {
  int k;
  for (k = 0; k < 2; k++) {
    parmap_buf *b = &m->pend[k];
    if (b->len == 0) continue;
    if (L != NULL) {
      /* a writer that raises must not leave the text to be written twice */
      lua_pushlstring(L, b->p, b->len);
      b->len = 0;
      if (lua_getiuservalue(L, m->self, U_OUTPUT) == LUA_TFUNCTION) {
        lua_pushinteger(L, k + 1);
        lua_pushvalue(L, -3);
        lua_call(L, 2, 0);
        lua_pop(L, 1);
      } else {
        size_t n;
        const char *p;
        lua_pop(L, 1);
        p = lua_tolstring(L, -1, &n);
        out_write(NULL, m, k, p, n);
        lua_pop(L, 1);
      }
    } else {
      out_write(NULL, m, k, b->p, b->len);
      b->len = 0;
    }
  }
}

/* The map stops for good: every stream left is closed, its text freed. */
static void out_close_all(Map *m) {
  int i, k;
  if (m->op == NULL) return;
  for (i = 0; i < m->nw; i++) {
    out_close(m, i);
    for (k = 0; k < 2; k++) parmap_buf_free(&m->op[i].line[k]);
  }
  for (k = 0; k < 2; k++) parmap_buf_free(&m->pend[k]);
}
