/*
** map.h: the parent side of a parallel map (map.c).
*/
#ifndef PARMAP_MAP_H
#define PARMAP_MAP_H

#include <lua.h>

/* Add start(spec) and next(map) to the table on top of the stack. */
void parmap_map_register(lua_State *L);

/*
** The MPI agent's relay (src/mpi/mpi_agent.c): items and results pass
** through the agent as the codec records rank 0 sent and the workers
** wrote, never decoded there.
**
** Items: a map started with src->items as its items function does not call
** it; it takes records from peek (a block of whole item records, their
** count returned, 0 at the end of the input; it may block, it may raise)
** and says with take how many items, and bytes, it took. One source per
** process, set once.
*/
typedef struct ParmapRawSource {
  lua_CFunction items;
  lua_Integer (*peek)(lua_State *L, const char **p, size_t *len);
  void (*take)(lua_State *L, lua_Integer n, size_t nbytes);
  /* called while a relayed map waits for its workers (every 200 ms): a
     nonzero return closes the map, as close() from a callback would */
  int (*tick)(lua_State *L);
  /* nonzero when peek would not wait: a map that holds items (a chunk
     being filled, items at the workers) does not wait for more, since
     rank 0 may hold items back until their results come (buffersize) */
  int (*ready)(lua_State *L);
  /* a Lua-called items function of the same source (the agent's boxed
     items): the map consults ready before calling it, as for peek */
  lua_CFunction boxed;
} ParmapRawSource;
void parmap_map_rawsource(const ParmapRawSource *src);

/*
** Results: parmap_map_relay(L, idx, sink, ud) steps the map at idx (an
** engine map, the s of core.next's triple), handing every result record
** (REC_OK and the values' codec record) to sink with the item's index,
** until one is a failure: it then pushes the index and the error object
** (what the map's next would give) and returns 2. Returns 0 when the map
** is over, 1 (a false pushed) when sink returned nonzero. Raises what
** next would raise.
*/
typedef int (*ParmapSink)(void *ud, lua_Integer index, const char *rec,
                          size_t len);
int parmap_map_relay(lua_State *L, int idx, ParmapSink sink, void *ud);

#endif
