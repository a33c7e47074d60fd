/*
** codec.c: the value codec (see codec.h for the record layout).
** Owns the wire format of values. Must not know about workers or pipes.
*/
#include "codec.h"

#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Tags. A tag byte with the high bit set is a small non-negative integer. */
enum {
  T_NIL = 0,
  T_FALSE,
  T_TRUE,
  T_INT,   /* zigzag varint */
  T_FLOAT, /* 8 bytes, native order: both ends are the same machine */
  T_STR,   /* varint length, bytes */
  T_TNEW,  /* a table met for the first time: varint array-size hint */
  T_TREF,  /* a table met before: varint id */
  T_END,   /* end of a table body's hash part */
  T_SMALL = 0x80
};

/* ---------------------------------------------------------------- bytes */

int parmap_put_varint(parmap_buf *b, unsigned long long v) {
  if (parmap_buf_reserve(b, PARMAP_VARINT_MAX)) return -1;
  b->len = (size_t)(parmap_varint_unsafe(b->p + b->len, v) - b->p);
  return 0;
}

int parmap_get_varint(const char *p, size_t len, size_t *pos,
                      unsigned long long *v) {
  unsigned long long r = 0;
  unsigned shift = 0;
  size_t i = *pos;
  for (;;) {
    unsigned char c;
    if (i >= len || shift > 63) return -1;
    c = (unsigned char)p[i++];
    r |= (unsigned long long)(c & 0x7f) << shift;
    if (!(c & 0x80)) break;
    shift += 7;
  }
  *pos = i;
  *v = r;
  return 0;
}

/* ---------------------------------------------------------------- encoder */

typedef struct Enc {
  lua_State *L;
  parmap_buf *b;
  int scratch;
  lua_Integer ntab; /* tables numbered so far */
  const char *what;
} Enc;

static void enc_nomem(Enc *e) { luaL_error(e->L, "parmap: not enough memory"); }

static inline void put_byte(Enc *e, int c) {
  if (e->b->len == e->b->cap && parmap_buf_grow(e->b, 1)) enc_nomem(e);
  e->b->p[e->b->len++] = (char)c;
}

static inline void put_uv(Enc *e, unsigned long long v) {
  if (v < 0x80 && e->b->len < e->b->cap) {
    e->b->p[e->b->len++] = (char)v;
  } else if (parmap_put_varint(e->b, v)) {
    enc_nomem(e);
  }
}

static void put_bytes(Enc *e, const void *s, size_t n) {
  if (parmap_buf_reserve(e->b, n)) enc_nomem(e);
  memcpy(e->b->p + e->b->len, s, n);
  e->b->len += n;
}

/* Write the value at absolute index idx; a table becomes a reference. */
static int put_value(Enc *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
    case LUA_TNIL:
      put_byte(e, T_NIL);
      return 0;
    case LUA_TBOOLEAN:
      put_byte(e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
      return 0;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        lua_Integer i = lua_tointeger(L, idx);
        if (i >= 0 && i < 0x80) {
          put_byte(e, T_SMALL | (int)i);
        } else {
          put_byte(e, T_INT);
          put_uv(e, parmap_zigzag(i));
        }
      } else {
        double d = (double)lua_tonumber(L, idx);
        put_byte(e, T_FLOAT);
        put_bytes(e, &d, sizeof d);
      }
      return 0;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      put_byte(e, T_STR);
      put_uv(e, n);
      put_bytes(e, s, n);
      return 0;
    }
    case LUA_TTABLE: {
      if (e->ntab == 0) luaL_checkstack(L, 8, "parmap encoder");
      lua_pushvalue(L, idx);
      if (lua_rawget(L, e->scratch) == LUA_TNUMBER) {
        lua_Integer id = lua_tointeger(L, -1);
        lua_pop(L, 1);
        put_byte(e, T_TREF);
        put_uv(e, (unsigned long long)id);
        return 0;
      }
      lua_pop(L, 1);
      e->ntab++;
      lua_pushvalue(L, idx);
      lua_pushinteger(L, e->ntab);
      lua_rawset(L, e->scratch); /* scratch[t] = id */
      lua_pushvalue(L, idx);
      lua_rawseti(L, e->scratch, e->ntab); /* scratch[id] = t */
      put_byte(e, T_TNEW);
      put_uv(e, (unsigned long long)lua_rawlen(L, idx));
      return 0;
    }
    default:
      e->what = luaL_typename(L, idx);
      return -1;
  }
}

