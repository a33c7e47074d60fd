/*
** fnenc.c: closures by value (see fnenc.h).
**
** A record:
**   "PMFN" 1                          magic and version
**   string package.path, string package.cpath
**   value                             the root: a function
**   sections: S_BODY (the body of the next object, in the order the
**             objects were first met), S_GLOBAL name value, then S_END.
** A value is a scalar (as in codec.c), V_TNEW (a table met for the first
** time: array-size hint), V_FNEW (a Lua function met for the first time:
** its bytecode, lua_dump'ed without stripping), V_REF id (an object met
** before), V_GLOBALS (the receiver's global table), V_MOD m (the receiver's
** require(m)), V_MODF m k (require(m)[k]).
** A table's body: key/value pairs, V_ENDT, then its metatable (a value).
** A function's body: its upvalue count, then per upvalue U_VAL value (the
** first closure met that holds this upvalue sets it) or U_JOIN fid n (the
** same upvalue as upvalue n of object fid: lua_upvaluejoin).
** Objects are numbered when first met and their bodies written later, so
** neither side recurses on the data: cycles, recursion (a function among
** its own upvalues) and deep nesting cost no C stack.
**
** Globals: a function whose _ENV upvalue is the global table gets the
** globals its code reads sent by value (S_GLOBAL), found by parsing its
** dumped prototype (and every nested one): each GETTABUP instruction whose
** table is an upvalue named _ENV and whose key is a string constant is a
** read of a global. Writes need nothing. Reads through a computed key
** (_ENV[k], _G[k]) are not seen: those globals do not travel.
**
** Modules by name: every value that is package.loaded[m] or a function or
** table field package.loaded[m][k] (for m = "_G": only C functions) travels
** as a name, and the receiver requires m. A C function in no loaded
** module, userdata and coroutines are refused with the path of the value.
**
** Trust: the framing is checked like codec.c's (lengths, counts, object
** references, upvalue indices; no recursion; bounded Lua stack). The
** bytecode inside is loaded with lua_load (mode "b"), which checks its
** structure but not its instructions: a record is trusted as code from the
** same job is (as pickle is for mpi4py). Same architecture at both ends.
*/
#include "fnenc.h"

#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "buf.h"
#include "codec.h"

#if LUA_VERSION_NUM != 504
#error "fnenc.c parses Lua 5.4 bytecode"
#endif

enum {
  V_NIL = 0, V_FALSE, V_TRUE, V_INT, V_FLOAT, V_STR,
  V_TNEW, V_FNEW, V_REF, V_GLOBALS, V_MOD, V_MODF,
  V_ENDT = 0x7f
};
enum { S_BODY = 1, S_GLOBAL, S_END };
enum { U_VAL = 0, U_JOIN };
/* How an object was reached (for the path in a refusal). */
enum { K_ROOT = 0, K_UPV, K_FIELD, K_KEY, K_META, K_GLOBAL };

#define MAGIC "PMFN\1"
#define MAGIC_LEN 5
#define OP_GETTABUP 11 /* Lua 5.4's lopcodes.h */
#define OP_GETFIELD 14
#define MAX_PROTO_DEPTH 200

typedef struct Bufs {
  parmap_buf out, tmp;
} Bufs;

static int bufs_gc(lua_State *L) {
  Bufs *b = (Bufs *)lua_touserdata(L, 1);
  parmap_buf_free(&b->out);
  parmap_buf_free(&b->tmp);
  return 0;
}

/* ================================================================ encoder */

/* Stack slots, relative to base. */
enum {
  E_BUF = 1, E_SEEN, E_OBJS, E_UPV, E_MODN, E_MODK, E_PINFO, E_PKEY,
  E_GNAME, E_GREADER, E_GSENT, E_GLOBALS, E_NSLOTS = E_GLOBALS
};

typedef struct Enc {
  lua_State *L;
  int base;
  Bufs *bufs;
  parmap_buf *b;
  const char *root;
  lua_Integer nobj, nglob;
} Enc;

#define SLOT(e, s) ((e)->base + (s))

static void nomem(lua_State *L) { luaL_error(L, "parmap: not enough memory"); }

static void put_byte(Enc *e, int c) {
  if (parmap_buf_reserve(e->b, 1)) nomem(e->L);
  e->b->p[e->b->len++] = (char)c;
}

static void put_uv(Enc *e, unsigned long long v) {
  if (parmap_put_varint(e->b, v)) nomem(e->L);
}

static void put_bytes(Enc *e, const void *s, size_t n) {
  if (parmap_buf_reserve(e->b, n)) nomem(e->L);
  if (n) memcpy(e->b->p + e->b->len, s, n);
  e->b->len += n;
}

static void put_str(Enc *e, const char *s, size_t n) {
  put_uv(e, n);
  put_bytes(e, s, n);
}

