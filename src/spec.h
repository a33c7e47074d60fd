/*
** spec.h: reading the spec tables that lua/parmap/check.lua hands the core
** (core.start, core.process, core.caller). Every field is read by an
** accessor that raises naming the field when its type or value is wrong;
** only an absent field (nil) takes the default. Modes cross as strings
** checked against a list, as luaL_checkoption does for an argument.
*/
#ifndef PARMAP_SPEC_H
#define PARMAP_SPEC_H

#include <lauxlib.h>
#include <string.h>

#include "engine.h"

/* Field k of the table at t: nil gives d, else a boolean. */
static inline int parmap_boolfield(lua_State *L, int t, const char *k,
                                   int d) {
  int v, type = lua_getfield(L, t, k);
  if (type == LUA_TNIL) v = d;
  else if (type == LUA_TBOOLEAN) v = lua_toboolean(L, -1);
  else
    return luaL_error(L, "parmap: bad spec field '%s' (boolean expected, "
                      "got %s)", k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* Field k of the table at t: nil gives d, else a number from 0 to 86400
   (retry_delay, retry_delay_max: check.lua bounds them so). */
static inline double parmap_numfield(lua_State *L, int t, const char *k,
                                     double d) {
  int type = lua_getfield(L, t, k);
  lua_Number v = lua_tonumber(L, -1);
  if (type == LUA_TNIL) v = d;
  else if (type != LUA_TNUMBER || !(v >= 0) || v > 86400)
    return luaL_error(L, "parmap: bad option '%s' (number of seconds from 0 "
                      "to 86400 expected, got %s)", k, luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  return (double)v;
}

/* Field k of the table at t: nil gives the index of d in lst, else one of
   the strings of lst (NULL-terminated); returns its index. */
static inline int parmap_optionfield(lua_State *L, int t, const char *k,
                                     const char *d, const char *const lst[]) {
  const char *name;
  int i;
  if (lua_getfield(L, t, k) == LUA_TNIL) name = d;
  else if (lua_type(L, -1) == LUA_TSTRING) name = lua_tostring(L, -1);
  else
    return luaL_error(L, "parmap: bad spec field '%s' (string expected, got "
                      "%s)", k, luaL_typename(L, -1));
  for (i = 0; lst[i] != NULL; i++)
    if (strcmp(lst[i], name) == 0) {
      lua_pop(L, 1);
      return i;
    }
  return luaL_error(L, "parmap: bad spec field '%s' (invalid option '%s')",
                    k, name);
}

/* A count the user gave (N, args.n, total, chunksize...), checked before
   any arithmetic: field k of the table at t, an integer >= lo, or absent
   (d). `name` is the option the user wrote. */
static inline lua_Integer parmap_countfield(lua_State *L, int t,
                                            const char *k, const char *name,
                                            lua_Integer lo, lua_Integer d) {
  lua_Integer v;
  int isnum;
  if (lua_getfield(L, t, k) == LUA_TNIL) {
    lua_pop(L, 1);
    return d;
  }
  v = lua_tointegerx(L, -1, &isnum);
  if (!isnum || lua_type(L, -1) != LUA_TNUMBER || v < lo)
    return luaL_error(L, "parmap: bad option '%s' (%s expected, got %s)",
                      name, lo > 0 ? "positive integer"
                                   : "non-negative integer",
                      luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  return v;
}

/* Field k of the table at t, pushed: a value of Lua type `type` (LUA_TNONE:
   any), or nil too when optional. */
static inline void parmap_pushfield(lua_State *L, int t, const char *k,
                                    int type, int optional) {
  int got = lua_getfield(L, t, k);
  if (type != LUA_TNONE && got != type && !(optional && got == LUA_TNIL))
    luaL_error(L, "parmap: bad spec field '%s' (%s expected, got %s)", k,
               lua_typename(L, type), luaL_typename(L, -1));
}

/* A spec field kept as a user value of the object being built. */
typedef struct ParmapField {
  const char *name;
  int uv;       /* user value number */
  int type;     /* its Lua type; LUA_TNONE: any (callables are checked
                   in Lua) */
  int optional; /* nil is fine too */
} ParmapField;

/* Push the three values of a call from the table at t: the function
   (field fname; a callable, checked in Lua), args (a table; nil too when
   nargs is 0) and kwargs (a table or nil). */
static inline void parmap_push_callvalues(lua_State *L, int t,
                                          const char *fname, int nargs) {
  parmap_pushfield(L, t, fname, LUA_TNONE, 0);
  parmap_pushfield(L, t, "args", LUA_TTABLE, nargs == 0);
  parmap_pushfield(L, t, "kwargs", LUA_TTABLE, 1);
}

/* The user values of an object built from the spec at t (at ud): the
   call's values (parmap_push_callvalues) as user values call_uv[0..2],
   each field of `rest` (up to a NULL name) checked, and a fresh scratch
   table for the codec as user value scratch_uv. */
static inline void parmap_setfields(lua_State *L, int t, int ud,
                                    const char *fname, int nargs,
                                    const int call_uv[3],
                                    const ParmapField *rest, int scratch_uv) {
  int k;
  parmap_push_callvalues(L, t, fname, nargs);
  for (k = 2; k >= 0; k--) lua_setiuservalue(L, ud, call_uv[k]);
  for (; rest->name != NULL; rest++) {
    parmap_pushfield(L, t, rest->name, rest->type, rest->optional);
    lua_setiuservalue(L, ud, rest->uv);
  }
  lua_newtable(L);
  lua_setiuservalue(L, ud, scratch_uv);
}

/* The star modes, as they cross (STAR_FALSE, STAR_TRUE, STAR_NONE). */
static const char *const parmap_star_modes[] = {"false", "true", "none", NULL};

/* How fn is called, from the table at t: star, kwstar, has_kw, nargs (at
   most PARMAP_MAX_ARGS). The stack slots (fn, args, kw) are the caller's. */
static inline void parmap_read_call(lua_State *L, int t, CallSpec *cs) {
  lua_Integer n;
  cs->star = parmap_optionfield(L, t, "star", "false", parmap_star_modes);
  cs->kwstar = parmap_boolfield(L, t, "kwstar", 0);
  cs->has_kw = parmap_boolfield(L, t, "has_kw", 0);
  n = parmap_countfield(L, t, "nargs", "args.n", 0, 0);
  if (n > PARMAP_MAX_ARGS)
    luaL_error(L, "parmap: bad option 'args.n' (too many arguments: %I, at "
               "most %d)", (LUAI_UACINT)n, PARMAP_MAX_ARGS);
  cs->nargs = (int)n;
}

#endif