/* Write the body of the table on top of the stack. */
static int put_body(Enc *e) {
  lua_State *L = e->L;
  int t = lua_gettop(L);
  lua_Unsigned n = lua_rawlen(L, t), i;
  put_uv(e, n);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, t, (lua_Integer)i);
    if (put_value(e, t + 1)) return -1;
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_isinteger(L, t + 1)) {
      lua_Integer k = lua_tointeger(L, t + 1);
      if (k >= 1 && (lua_Unsigned)k <= n) {
        lua_pop(L, 1);
        continue;
      }
    }
    if (put_value(e, t + 1) || put_value(e, t + 2)) return -1;
    lua_pop(L, 1);
  }
  put_byte(e, T_END);
  return 0;
}

/* Leave the scratch table empty again. */
static void clear_scratch(lua_State *L, int scratch, lua_Integer ntab,
                          int keyed) {
  lua_Integer q;
  for (q = 1; q <= ntab; q++) {
    if (keyed) {
      lua_rawgeti(L, scratch, q);
      lua_pushnil(L);
      lua_rawset(L, scratch);
    }
    lua_pushnil(L);
    lua_rawseti(L, scratch, q);
  }
}

int parmap_encode(lua_State *L, int first, int n, parmap_buf *b, int scratch,
                  const char **what) {
  Enc e;
  int top = lua_gettop(L), i, rc = PARMAP_OK;
  size_t oldlen = b->len;
  lua_Integer q;
  e.L = L;
  e.b = b;
  e.scratch = scratch;
  e.ntab = 0;
  e.what = NULL;
  put_uv(&e, (unsigned long long)n);
  for (i = 0; i < n && rc == PARMAP_OK; i++)
    if (put_value(&e, first + i)) rc = PARMAP_EVALUE;
  for (q = 1; q <= e.ntab && rc == PARMAP_OK; q++) {
    lua_rawgeti(L, scratch, q);
    if (put_body(&e)) rc = PARMAP_EVALUE;
    lua_settop(L, top);
  }
  if (e.ntab > 0) {
    lua_settop(L, top);
    clear_scratch(L, scratch, e.ntab, 1);
  }
  if (rc != PARMAP_OK) {
    b->len = oldlen;
    *what = e.what;
  }
  return rc;
}

int parmap_encode_scalar(lua_State *L, int idx, parmap_buf *b) {
  char *q;
  size_t n = 0;
  const char *str = NULL;
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) str = lua_tolstring(L, idx, &n);
  else if (t != LUA_TNUMBER && t != LUA_TBOOLEAN && t != LUA_TNIL) return 0;
  /* count, tag, varint or 8 bytes, and n bytes: one reservation (a Lua
     string is far shorter than SIZE_MAX: the sum cannot wrap) */
  if (parmap_buf_reserve(b, n + 2 + PARMAP_VARINT_MAX))
    return 0; /* let parmap_encode raise */
  q = b->p + b->len;
  *q++ = 1; /* one value */
  if (t == LUA_TNUMBER && lua_isinteger(L, idx)) {
    lua_Integer i = lua_tointeger(L, idx);
    if (i >= 0 && i < 0x80) {
      *q++ = (char)(T_SMALL | (int)i);
    } else {
      *q++ = (char)T_INT;
      q = parmap_varint_unsafe(q, parmap_zigzag(i));
    }
  } else if (t == LUA_TNUMBER) {
    double d = (double)lua_tonumber(L, idx);
    *q++ = (char)T_FLOAT;
    memcpy(q, &d, sizeof d);
    q += sizeof d;
  } else if (t == LUA_TSTRING) {
    *q++ = (char)T_STR;
    q = parmap_varint_unsafe(q, n);
    memcpy(q, str, n);
    q += n;
  } else if (t == LUA_TBOOLEAN) {
    *q++ = (char)(lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
  } else {
    *q++ = (char)T_NIL;
  }
  b->len = (size_t)(q - b->p);
  return 1;
}

/* ---------------------------------------------------------------- decoder */

typedef struct Dec {
  lua_State *L;
  const char *p;
  size_t len, pos;
  int scratch;
  lua_Integer ntab;
  const char *err;
} Dec;