/* Push the description of one step of a path ("upvalue 'f' of "). */
static void push_step(lua_State *L, int kind, int keyidx) {
  switch (kind) {
    case K_UPV:
      lua_pushfstring(L, "upvalue '%s' of ", lua_tostring(L, keyidx));
      return;
    case K_GLOBAL:
      lua_pushfstring(L, "global '%s' read by ", lua_tostring(L, keyidx));
      return;
    case K_KEY:
      lua_pushliteral(L, "a key of ");
      return;
    case K_META:
      lua_pushliteral(L, "the metatable of ");
      return;
    default: /* K_FIELD */
      switch (lua_type(L, keyidx)) {
        case LUA_TSTRING:
          lua_pushfstring(L, "field '%s' of ", lua_tostring(L, keyidx));
          return;
        case LUA_TNUMBER:
        case LUA_TBOOLEAN:
          luaL_tolstring(L, keyidx, NULL);
          lua_pushfstring(L, "[%s] of ", lua_tostring(L, -1));
          lua_remove(L, -2);
          return;
        default:
          lua_pushfstring(L, "a field (key: %s) of ", luaL_typename(L, keyidx));
          return;
      }
  }
}

/* Push the path of a value reached from object pid by (kind, key). */
static void push_path(Enc *e, lua_Integer pid, int kind, int keyidx) {
  lua_State *L = e->L;
  int n = 0;
  luaL_checkstack(L, 48, "parmap: path");
  if (kind != K_ROOT) {
    push_step(L, kind, keyidx);
    n++;
    while (n < 24) {
      lua_Integer info;
      lua_rawgeti(L, SLOT(e, E_PINFO), pid);
      info = lua_tointeger(L, -1);
      lua_pop(L, 1);
      if ((info & 7) == K_ROOT) break;
      lua_rawgeti(L, SLOT(e, E_PKEY), pid);
      push_step(L, (int)(info & 7), lua_gettop(L));
      lua_remove(L, -2);
      n++;
      pid = info >> 3;
    }
    if (n >= 24) {
      lua_pushliteral(L, "... of ");
      n++;
    }
  }
  lua_pushstring(L, e->root);
  lua_concat(L, n + 1);
}

static void refuse(Enc *e, int idx, lua_Integer pid, int kind, int keyidx) {
  lua_State *L = e->L;
  const char *path, *what = "userdata";
  int mt;
  push_path(e, pid, kind, keyidx);
  path = lua_tostring(L, -1);
  switch (lua_type(L, idx)) {
    case LUA_TUSERDATA:
      mt = luaL_getmetafield(L, idx, "__name");
      if (mt == LUA_TSTRING) what = lua_tostring(L, -1);
      luaL_error(L, "%s: cannot send a %s; open it in init", path, what);
      break;
    case LUA_TTHREAD:
      luaL_error(L, "%s: cannot send a coroutine; create it inside the "
                 "function or in init", path);
      break;
    case LUA_TFUNCTION:
      luaL_error(L, "%s: cannot send a C function that is in no loaded "
                 "module; require its module (package.loaded[m][k] travels "
                 "by name)", path);
      break;
    default:
      luaL_error(L, "%s: cannot send a %s", path, luaL_typename(L, idx));
  }
}

/* ------------------------------------------- globals read by bytecode */

typedef struct Rd {
  const unsigned char *p;
  size_t n, i;
} Rd;

typedef struct KStr {
  const char *s; /* NULL: not a string constant */
  size_t len;
} KStr;

static int rd_size(Rd *r, size_t *out) {
  size_t x = 0;
  int c;
  do {
    if (r->i >= r->n || x > (SIZE_MAX >> 8)) return -1;
    c = r->p[r->i++];
    x = (x << 7) | (size_t)(c & 0x7f);
  } while (!(c & 0x80));
  *out = x;
  return 0;
}

static int rd_skip(Rd *r, size_t k) {
  if (k > r->n - r->i) return -1;
  r->i += k;
  return 0;
}

/* A dumped string: *s NULL when absent. */
static int rd_string(Rd *r, const char **s, size_t *len) {
  size_t n;
  if (rd_size(r, &n)) return -1;
  if (n == 0) {
    *s = NULL;
    *len = 0;
    return 0;
  }
  n--;
  if (n > r->n - r->i) return -1;
  *s = (const char *)r->p + r->i;
  *len = n;
  r->i += n;
  return 0;
}

/* Parse one dumped function (ldump.c's dumpFunction) and its nested ones;
   names[k] = true for every global read (_ENV.k), gnames[k] = true for
   every _G.k (a GETFIELD with a constant key right after the read of _G,
   from the register it went to: _G.k, _G.k.x, f(_G.k)). Returns 0, or -1
   when the dump is not what Lua 5.4 writes. */
