/*
** fnenc.h: closures by value. Turns a Lua function into bytes
** that a FRESH Lua state (another MPI rank, which inherited nothing) turns
** back into a function that behaves the same: its bytecode (not stripped),
** every upvalue recursively (shared upvalues stay shared, recursion and
** cycles come back), the globals its code reads, by value; modules and
** their fields by name. See fnenc.c for the record layout.
*/
#ifndef PARMAP_FNENC_H
#define PARMAP_FNENC_H

#include <lua.h>

/*
** Encode the function at idx; pushes the record as a string. `root` names
** the function in error messages ("fn", "init"). Raises a Lua error that
** names the path of a value that cannot travel, e.g.
** "upvalue 'fh' of fn: cannot send a FILE*; open it in init".
*/
void parmap_fn_encode(lua_State *L, int idx, const char *root);

/*
** Decode a record made by parmap_fn_encode; pushes the function. Sets
** package.path and package.cpath as the sender had them, requires the
** modules the record names and assigns the globals it carries. Raises a
** Lua error on a malformed record (the framing is checked like codec.c's;
** the bytecode itself is trusted, see fnenc.c) or a missing module.
*/
void parmap_fn_decode(lua_State *L, const char *p, size_t len);

/* Adds dumpfn(f [, root]) -> string and loadfn(s) -> f to the table on top. */
void parmap_fnenc_register(lua_State *L);

#endif