static int bad(Dec *d, const char *why) {
  d->err = why;
  return -1;
}

static inline int get_uv(Dec *d, unsigned long long *v) {
  if (d->pos < d->len && !(d->p[d->pos] & 0x80)) {
    *v = (unsigned char)d->p[d->pos++];
    return 0;
  }
  return parmap_get_varint(d->p, d->len, &d->pos, v) ? bad(d, "bad varint")
                                                      : 0;
}

/* Push the next value. */
static int get_value(Dec *d) {
  lua_State *L = d->L;
  unsigned long long v;
  int tag;
  if (d->pos >= d->len) return bad(d, "truncated value");
  tag = (unsigned char)d->p[d->pos++];
  if (tag & T_SMALL) {
    lua_pushinteger(L, tag & 0x7f);
    return 0;
  }
  switch (tag) {
    case T_NIL:
      lua_pushnil(L);
      return 0;
    case T_FALSE:
    case T_TRUE:
      lua_pushboolean(L, tag == T_TRUE);
      return 0;
    case T_INT:
      if (get_uv(d, &v)) return -1;
      lua_pushinteger(L, parmap_unzigzag(v));
      return 0;
    case T_FLOAT: {
      double x;
      if (d->len - d->pos < sizeof x) return bad(d, "truncated float");
      memcpy(&x, d->p + d->pos, sizeof x);
      d->pos += sizeof x;
      lua_pushnumber(L, (lua_Number)x);
      return 0;
    }
    case T_STR:
      if (get_uv(d, &v)) return -1;
      if (v > d->len - d->pos) return bad(d, "truncated string");
      lua_pushlstring(L, d->p + d->pos, (size_t)v);
      d->pos += (size_t)v;
      return 0;
    case T_TNEW:
      if (d->ntab == 0 && !lua_checkstack(L, 8))
        return bad(d, "no room on the Lua stack");
      if (get_uv(d, &v)) return -1;
      /* every element takes a byte: a larger hint is a lie */
      if (v > d->len - d->pos) v = d->len - d->pos;
      lua_createtable(L, v > PARMAP_MAX_PREALLOC ? PARMAP_MAX_PREALLOC : (int)v,
                      0);
      lua_pushvalue(L, -1);
      lua_rawseti(L, d->scratch, ++d->ntab);
      return 0;
    case T_TREF:
      if (get_uv(d, &v)) return -1;
      if (v < 1 || v > (unsigned long long)d->ntab)
        return bad(d, "reference to an unknown table");
      lua_rawgeti(L, d->scratch, (lua_Integer)v);
      return 0;
    default:
      return bad(d, "unknown tag");
  }
}