static int scan_function(lua_State *L, Rd *r, int names, int gnames,
                         int depth) {
  size_t ncode, nk, nup, np, i, n, codepos;
  const char *s;
  size_t len;
  KStr *ks;
  unsigned char isenv[256];
  if (depth > MAX_PROTO_DEPTH) return -1;
  if (rd_string(r, &s, &len) || rd_size(r, &n) || rd_size(r, &n) ||
      rd_skip(r, 3))
    return -1;
  if (rd_size(r, &ncode) || ncode > (r->n - r->i) / 4) return -1;
  codepos = r->i;
  r->i += ncode * 4;
  if (rd_size(r, &nk) || nk > r->n - r->i) return -1;
  luaL_checkstack(L, 4, "parmap: scan");
  ks = (KStr *)lua_newuserdatauv(L, nk * sizeof(KStr) + 1, 0);
  for (i = 0; i < nk; i++) {
    int tag;
    if (r->i >= r->n) return -1;
    tag = r->p[r->i++];
    ks[i].s = NULL;
    ks[i].len = 0;
    switch (tag) {
      case 0x00: case 0x01: case 0x11: break;           /* nil, false, true */
      case 0x03: if (rd_skip(r, sizeof(lua_Integer))) return -1; break;
      case 0x13: if (rd_skip(r, sizeof(lua_Number))) return -1; break;
      case 0x04: case 0x14:                              /* strings */
        if (rd_string(r, &ks[i].s, &ks[i].len)) return -1;
        break;
      default: return -1;
    }
  }
  if (rd_size(r, &nup) || nup > 255 || rd_skip(r, nup * 3)) return -1;
  if (rd_size(r, &np)) return -1;
  for (i = 0; i < np; i++)
    if (scan_function(L, r, names, gnames, depth + 1)) return -1;
  /* debug: lineinfo, abslineinfo, locvars, upvalue names */
  if (rd_size(r, &n) || rd_skip(r, n)) return -1;
  if (rd_size(r, &n)) return -1;
  for (i = 0; i < n; i++) {
    size_t x;
    if (rd_size(r, &x) || rd_size(r, &x)) return -1;
  }
  if (rd_size(r, &n)) return -1;
  for (i = 0; i < n; i++) {
    size_t x;
    if (rd_string(r, &s, &len) || rd_size(r, &x) || rd_size(r, &x)) return -1;
  }
  if (rd_size(r, &n) || n > nup) return -1;
  memset(isenv, 0, sizeof isenv);
  for (i = 0; i < n; i++) {
    if (rd_string(r, &s, &len)) return -1;
    isenv[i] = (s != NULL && len == 4 && memcmp(s, "_ENV", 4) == 0);
  }
  for (i = 0; i < ncode; i++) {
    uint32_t ins;
    unsigned b, c;
    memcpy(&ins, r->p + codepos + 4 * i, 4);
    if ((ins & 0x7f) != OP_GETTABUP) continue;
    b = (ins >> 16) & 0xff;
    c = (ins >> 24) & 0xff;
    if (b < nup && isenv[b] && c < nk && ks[c].s != NULL) {
      lua_pushlstring(L, ks[c].s, ks[c].len);
      lua_pushboolean(L, 1);
      lua_rawset(L, names);
      if (ks[c].len == 2 && memcmp(ks[c].s, "_G", 2) == 0 && i + 1 < ncode) {
        uint32_t nx;
        unsigned ra = (ins >> 7) & 0xff, nb, nc;
        memcpy(&nx, r->p + codepos + 4 * (i + 1), 4);
        nb = (nx >> 16) & 0xff;
        nc = (nx >> 24) & 0xff;
        if ((nx & 0x7f) == OP_GETFIELD && nb == ra && nc < nk &&
            ks[nc].s != NULL) {
          lua_pushlstring(L, ks[nc].s, ks[nc].len);
          lua_pushboolean(L, 1);
          lua_rawset(L, gnames);
        }
      }
    }
  }
  lua_pop(L, 1); /* ks */
  return 0;
}

/* The globals the dumped function in d reads: names[k] = true (through
   _ENV), gnames[k] = true (through _G). */
static int scan_dump(lua_State *L, const parmap_buf *d, int names,
                     int gnames) {
  Rd r;
  size_t hdr = 4 + 1 + 1 + 6 + 3 + sizeof(lua_Integer) + sizeof(lua_Number);
  r.p = (const unsigned char *)d->p;
  r.n = d->len;
  if (r.n < hdr + 1 || memcmp(r.p, LUA_SIGNATURE, 4) != 0 || r.p[4] != 0x54 ||
      r.p[5] != 0)
    return -1;
  r.i = hdr + 1; /* and the main closure's upvalue count */
  return scan_function(L, &r, names, gnames, 0) || r.i != r.n ? -1 : 0;
}

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  parmap_buf *t = (parmap_buf *)ud;
  (void)L;
  if (parmap_buf_reserve(t, sz)) return 1;
  memcpy(t->p + t->len, p, sz);
  t->len += sz;
  return 0;
}

/* ------------------------------------------------------------ values */

static lua_Integer new_object(Enc *e, int idx, lua_Integer pid, int kind,
                              int keyidx) {
  lua_State *L = e->L;
  lua_Integer id = ++e->nobj;
  lua_pushvalue(L, idx);
  lua_pushinteger(L, id);
  lua_rawset(L, SLOT(e, E_SEEN));
  lua_pushvalue(L, idx);
  lua_rawseti(L, SLOT(e, E_OBJS), id);
  lua_pushinteger(L, pid * 8 + kind);
  lua_rawseti(L, SLOT(e, E_PINFO), id);
  if (keyidx) {
    lua_pushvalue(L, keyidx);
    lua_rawseti(L, SLOT(e, E_PKEY), id);
  }
  return id;
}

/* Queue global k (the string at kidx), read by object id: sent with its
   value on this side, nil included (so a global the agents kept from an
   earlier map, or their own, is not what fn reads). */
static void queue_global(Enc *e, int kidx, lua_Integer id) {
  lua_State *L = e->L;
  lua_pushvalue(L, kidx);
  if (lua_rawget(L, SLOT(e, E_GSENT)) == LUA_TNIL) {
    e->nglob++;
    lua_pushvalue(L, kidx);
    lua_rawseti(L, SLOT(e, E_GNAME), e->nglob);
    lua_pushinteger(L, id);
    lua_rawseti(L, SLOT(e, E_GREADER), e->nglob);
    lua_pushvalue(L, kidx);
    lua_pushboolean(L, 1);
    lua_rawset(L, SLOT(e, E_GSENT));
  }
  lua_pop(L, 1);
}

