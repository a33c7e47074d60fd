/*
** call.c: the call adapter. How fn is called for an item, following the
** call table (star, kwstar, args, kwargs): used by a map's workers, the
** serial loop (core.caller) and a ReturnProcess's child.
*/
#include <lauxlib.h>

#include "codec.h"
#include "engine.h"

static int shape_error(lua_State *L, lua_Integer index, const char *what,
                       int got) {
  lua_pushfstring(L, "parmap: item %I: %s, got %s", (LUAI_UACINT)index, what,
                  luaL_typename(L, got));
  return -1;
}

/* The count at idx (vals.n, or what #vals gave) is not a non-negative
   integer: the message, shown as lua/parmap/check.lua shows a bad option. */
static int bad_count(lua_State *L, lua_Integer index, const char *what,
                     int idx) {
  const char *got;
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TNUMBER)
    got = lua_tonumber(L, idx) != lua_tonumber(L, idx)
              ? "nan" : luaL_tolstring(L, idx, NULL);
  else if (lua_type(L, idx) == LUA_TSTRING) {
    size_t len;
    const char *str = lua_tolstring(L, idx, &len);
    lua_pushlstring(L, str, len > 40 ? 37 : len); /* a long one cut short */
    got = lua_pushfstring(L, "string \"%s%s\"", lua_tostring(L, -1),
                          len > 40 ? "..." : "");
  } else {
    got = luaL_typename(L, idx);
  }
  lua_pushfstring(L, "parmap: item %I: star = true: %s must be a "
                  "non-negative integer, got %s", (LUAI_UACINT)index, what,
                  got);
  return -1;
}

/* Copy the pairs of table src into table dst (both absolute). */
static void copy_pairs(lua_State *L, int dst, int src) {
  lua_pushnil(L);
  while (lua_next(L, src)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, dst);
  }
}

int parmap_push_call(lua_State *L, const CallSpec *cs, int item,
                     lua_Integer index) {
  int vals = item, kwvals = 0, n = 0, i;
  if (!lua_checkstack(L, cs->nargs + 8)) {
    lua_pushliteral(L, "parmap: too many arguments");
    return -1;
  }
  if (cs->kwstar) {
    if (cs->star == STAR_NONE) {
      kwvals = item;
    } else {
      if (!lua_istable(L, item))
        return shape_error(L, index,
                           cs->star == STAR_TRUE
                               ? "kwstar = true needs a table {vals, kwvals}"
                               : "kwstar = true needs a table {val, kwvals}",
                           item);
      lua_geti(L, item, 1);
      lua_geti(L, item, 2);
      vals = lua_gettop(L) - 1;
      kwvals = vals + 1;
    }
    if (!lua_istable(L, kwvals))
      return shape_error(L, index, "kwvals must be a table", kwvals);
  }
  lua_pushvalue(L, cs->fn);
  if (cs->star == STAR_FALSE) {
    lua_pushvalue(L, vals);
    n = 1;
  } else if (cs->star == STAR_TRUE) {
    lua_Integer len;
    if (!lua_istable(L, vals))
      return shape_error(L, index, "star = true needs a sequence table",
                         vals);
    /* vals.n as items.n and args.n: a non-negative integer (2.0 is 2),
       never a numeric string; absent, #vals */
    if (lua_getfield(L, vals, "n") != LUA_TNIL) {
      int isint;
      len = lua_tointegerx(L, -1, &isint);
      if (lua_type(L, -1) != LUA_TNUMBER || !isint || len < 0)
        return bad_count(L, index, "vals.n", -1);
    } else {
      int isint;
      lua_pop(L, 1);
      lua_len(L, vals); /* __len may say anything */
      len = lua_tointegerx(L, -1, &isint);
      if (lua_type(L, -1) != LUA_TNUMBER || !isint || len < 0)
        return bad_count(L, index, "#vals (its __len)", -1);
    }
    lua_pop(L, 1);
    if (len > PARMAP_MAX_VALUES || /* Lua's stack */
        !lua_checkstack(L, (int)len + cs->nargs + 8)) {
      lua_pushfstring(L, "parmap: item %I: star = true: too many values to "
                      "unpack (%I, at most %d)", (LUAI_UACINT)index,
                      (LUAI_UACINT)len, PARMAP_MAX_VALUES);
      return -1;
    }
    for (i = 1; i <= (int)len; i++) lua_geti(L, vals, i);
    n = (int)len;
  }
  for (i = 1; i <= cs->nargs; i++) lua_rawgeti(L, cs->args, i);
  n += cs->nargs;
  if (cs->has_kw) {
    int t;
    lua_newtable(L);
    t = lua_gettop(L);
    if (lua_istable(L, cs->kw)) copy_pairs(L, t, cs->kw);
    if (kwvals) copy_pairs(L, t, kwvals);
    n++;
  }
  return n;
}
