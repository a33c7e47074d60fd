/*
** map.h: the parent side of a parallel map (map.c).
*/
#ifndef PARMAP_MAP_H
#define PARMAP_MAP_H

#include <lua.h>

/* Add start(spec) and next(map) to the table on top of the stack. */
void parmap_map_register(lua_State *L);

#endif
