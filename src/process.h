/*
** process.h: ReturnProcess, one call run in a forked child (process.c).
*/
#ifndef PARMAP_PROCESS_H
#define PARMAP_PROCESS_H

#include <lua.h>

/* Add process(spec) to the table on top of the stack. */
void parmap_process_register(lua_State *L);

#endif