/* t[k] (t at tidx, k at kidx) as a read finds it, through __index tables
   (bounded: a loop of them): when the read reaches the global table, k is
   a global. A table on the way travels by value with its metatable, and a
   __index function runs on the agent, so only _G needs this (fnenc sends
   _G as the receiver's own). With push, the value found (or nil) is
   pushed. */
#define MAX_INDEX_CHAIN 100
static void resolve_read(Enc *e, int tidx, int kidx, lua_Integer id, int push) {
  lua_State *L = e->L;
  int top = lua_gettop(L), k, found = 0;
  lua_pushvalue(L, tidx);
  for (k = 0; k < MAX_INDEX_CHAIN && lua_istable(L, -1); k++) {
    int t = lua_gettop(L);
    if (lua_rawequal(L, t, SLOT(e, E_GLOBALS))) {
      if (!push) queue_global(e, kidx, id);
      lua_pushvalue(L, kidx);
      lua_rawget(L, t);
      found = 1;
      break;
    }
    lua_pushvalue(L, kidx);
    if (lua_rawget(L, t) != LUA_TNIL) {
      found = 1;
      break;
    }
    lua_pop(L, 1);
    if (!lua_getmetatable(L, t)) break;
    lua_pushliteral(L, "__index");
    lua_rawget(L, -2);
    lua_replace(L, t); /* on to __index */
    lua_settop(L, t);
  }
  if (push) { /* a __index function's value is not known here: nil */
    if (!found) lua_pushnil(L);
    lua_replace(L, top + 1);
  }
  lua_settop(L, top + push);
}

/* Queue the globals read by the function at idx (object id): its code's
   reads through each _ENV upvalue (the global table, or a table whose
   __index leads there: a sandbox of load's env) and through _G. */
static void queue_globals(Enc *e, int idx, lua_Integer id) {
  lua_State *L = e->L;
  lua_Debug ar;
  int i, names, gnames, scanned = 0, top = lua_gettop(L);
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  for (i = 1; i <= ar.nups; i++) {
    int env;
    const char *nm = lua_getupvalue(L, idx, i);
    if (nm == NULL || strcmp(nm, "_ENV") != 0 || !lua_istable(L, -1)) {
      lua_pop(L, 1);
      continue;
    }
    env = lua_gettop(L);
    if (!scanned) {
      scanned = 1;
      lua_newtable(L);
      lua_newtable(L);
      lua_rotate(L, env, 2); /* names, gnames below the env */
      names = env;
      gnames = env + 1;
      env += 2;
      if (scan_dump(L, &e->bufs->tmp, names, gnames)) {
        push_path(e, id, K_ROOT, 0);
        luaL_error(L, "parmap: cannot read the bytecode of %s (not Lua 5.4's)",
                   lua_tostring(L, -1));
      }
    }
    lua_pushnil(L);
    while (lua_next(L, names)) {
      lua_pop(L, 1);
      resolve_read(e, env, lua_gettop(L), id, 0);
    }
    lua_pushliteral(L, "_G");
    resolve_read(e, env, lua_gettop(L), id, 1); /* what _G is there */
    if (lua_istable(L, -1)) {
      int g = lua_gettop(L);
      lua_pushnil(L);
      while (lua_next(L, gnames)) {
        lua_pop(L, 1);
        resolve_read(e, g, lua_gettop(L), id, 0);
      }
    }
    lua_settop(L, env - 1);
  }
  lua_settop(L, top);
}

/* Module references: 1 if the value at idx travels by name (written). */
static int put_modref(Enc *e, int idx) {
  lua_State *L = e->L;
  size_t n;
  const char *s;
  lua_pushvalue(L, idx);
  if (lua_rawget(L, SLOT(e, E_MODN)) != LUA_TSTRING) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, SLOT(e, E_MODK)) == LUA_TSTRING) {
    put_byte(e, V_MODF);
    s = lua_tolstring(L, -2, &n);
    put_str(e, s, n);
    s = lua_tolstring(L, -1, &n);
    put_str(e, s, n);
  } else {
    put_byte(e, V_MOD);
    s = lua_tolstring(L, -2, &n);
    put_str(e, s, n);
  }
  lua_pop(L, 2);
  return 1;
}

/* Write the value at idx (absolute), reached from object pid by (kind,
   key at keyidx): an object becomes a reference, its body comes later. */
