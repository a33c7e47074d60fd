/*
** journal.c: a map's journal (option `journal`). The file is a header
** (magic, fn's fingerprint, the item count or -1) and records appended as
** results arrive: u32 length, u32 CRC-32 of what follows, i64 index, the
** REC_OK record as the worker wrote it (index 0: the count, written when a
** map whose count was unknown at first completes). Opening reads it all,
** drops a torn or corrupt tail (truncating the file there) and refuses a
** journal of another fn or item count; the engines then hand out the
** recorded records instead of running those items.
*/
#define _GNU_SOURCE
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "buf.h"
#include "proc.h"

#define HDR_LEN 32
#define REC_HDR 16
static const char MAGIC[8] = {'P', 'M', 'J', 'R', 'N', 'L', 0, 1};

typedef struct Entry {
  lua_Integer index;
  size_t off, len; /* the record in data */
} Entry;

struct ParmapJournal {
  int fd;
  char *path;
  uint64_t fp;
  lua_Integer total; /* the header's count, -1: unknown */
  lua_Integer count; /* an end record's count, -1: none */
  char *data;        /* the file as it was read */
  Entry *e;
  size_t ne;
  parmap_buf pend;   /* records written, not yet written out */
  unsigned unsynced; /* records written since the last fdatasync */
  uint64_t synced_ns;
  pid_t owner; /* a forked child's copy never writes */
};

static uint32_t crc_table[256];

static uint32_t crc32_of(uint32_t c, const unsigned char *p, size_t n) {
  if (crc_table[1] == 0) {
    uint32_t i, k, v;
    for (i = 0; i < 256; i++) {
      for (v = i, k = 0; k < 8; k++) v = (v & 1) ? 0xEDB88320u ^ (v >> 1) : v >> 1;
      crc_table[i] = v;
    }
  }
  c = ~c;
  while (n--) c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
  return ~c;
}

static uint32_t rec_crc(int64_t index, const char *p, size_t n) {
  return crc32_of(crc32_of(0, (const unsigned char *)&index, 8),
                  (const unsigned char *)p, n);
}

static uint64_t fnv1a(const char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  while (n--) {
    h ^= (unsigned char)*p++;
    h *= 0x100000001b3ull;
  }
  return h;
}

static void drop(ParmapJournal *j) {
  if (j->fd >= 0 && j->owner == getpid()) parmap_fd_close(j->fd);
  j->fd = -1;
  free(j->path);
  free(j->data);
  free(j->e);
  parmap_buf_free(&j->pend);
  j->path = j->data = NULL;
  j->e = NULL;
  j->ne = 0;
}

ParmapJournal *parmap_journal_check(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return NULL;
  return (ParmapJournal *)luaL_checkudata(L, idx, PARMAP_JOURNAL_MT);
}

lua_Integer parmap_journal_next(const ParmapJournal *j, lua_Integer from) {
  size_t lo = 0, hi = j->ne;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (j->e[mid].index < from) lo = mid + 1;
    else hi = mid;
  }
  return lo < j->ne ? j->e[lo].index : 0;
}

lua_Integer parmap_journal_count(const ParmapJournal *j) {
  return j->total >= 0 ? j->total : j->count;
}

int parmap_journal_more(lua_State *L, const ParmapJournal *j) {
  return luaL_error(L, "parmap: journal '%s' was written for a map of %I "
                    "items, and this map's items go on past them (a "
                    "different map: use another journal)", j->path,
                    (LUAI_UACINT)parmap_journal_count(j));
}

const char *parmap_journal_get(const ParmapJournal *j, lua_Integer index,
                               size_t *len) {
  size_t lo = 0, hi = j->ne;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (j->e[mid].index < index) lo = mid + 1;
    else hi = mid;
  }
  if (lo == j->ne || j->e[lo].index != index) return NULL;
  *len = j->e[lo].len;
  return j->data + j->e[lo].off;
}

