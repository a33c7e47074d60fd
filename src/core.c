/*
** core.c: luaopen_parmap_core, the C half of parmap. The Lua front module
** (lua/parmap.lua) checks arguments and gives the API its shape; this
** module runs maps (map.c) and offers a few small helpers.
*/
#include <lauxlib.h>
#include <unistd.h>

#include "engine.h"
#include "map.h"
#include "parmap.h"
#include "proc.h"
#include "process.h"

/* call(fn, item, index, star, kwstar, args, nargs, has_kw, kwargs, protect):
   fn's results for one item, following the call table (N = 1).
   Unprotected, errors propagate untouched. Protected, returns
   "ok", results... | "error", err, message, traceback | "shape", message. */
static int core_call(lua_State *L) {
  CallSpec cs;
  int n, base, fnpos, protect = lua_toboolean(L, 10);
  lua_Integer index = luaL_checkinteger(L, 3);
  lua_settop(L, 9);
  cs.fn = 1;
  cs.star = (int)luaL_checkinteger(L, 4);
  cs.kwstar = lua_toboolean(L, 5);
  cs.args = 6;
  cs.nargs = (int)luaL_checkinteger(L, 7);
  cs.has_kw = lua_toboolean(L, 8);
  cs.kw = 9;
  if (protect) {
    lua_pushliteral(L, "ok");
    lua_pushcfunction(L, parmap_msgh);
  }
  base = lua_gettop(L);
  n = parmap_push_call(L, &cs, 2, index);
  if (n < 0) {
    if (!protect) return lua_error(L);
    lua_pushliteral(L, "shape");
    lua_insert(L, -2);
    return 2;
  }
  fnpos = lua_gettop(L) - n; /* scratch values may sit below fn */
  if (!protect) {
    lua_call(L, n, LUA_MULTRET);
    return lua_gettop(L) - fnpos + 1;
  }
  if (lua_pcall(L, n, LUA_MULTRET, base) == LUA_OK) {
    lua_pushvalue(L, base - 1); /* "ok" just below the results */
    lua_replace(L, fnpos - 1);   /* fnpos - 1 >= base, the handler */
    return lua_gettop(L) - fnpos + 2;
  }
  parmap_unbox(L, lua_gettop(L)); /* err, message, traceback */
  lua_pushliteral(L, "error");
  lua_replace(L, base - 1);
  lua_remove(L, base); /* the handler */
  return 4;
}

static int core_ncpu(lua_State *L) {
  lua_pushinteger(L, parmap_ncpu());
  return 1;
}

static int core_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)parmap_now_ns() / 1e9);
  return 1;
}

static int core_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static int core_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

PARMAP_API int luaopen_parmap_core(lua_State *L) {
  static const luaL_Reg funcs[] = {{"call", core_call},
                                   {"ncpu", core_ncpu},
                                   {"now", core_now},
                                   {"isatty", core_isatty},
                                   {"pid", core_pid},
                                   {NULL, NULL}};
  luaL_newlib(L, funcs);
  parmap_map_register(L);
  parmap_process_register(L);
  return 1;
}