static void put_value(Enc *e, int idx, lua_Integer pid, int kind, int keyidx) {
  lua_State *L = e->L;
  int t = lua_type(L, idx);
  switch (t) {
    case LUA_TNIL: put_byte(e, V_NIL); return;
    case LUA_TBOOLEAN: put_byte(e, lua_toboolean(L, idx) ? V_TRUE : V_FALSE); return;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        put_byte(e, V_INT);
        put_uv(e, parmap_zigzag(lua_tointeger(L, idx)));
      } else {
        double d = (double)lua_tonumber(L, idx);
        put_byte(e, V_FLOAT);
        put_bytes(e, &d, sizeof d);
      }
      return;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      put_byte(e, V_STR);
      put_str(e, s, n);
      return;
    }
    case LUA_TTABLE:
    case LUA_TFUNCTION:
      break;
    default:
      refuse(e, idx, pid, kind, keyidx);
      return;
  }
  if (lua_rawequal(L, idx, SLOT(e, E_GLOBALS))) {
    put_byte(e, V_GLOBALS);
    return;
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, SLOT(e, E_SEEN)) == LUA_TNUMBER) {
    put_byte(e, V_REF);
    put_uv(e, (unsigned long long)lua_tointeger(L, -1));
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
  if (put_modref(e, idx)) return;
  if (t == LUA_TTABLE) {
    new_object(e, idx, pid, kind, keyidx);
    put_byte(e, V_TNEW);
    put_uv(e, (unsigned long long)lua_rawlen(L, idx));
  } else if (lua_iscfunction(L, idx)) {
    refuse(e, idx, pid, kind, keyidx);
  } else {
    lua_Integer id = new_object(e, idx, pid, kind, keyidx);
    parmap_buf *tmp = &e->bufs->tmp;
    tmp->len = 0;
    lua_pushvalue(L, idx);
    if (lua_dump(L, dump_writer, tmp, 0) != 0) nomem(L);
    lua_pop(L, 1);
    put_byte(e, V_FNEW);
    put_str(e, tmp->p, tmp->len);
    queue_globals(e, idx, id);
  }
}

static void put_table_body(Enc *e, int t, lua_Integer id) {
  lua_State *L = e->L;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    put_value(e, t + 1, id, K_KEY, 0);
    put_value(e, t + 2, id, K_FIELD, t + 1);
    lua_pop(L, 1);
  }
  put_byte(e, V_ENDT);
  if (lua_getmetatable(L, t)) {
    put_value(e, lua_gettop(L), id, K_META, 0);
    lua_pop(L, 1);
  } else {
    put_byte(e, V_NIL);
  }
}

static void put_function_body(Enc *e, int f, lua_Integer id) {
  lua_State *L = e->L;
  lua_Debug ar;
  int i;
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  put_uv(e, ar.nups);
  for (i = 1; i <= ar.nups; i++) {
    const char *nm = lua_getupvalue(L, f, i);
    void *uid = lua_upvalueid(L, f, i);
    lua_pushlightuserdata(L, uid);
    if (lua_rawget(L, SLOT(e, E_UPV)) == LUA_TNUMBER) {
      lua_Integer ref = lua_tointeger(L, -1);
      put_byte(e, U_JOIN);
      put_uv(e, (unsigned long long)(ref >> 8));
      put_uv(e, (unsigned long long)(ref & 0xff));
      lua_pop(L, 2);
      continue;
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, uid);
    lua_pushinteger(L, id * 256 + i);
    lua_rawset(L, SLOT(e, E_UPV));
    if (nm == NULL || *nm == '\0') lua_pushfstring(L, "#%d", i);
    else lua_pushstring(L, nm);
    put_byte(e, U_VAL);
    put_value(e, lua_gettop(L) - 1, id, K_UPV, lua_gettop(L));
    lua_pop(L, 2);
  }
}