/* Fill the table on top of the stack from its body. */
static int get_body(Dec *d) {
  lua_State *L = d->L;
  int t = lua_gettop(L);
  unsigned long long n, i;
  if (get_uv(d, &n)) return -1;
  if (n > d->len - d->pos) return bad(d, "array longer than the message");
  for (i = 1; i <= n; i++) {
    if (get_value(d)) return -1;
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (;;) {
    if (d->pos >= d->len) return bad(d, "truncated table");
    if ((unsigned char)d->p[d->pos] == T_END) {
      d->pos++;
      return 0;
    }
    if (get_value(d)) return -1;
    if (lua_isnil(L, -1) ||
        (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
         isnan((double)lua_tonumber(L, -1))))
      return bad(d, "invalid table key");
    if (get_value(d)) return -1;
    lua_rawset(L, t);
  }
}

int parmap_decode_scalar(lua_State *L, const char *p, size_t len,
                         size_t *pos) {
  Dec d;
  int tag;
  size_t i = *pos;
  if (i >= len || len - i < 2 || p[i] != 1) return 0; /* count 1, a tag */
  tag = (unsigned char)p[i + 1];
  if (tag & T_SMALL) { /* the most common result: a small integer */
    lua_pushinteger(L, tag & 0x7f);
    *pos = i + 2;
    return 1;
  }
  if (tag == T_INT) {
    unsigned long long v;
    size_t j = i + 2;
    if (parmap_get_varint(p, len, &j, &v)) return 0;
    lua_pushinteger(L, parmap_unzigzag(v));
    *pos = j;
    return 1;
  }
  if (tag == T_TNEW || tag == T_TREF || tag == T_END) return 0;
  d.L = L;
  d.p = p;
  d.len = len;
  d.pos = i + 1;
  d.scratch = 0;
  d.ntab = 0;
  d.err = NULL;
  if (get_value(&d)) return 0; /* malformed: let parmap_decode say why */
  *pos = d.pos;
  return 1;
}

int parmap_decode_plain(lua_State *L, const char *p, size_t len,
                        size_t *pos) {
  size_t i = *pos;
  int tag;
  if (i >= len || len - i < 2 || p[i] != 1) return 0;
  tag = (unsigned char)p[i + 1];
  if (!(tag & T_SMALL) && tag != T_INT && tag != T_FLOAT && tag != T_NIL &&
      tag != T_TRUE && tag != T_FALSE)
    return 0; /* a string or a table: it allocates */
  return parmap_decode_scalar(L, p, len, pos);
}

/* One value for parmap_skip: *ntab counts the tables it opens. */
static int skip_value(const char *p, size_t len, size_t *i,
                      unsigned long long *ntab) {
  unsigned long long v;
  int tag;
  if (*i >= len) return -1;
  tag = (unsigned char)p[(*i)++];
  if (tag & T_SMALL) return 0;
  switch (tag) {
    case T_NIL: case T_FALSE: case T_TRUE:
      return 0;
    case T_INT: case T_TREF:
      return parmap_get_varint(p, len, i, &v);
    case T_FLOAT:
      if (len - *i < sizeof(double)) return -1;
      *i += sizeof(double);
      return 0;
    case T_STR:
      if (parmap_get_varint(p, len, i, &v) || v > len - *i) return -1;
      *i += (size_t)v;
      return 0;
    case T_TNEW:
      ++*ntab;
      return parmap_get_varint(p, len, i, &v);
    default:
      return -1;
  }
}

int parmap_skip(const char *p, size_t len, size_t *pos) {
  unsigned long long n, k, ntab = 0, q;
  size_t i = *pos;
  if (i < len && len - i >= 2 && p[i] == 1) { /* one scalar, the common case */
    int tag = (unsigned char)p[i + 1];
    if (tag & T_SMALL) {
      *pos = i + 2;
      return 0;
    }
  }
  if (parmap_get_varint(p, len, &i, &n) || n > len - i) return -1;
  for (k = 0; k < n; k++)
    if (skip_value(p, len, &i, &ntab)) return -1;
  for (q = 1; q <= ntab; q++) { /* the bodies; they may open more tables */
    if (parmap_get_varint(p, len, &i, &n) || n > len - i) return -1;
    for (k = 0; k < n; k++)
      if (skip_value(p, len, &i, &ntab)) return -1;
    for (;;) {
      if (i >= len) return -1;
      if ((unsigned char)p[i] == T_END) {
        i++;
        break;
      }
      if (skip_value(p, len, &i, &ntab) || skip_value(p, len, &i, &ntab))
        return -1;
    }
  }
  *pos = i;
  return 0;
}

int parmap_decode(lua_State *L, const char *p, size_t len, size_t *pos,
                  int scratch, const char **err) {
  Dec d;
  unsigned long long n, i;
  int top = lua_gettop(L), rc = 0;
  lua_Integer q;
  d.L = L;
  d.p = p;
  d.len = len;
  d.pos = *pos;
  d.scratch = scratch;
  d.ntab = 0;
  d.err = NULL;
  if (get_uv(&d, &n) || n > d.len - d.pos) {
    *err = d.err ? d.err : "value count longer than the message";
    return PARMAP_ECORRUPT;
  }
  if (n > PARMAP_MAX_VALUES || (n > 8 && !lua_checkstack(L, (int)n + 8))) {
    *err = "too many values for the Lua stack (at most 1000000)";
    return PARMAP_ECORRUPT;
  }
  for (i = 0; i < n && rc == 0; i++) rc = get_value(&d);
  for (q = 1; q <= d.ntab && rc == 0; q++) {
    lua_rawgeti(L, scratch, q);
    rc = get_body(&d);
    lua_settop(L, top + (int)n);
  }
  if (d.ntab > 0) clear_scratch(L, scratch, d.ntab, 0);
  if (rc) {
    lua_settop(L, top);
    *err = d.err;
    return PARMAP_ECORRUPT;
  }
  *pos = d.pos;
  return (int)n;
}