/* write(2) all of it (a file: no send), EINTR and short writes retried. */
static int write_file(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static int put(ParmapJournal *j, int64_t index, const char *p, size_t n) {
  uint32_t len = (uint32_t)n, crc = rec_crc(index, p, n);
  if (n > UINT32_MAX - REC_HDR || parmap_buf_reserve(&j->pend, REC_HDR + n))
    return -1;
  memcpy(j->pend.p + j->pend.len, &len, 4);
  memcpy(j->pend.p + j->pend.len + 4, &crc, 4);
  memcpy(j->pend.p + j->pend.len + 8, &index, 8);
  memcpy(j->pend.p + j->pend.len + REC_HDR, p, n);
  j->pend.len += REC_HDR + n;
  j->unsynced++;
  return 0;
}

/* Write out what is pending; fdatasync every PARMAP_JOURNAL_BATCH records
   or second (or now, `force`). Returns 0 or -1 (errno). */
static int commit(ParmapJournal *j, int force) {
  uint64_t now;
  if (j->fd < 0 || j->owner != getpid()) return 0;
  if (j->pend.len > 0) {
    if (write_file(j->fd, j->pend.p, j->pend.len)) return -1;
    j->pend.len = 0;
  }
  if (j->unsynced == 0) return 0;
  now = parmap_now_ns();
  if (force || j->unsynced >= PARMAP_JOURNAL_BATCH ||
      now - j->synced_ns >= 1000000000ull) {
    if (fdatasync(j->fd) && errno != EINVAL) return -1;
    j->unsynced = 0;
    j->synced_ns = now;
  }
  return 0;
}

static void write_failed(lua_State *L, ParmapJournal *j) {
  luaL_error(L, "parmap: journal '%s': cannot write (%s)", j->path,
             strerror(errno));
}

void parmap_journal_append(lua_State *L, ParmapJournal *j, lua_Integer index,
                           const char *rec, size_t len) {
  if (j->fd < 0) return;
  if (put(j, (int64_t)index, rec, len))
    luaL_error(L, "parmap: not enough memory");
}

void parmap_journal_commit(lua_State *L, ParmapJournal *j) {
  if (commit(j, 0)) write_failed(L, j);
}

void parmap_journal_end(lua_State *L, ParmapJournal *j, lua_Integer count) {
  lua_Integer known = j->total >= 0 ? j->total : j->count;
  if (j->fd < 0) return;
  if (known >= 0 && known != count)
    luaL_error(L, "parmap: journal '%s' was written for a map of %I items, "
               "this one has %I (a different map: use another journal)",
               j->path, (LUAI_UACINT)known, (LUAI_UACINT)count);
  if (known < 0) {
    int64_t c = (int64_t)count;
    if (put(j, 0, (const char *)&c, 8)) write_failed(L, j);
    j->count = count;
  }
  if (commit(j, 1)) write_failed(L, j);
  parmap_journal_close(j); /* and unlocked: a next run may open it */
}

void parmap_journal_close(ParmapJournal *j) {
  (void)commit(j, 1);
  if (j->fd >= 0 && j->owner == getpid()) parmap_fd_close(j->fd);
  j->fd = -1;
}

static int entry_cmp(const void *a, const void *b) {
  const Entry *x = (const Entry *)a, *y = (const Entry *)b;
  if (x->index != y->index) return x->index < y->index ? -1 : 1;
  return x->off < y->off ? -1 : x->off > y->off; /* the first one first */
}

static int j_gc(lua_State *L) {
  ParmapJournal *j = (ParmapJournal *)luaL_checkudata(L, 1, PARMAP_JOURNAL_MT);
  parmap_journal_close(j);
  drop(j);
  return 0;
}

/* j:info(): a table {total =, count =, items = {indices...}} (for tests and
   for a user who wants to see what a journal holds). */
static int j_info(lua_State *L) {
  ParmapJournal *j = (ParmapJournal *)luaL_checkudata(L, 1, PARMAP_JOURNAL_MT);
  size_t i;
  lua_createtable(L, 0, 3);
  if (j->total >= 0) lua_pushinteger(L, j->total);
  else lua_pushnil(L);
  lua_setfield(L, -2, "total");
  if (j->count >= 0) lua_pushinteger(L, j->count);
  else lua_pushnil(L);
  lua_setfield(L, -2, "count");
  lua_createtable(L, (int)(j->ne < 1000000 ? j->ne : 0), 0);
  for (i = 0; i < j->ne; i++) {
    lua_pushinteger(L, j->e[i].index);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "items");
  return 1;
}

/* j:close(): write out, sync and close now. */
static int j_close(lua_State *L) {
  ParmapJournal *j = (ParmapJournal *)luaL_checkudata(L, 1, PARMAP_JOURNAL_MT);
  int bad = commit(j, 1);
  if (bad) {
    lua_pushfstring(L, "parmap: journal '%s': cannot write (%s)", j->path,
                    strerror(errno));
    drop(j);
    return lua_error(L);
  }
  drop(j);
  return 0;
}

/* core.journal(path, fingerprint, total): open (or create) the journal
   for a map whose fn has that fingerprint (bytes, hashed here) and that
   many items (-1: unknown). */
static int j_open(lua_State *L) {
  size_t plen, flen;
  const char *path = luaL_checklstring(L, 1, &plen);
  const char *fpb = luaL_checklstring(L, 2, &flen);
  lua_Integer total = luaL_checkinteger(L, 3);
  ParmapJournal *j;
  struct stat st;
  size_t pos, good, cap = 0;
  j = (ParmapJournal *)lua_newuserdatauv(L, sizeof *j, 0);
  memset(j, 0, sizeof *j);
  j->fd = -1;
  j->owner = getpid();
  j->total = j->count = -1;
  luaL_setmetatable(L, PARMAP_JOURNAL_MT);
  j->fp = fnv1a(fpb, flen);
  j->path = (char *)malloc(plen + 1);
  if (j->path == NULL) return luaL_error(L, "parmap: not enough memory");
  memcpy(j->path, path, plen + 1);
  j->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (j->fd < 0)
    return luaL_error(L, "parmap: bad option 'journal' (cannot open '%s': %s)",
                      path, strerror(errno));
  parmap_fd_register(j->fd); /* workers close it */
  if (flock(j->fd, LOCK_EX | LOCK_NB)) {
    int e = errno;
    drop(j);
    if (e == EWOULDBLOCK)
      return luaL_error(L, "parmap: journal '%s' is in use by another run",
                        path);
    return luaL_error(L, "parmap: journal '%s': cannot lock (%s)", path,
                      strerror(e));
  }
  if (fstat(j->fd, &st)) goto ioerr;
  if (st.st_size == 0) { /* new: the header */
    char h[HDR_LEN];
    int64_t t = (int64_t)total;
    uint32_t crc;
    memset(h, 0, sizeof h);
    memcpy(h, MAGIC, 8);
    memcpy(h + 8, &j->fp, 8);
    memcpy(h + 16, &t, 8);
    crc = rec_crc(0, h, 28);
    memcpy(h + 28, &crc, 4);
    if (write_file(j->fd, h, sizeof h) || fsync(j->fd)) goto ioerr;
    j->total = total;
    j->synced_ns = parmap_now_ns();
    return 1;
  }
  j->data = (char *)malloc((size_t)st.st_size);
  if (j->data == NULL) return luaL_error(L, "parmap: not enough memory");
  if (pread(j->fd, j->data, (size_t)st.st_size, 0) != (ssize_t)st.st_size)
    goto ioerr;
  {
    uint32_t crc;
    int64_t t;
    uint64_t fp;
    if (st.st_size >= HDR_LEN) memcpy(&crc, j->data + 28, 4);
    if (st.st_size < HDR_LEN || memcmp(j->data, MAGIC, 8) ||
        crc != rec_crc(0, j->data, 28)) {
      drop(j);
      return luaL_error(L, "parmap: bad option 'journal' ('%s' is not a "
                        "parmap journal; it was left as it is)", path);
    }
    memcpy(&fp, j->data + 8, 8);
    memcpy(&t, j->data + 16, 8);
    if (fp != j->fp) {
      char was[20], is[20];
      snprintf(was, sizeof was, "%016llx", (unsigned long long)fp);
      snprintf(is, sizeof is, "%016llx", (unsigned long long)j->fp);
      drop(j);
      return luaL_error(L, "parmap: journal '%s' was written by a different "
                        "fn (bytecode fingerprint %s, this map's fn has %s): "
                        "use another journal, or delete it to start over",
                        path, was, is);
    }
    j->total = (lua_Integer)t;
  }
  for (pos = good = HDR_LEN; pos + REC_HDR <= (size_t)st.st_size;) {
    uint32_t len, crc;
    int64_t index;
    memcpy(&len, j->data + pos, 4);
    memcpy(&crc, j->data + pos + 4, 4);
    memcpy(&index, j->data + pos + 8, 8);
    if (len > (size_t)st.st_size - pos - REC_HDR ||
        crc != rec_crc(index, j->data + pos + REC_HDR, len) || index < 0 ||
        (index == 0 && len != 8) || (index > 0 && len == 0))
      break; /* torn (killed mid-write) or corrupt: dropped from here */
    if (index == 0) {
      int64_t c;
      memcpy(&c, j->data + pos + REC_HDR, 8);
      j->count = (lua_Integer)c;
    } else {
      if (j->ne == cap) {
        size_t ncap = cap ? 2 * cap : 256;
        Entry *e = (Entry *)realloc(j->e, ncap * sizeof *e);
        if (e == NULL) return luaL_error(L, "parmap: not enough memory");
        j->e = e;
        cap = ncap;
      }
      j->e[j->ne].index = (lua_Integer)index;
      j->e[j->ne].off = pos + REC_HDR;
      j->e[j->ne].len = len;
      j->ne++;
    }
    pos += REC_HDR + len;
    good = pos;
  }
  if (good < (size_t)st.st_size && (ftruncate(j->fd, (off_t)good) || fsync(j->fd)))
    goto ioerr;
  if (lseek(j->fd, (off_t)good, SEEK_SET) < 0) goto ioerr;
  j->synced_ns = parmap_now_ns();
  if (j->ne > 1) { /* by index, a result met twice keeps the first */
    size_t i, k = 0;
    qsort(j->e, j->ne, sizeof *j->e, entry_cmp);
    for (i = 0; i < j->ne; i++)
      if (k == 0 || j->e[k - 1].index != j->e[i].index) j->e[k++] = j->e[i];
    j->ne = k;
  }
  {
    lua_Integer known = j->total >= 0 ? j->total : j->count;
    if (known >= 0 && total >= 0 && known != total) {
      drop(j);
      return luaL_error(L, "parmap: journal '%s' was written for a map of %I "
                        "items, this one has %I (a different map: use another "
                        "journal)", path, (LUAI_UACINT)known,
                        (LUAI_UACINT)total);
    }
    if (known >= 0 && j->ne > 0 && j->e[j->ne - 1].index > known) {
      drop(j);
      return luaL_error(L, "parmap: journal '%s' is corrupt (it holds item %I "
                        "of a map of %I items)", path,
                        (LUAI_UACINT)j->e[j->ne - 1].index, (LUAI_UACINT)known);
    }
  }
  return 1;
ioerr : {
  int e = errno;
  drop(j);
  return luaL_error(L, "parmap: journal '%s': %s", path, strerror(e));
}
}

void parmap_journal_register(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"info", j_info}, {"close", j_close}, {NULL, NULL}};
  if (luaL_newmetatable(L, PARMAP_JOURNAL_MT)) {
    lua_pushcfunction(L, j_gc);
    lua_setfield(L, -2, "__gc");
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, j_open);
  lua_setfield(L, -2, "journal");
}