/* value -> module name (and key): the values that travel by name. */
static void index_modules(Enc *e) {
  lua_State *L = e->L;
  int loaded, pass;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  loaded = lua_gettop(L);
  if (!lua_istable(L, loaded)) {
    lua_pop(L, 1);
    return;
  }
  /* pass 0: C functions of _G; 1: fields of other modules; 2: modules.
     A later pass overwrites an earlier one's name for the same value. */
  for (pass = 0; pass < 3; pass++) {
    lua_pushnil(L);
    while (lua_next(L, loaded)) {
      int m = lua_gettop(L), isg;
      if (lua_type(L, m - 1) != LUA_TSTRING) {
        lua_pop(L, 1);
        continue;
      }
      isg = lua_rawequal(L, m, SLOT(e, E_GLOBALS));
      if (pass == 2 && !isg &&
          (lua_type(L, m) == LUA_TTABLE || lua_type(L, m) == LUA_TFUNCTION)) {
        lua_pushvalue(L, m);
        lua_pushvalue(L, m - 1);
        lua_rawset(L, SLOT(e, E_MODN));
        lua_pushvalue(L, m);
        lua_pushnil(L);
        lua_rawset(L, SLOT(e, E_MODK));
      } else if (pass < 2 && lua_type(L, m) == LUA_TTABLE && (pass == 0) == isg) {
        lua_pushnil(L);
        while (lua_next(L, m)) {
          int tv = lua_type(L, -1);
          if (lua_type(L, -2) == LUA_TSTRING &&
              (isg ? lua_iscfunction(L, -1)
                   : (tv == LUA_TFUNCTION || tv == LUA_TTABLE)) &&
              !lua_rawequal(L, -1, SLOT(e, E_GLOBALS))) {
            lua_pushvalue(L, -1);
            lua_pushvalue(L, m - 1);
            lua_rawset(L, SLOT(e, E_MODN));
            lua_pushvalue(L, -1);
            lua_pushvalue(L, -3);
            lua_rawset(L, SLOT(e, E_MODK));
          }
          lua_pop(L, 1);
        }
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
}

static void put_package_string(Enc *e, const char *field) {
  lua_State *L = e->L;
  size_t n = 0;
  const char *s = "";
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_LOADLIBNAME) == LUA_TTABLE &&
      lua_getfield(L, -1, field) == LUA_TSTRING)
    s = lua_tolstring(L, -1, &n);
  put_str(e, s, n);
  lua_settop(L, top);
}

void parmap_fn_encode(lua_State *L, int idx, const char *root) {
  Enc e;
  int i;
  lua_Integer done = 0, g = 0;
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, E_NSLOTS + 24, "parmap: encoder");
  e.L = L;
  e.base = lua_gettop(L);
  e.root = root;
  e.nobj = e.nglob = 0;
  e.bufs = (Bufs *)lua_newuserdatauv(L, sizeof(Bufs), 0);
  memset(e.bufs, 0, sizeof(Bufs));
  if (luaL_newmetatable(L, "parmap.fnenc.bufs")) {
    lua_pushcfunction(L, bufs_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  e.b = &e.bufs->out;
  for (i = E_SEEN; i < E_GLOBALS; i++) lua_newtable(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  index_modules(&e);

  put_bytes(&e, MAGIC, MAGIC_LEN);
  put_package_string(&e, "path");
  put_package_string(&e, "cpath");
  if (!lua_isfunction(L, idx)) luaL_error(L, "%s: not a function", root);
  put_value(&e, idx, 0, K_ROOT, 0);
  for (;;) {
    if (done < e.nobj) {
      int o;
      done++;
      put_byte(&e, S_BODY);
      lua_rawgeti(L, SLOT(&e, E_OBJS), done);
      o = lua_gettop(L);
      if (lua_istable(L, o)) put_table_body(&e, o, done);
      else put_function_body(&e, o, done);
      lua_settop(L, SLOT(&e, E_NSLOTS));
    } else if (g < e.nglob) {
      size_t n;
      const char *s;
      lua_Integer reader;
      g++;
      lua_rawgeti(L, SLOT(&e, E_GNAME), g);
      lua_rawgeti(L, SLOT(&e, E_GREADER), g);
      reader = lua_tointeger(L, -1);
      lua_pop(L, 1);
      s = lua_tolstring(L, -1, &n);
      put_byte(&e, S_GLOBAL);
      put_str(&e, s, n);
      lua_pushvalue(L, -1);
      lua_rawget(L, SLOT(&e, E_GLOBALS));
      put_value(&e, lua_gettop(L), reader, K_GLOBAL, lua_gettop(L) - 1);
      lua_settop(L, SLOT(&e, E_NSLOTS));
    } else {
      break;
    }
  }
  put_byte(&e, S_END);
  lua_pushlstring(L, e.b->p, e.b->len);
  parmap_buf_free(&e.bufs->out);
  parmap_buf_free(&e.bufs->tmp);
  lua_replace(L, e.base + 1);
  lua_settop(L, e.base + 1); /* the Bufs are collected */
}

/* ================================================================ decoder */

enum { D_OBJS = 1, D_GLOBALS, D_NSLOTS = D_GLOBALS };

typedef struct Dec {
  lua_State *L;
  int base;
  const char *p;
  size_t len, pos;
  lua_Integer nobj;
  int save; /* 0, or the table that keeps what each global set was */
} Dec;

static void corrupt(Dec *d, const char *why) {
  luaL_error(d->L, "parmap: bad closure record (%s at byte %d)", why,
             (int)d->pos);
}

static unsigned long long get_uv(Dec *d) {
  unsigned long long v;
  if (parmap_get_varint(d->p, d->len, &d->pos, &v)) corrupt(d, "bad varint");
  return v;
}

static int get_byte(Dec *d) {
  if (d->pos >= d->len) corrupt(d, "truncated");
  return (unsigned char)d->p[d->pos++];
}

static const char *get_str(Dec *d, size_t *n) {
  unsigned long long v = get_uv(d);
  const char *s;
  if (v > d->len - d->pos) corrupt(d, "truncated string");
  s = d->p + d->pos;
  d->pos += (size_t)v;
  *n = (size_t)v;
  return s;
}

static void push_module(Dec *d, const char *m, size_t n) {
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushlstring(L, m, n);
  if (lua_rawget(L, -2) != LUA_TNIL) {
    lua_remove(L, -2);
    return;
  }
  lua_pop(L, 2);
  lua_pushlstring(L, m, n); /* for the message */
  lua_getglobal(L, "require");
  lua_pushvalue(L, -2);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) { /* no position: not the caller's */
    const char *why = luaL_tolstring(L, -1, NULL);
    /* no "parmap: ": an agent's rank 0 says it, with the rank */
    lua_pushfstring(L, "the function needs module '%s', which does not load "
                    "(%s)", lua_tostring(L, -3), why);
    lua_error(L);
  }
  lua_remove(L, -2);
}

#ifndef PARMAP_FNENC_FUZZ
/* Push the function dumped in s. */
static void load_function(Dec *d, const char *s, size_t n) {
  if (luaL_loadbufferx(d->L, s, n, "=(parmap closure)", "b") != LUA_OK)
    luaL_error(d->L, "parmap: bad closure record (bytecode: %s)",
               lua_tostring(d->L, -1));
}
#else
/* The fuzz build (spec/fuzz_fnenc.c) trusts no bytecode, since lua_load
   does not verify it: a stand-in closure with as many upvalues as the
   dump's header says, so that the framing around it is what is fuzzed. */
static void load_function(Dec *d, const char *s, size_t n) {
  size_t hdr = 4 + 1 + 1 + 6 + 3 + sizeof(lua_Integer) + sizeof(lua_Number);
  int nups, i;
  luaL_Buffer b;
  if (n < hdr + 1) corrupt(d, "truncated bytecode");
  nups = (unsigned char)s[hdr];
  if (nups > 150) corrupt(d, "too many upvalues (fuzz build)");
  luaL_buffinit(d->L, &b);
  luaL_addstring(&b, "local u0");
  for (i = 1; i < nups; i++) lua_pushfstring(d->L, ",u%d", i), luaL_addvalue(&b);
  luaL_addstring(&b, nups ? "\nreturn function() return u0" : "\nreturn function() ");
  for (i = 1; i < nups; i++) lua_pushfstring(d->L, ",u%d", i), luaL_addvalue(&b);
  luaL_addstring(&b, " end");
  luaL_pushresult(&b);
  if (luaL_loadstring(d->L, lua_tostring(d->L, -1)) != LUA_OK) lua_error(d->L);
  lua_remove(d->L, -2);
  lua_call(d->L, 0, 1);
}
#endif

static void get_value(Dec *d) {
  lua_State *L = d->L;
  int tag = get_byte(d);
  unsigned long long v;
  size_t n, kn;
  const char *s, *k;
  switch (tag) {
    case V_NIL: lua_pushnil(L); return;
    case V_FALSE: lua_pushboolean(L, 0); return;
    case V_TRUE: lua_pushboolean(L, 1); return;
    case V_INT:
      v = get_uv(d);
      lua_pushinteger(L, parmap_unzigzag(v));
      return;
    case V_FLOAT: {
      double x;
      if (d->len - d->pos < sizeof x) corrupt(d, "truncated float");
      memcpy(&x, d->p + d->pos, sizeof x);
      d->pos += sizeof x;
      lua_pushnumber(L, (lua_Number)x);
      return;
    }
    case V_STR:
      s = get_str(d, &n);
      lua_pushlstring(L, s, n);
      return;
    case V_TNEW:
      v = get_uv(d);
      if (v > d->len - d->pos) v = d->len - d->pos; /* a hint, not trusted */
      lua_createtable(L, v > PARMAP_MAX_PREALLOC ? PARMAP_MAX_PREALLOC : (int)v,
                      0);
      lua_pushvalue(L, -1);
      lua_rawseti(L, d->base + D_OBJS, ++d->nobj);
      return;
    case V_FNEW: {
      s = get_str(d, &n);
      load_function(d, s, n);
      lua_pushvalue(L, -1);
      lua_rawseti(L, d->base + D_OBJS, ++d->nobj);
      return;
    }
    case V_REF:
      v = get_uv(d);
      if (v < 1 || v > (unsigned long long)d->nobj)
        corrupt(d, "reference to an unknown object");
      lua_rawgeti(L, d->base + D_OBJS, (lua_Integer)v);
      return;
    case V_GLOBALS:
      lua_pushvalue(L, d->base + D_GLOBALS);
      return;
    case V_MOD: /* a module; V_MODF: a field of one */
    case V_MODF:
      s = get_str(d, &n);
      k = tag == V_MODF ? get_str(d, &kn) : NULL;
      push_module(d, s, n);
      if (tag == V_MOD) return;
      if (!lua_istable(L, -1))
        luaL_error(L, "parmap: module '%s' is not a table here",
                   lua_pushlstring(L, s, n));
      lua_pushlstring(L, k, kn);
      if (lua_gettable(L, -2) == LUA_TNIL)
        luaL_error(L, "parmap: module '%s' has no field '%s' here",
                   lua_pushlstring(L, s, n), lua_pushlstring(L, k, kn));
      lua_remove(L, -2);
      return;
    default:
      corrupt(d, "unknown tag");
  }
}

static void get_table_body(Dec *d, int t) {
  lua_State *L = d->L;
  for (;;) {
    if (d->pos >= d->len) corrupt(d, "truncated table");
    if ((unsigned char)d->p[d->pos] == V_ENDT) {
      d->pos++;
      break;
    }
    get_value(d);
    if (lua_isnil(L, -1) ||
        (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) &&
         isnan((double)lua_tonumber(L, -1))))
      corrupt(d, "invalid table key");
    get_value(d);
    lua_rawset(L, t);
  }
  get_value(d); /* the metatable */
  if (lua_istable(L, -1)) lua_setmetatable(L, t);
  else if (!lua_isnil(L, -1)) corrupt(d, "a metatable that is not a table");
  else lua_pop(L, 1);
}

static int nups_of(lua_State *L, int f) {
  lua_Debug ar;
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  return ar.nups;
}

static void get_function_body(Dec *d, int f) {
  lua_State *L = d->L;
  unsigned long long n = get_uv(d), i;
  if (n != (unsigned long long)nups_of(L, f)) corrupt(d, "wrong upvalue count");
  for (i = 1; i <= n; i++) {
    int how = get_byte(d);
    if (how == U_VAL) {
      get_value(d);
      lua_setupvalue(L, f, (int)i);
    } else if (how == U_JOIN) {
      unsigned long long fid = get_uv(d), k = get_uv(d);
      int g;
      if (fid < 1 || fid > (unsigned long long)d->nobj)
        corrupt(d, "upvalue of an unknown function");
      lua_rawgeti(L, d->base + D_OBJS, (lua_Integer)fid);
      g = lua_gettop(L);
      if (lua_type(L, g) != LUA_TFUNCTION || lua_iscfunction(L, g) || k < 1 ||
          k > (unsigned long long)nups_of(L, g))
        corrupt(d, "join with a bad upvalue");
      lua_upvaluejoin(L, f, (int)i, g, (int)k);
      lua_pop(L, 1);
    } else {
      corrupt(d, "bad upvalue tag");
    }
  }
}

static void set_package_string(Dec *d, const char *field) {
  lua_State *L = d->L;
  size_t n;
  const char *s = get_str(d, &n);
  if (n == 0) return;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_LOADLIBNAME) == LUA_TTABLE) {
    lua_pushlstring(L, s, n);
    lua_setfield(L, -2, field);
  }
  lua_pop(L, 2);
}

