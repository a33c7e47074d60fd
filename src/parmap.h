/*
** parmap.h: the public C interface of parmap, for programs that embed Lua.
**
**   #include <parmap.h>
**   luaL_requiref(L, "parmap", luaopen_parmap, 1); lua_pop(L, 1);
**
** luaopen_parmap gives the whole module (the Lua front is compiled in);
** luaopen_parmap_core gives only its C half ("parmap.core").
** Call parmap from the thread that owns the lua_State: it forks, and a
** fork copies only the calling thread.
*/
#ifndef PARMAP_H
#define PARMAP_H

#include <lua.h>

#if LUA_VERSION_NUM < 504
#error "parmap needs Lua 5.4: it uses to-be-closed values and user values"
#endif

#if defined(__GNUC__)
#define PARMAP_API __attribute__((visibility("default")))
#else
#define PARMAP_API
#endif

PARMAP_API int luaopen_parmap(lua_State *L);
PARMAP_API int luaopen_parmap_core(lua_State *L);

#endif