static void decode(lua_State *L, const char *p, size_t len, int save) {
  Dec d;
  lua_Integer done = 0;
  luaL_checkstack(L, D_NSLOTS + 24, "parmap: decoder");
  d.L = L;
  d.base = lua_gettop(L);
  d.p = p;
  d.len = len;
  d.pos = 0;
  d.nobj = 0;
  d.save = save;
  lua_newtable(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  if (len < MAGIC_LEN || memcmp(p, MAGIC, MAGIC_LEN) != 0)
    corrupt(&d, "not a closure record");
  d.pos = MAGIC_LEN;
  set_package_string(&d, "path");
  set_package_string(&d, "cpath");
  get_value(&d); /* the root, at base + D_NSLOTS + 1 */
  if (lua_type(L, -1) != LUA_TFUNCTION) corrupt(&d, "the root is not a function");
  for (;;) {
    int sec = get_byte(&d), top = lua_gettop(L);
    if (sec == S_END) break;
    if (sec == S_BODY) {
      int o;
      if (done >= d.nobj) corrupt(&d, "a body for no object");
      lua_rawgeti(L, d.base + D_OBJS, ++done);
      o = lua_gettop(L);
      if (lua_istable(L, o)) get_table_body(&d, o);
      else get_function_body(&d, o);
    } else if (sec == S_GLOBAL) {
      size_t n;
      const char *s = get_str(&d, &n);
      lua_pushlstring(L, s, n);
      if (d.save) { /* its value before the first set: {old} */
        lua_pushvalue(L, -1);
        if (lua_rawget(L, d.save) == LUA_TNIL) {
          lua_createtable(L, 1, 0);
          lua_pushvalue(L, -3);
          lua_rawget(L, d.base + D_GLOBALS);
          lua_rawseti(L, -2, 1);
          lua_pushvalue(L, -3);
          lua_insert(L, -2);
          lua_rawset(L, d.save);
        }
        lua_pop(L, 1);
      }
      get_value(&d);
      lua_rawset(L, d.base + D_GLOBALS);
    } else {
      corrupt(&d, "unknown section");
    }
    lua_settop(L, top);
  }
  if (done != d.nobj) corrupt(&d, "objects without a body");
  if (d.pos != d.len) corrupt(&d, "bytes after the end");
  lua_replace(L, d.base + 1);
  lua_settop(L, d.base + 1);
}

void parmap_fn_decode(lua_State *L, const char *p, size_t len) {
  decode(L, p, len, 0);
}

/* ================================================================ Lua API */

/* The restore object's __close (and __call): every global the record set
   gets back the value it had before; once. */
static int restore_globals(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1); /* __close also gets the error */
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pushvalue(L, -2);
    lua_rawgeti(L, -2, 1);
    lua_rawset(L, 2);
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_pushnil(L);
    lua_rawset(L, 1); /* assigning an existing field during next is allowed */
  }
  return 0;
}

static int l_dumpfn(lua_State *L) {
  const char *root = luaL_optstring(L, 2, "fn");
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 2);
  parmap_fn_encode(L, 1, root);
  return 1;
}

static int loadfn_body(lua_State *L) { /* (s, restore) -> f */
  size_t n;
  const char *s = lua_tolstring(L, 1, &n);
  decode(L, s, n, 2);
  return 1;
}

/* loadfn(s) -> f, restore: the globals the record carries are set in
   this state's _G; restore (to-be-closed, or called) puts back what they
   were, so that a map's globals do not outlive it on the agent. */
static int l_loadfn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TSTRING);
  lua_settop(L, 1);
  lua_newtable(L); /* 2: the restore object */
  if (luaL_newmetatable(L, "parmap.fnenc.restore")) {
    lua_pushcfunction(L, restore_globals);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, restore_globals);
    lua_setfield(L, -2, "__call");
  }
  lua_setmetatable(L, 2);
  lua_pushcfunction(L, loadfn_body);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) { /* what it set so far goes back */
    lua_pushcfunction(L, restore_globals);
    lua_pushvalue(L, 2);
    lua_call(L, 1, 0);
    return lua_error(L);
  }
  lua_insert(L, 2);
  return 2;
}

void parmap_fnenc_register(lua_State *L) {
  lua_pushcfunction(L, l_dumpfn);
  lua_setfield(L, -2, "dumpfn");
  lua_pushcfunction(L, l_loadfn);
  lua_setfield(L, -2, "loadfn");
}
