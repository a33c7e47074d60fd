/*
** map.c: the parent side of a parallel map, as a Lua userdata.
**
** Items are cut into chunks (contiguous index ranges). Each chunk owns a
** slot in a fixed window: its serialized items (iterator input) and the
** result records that come back, appended in index order. A chunk is handed
** to one worker at a time as a segment; a worker holds at most DEPTH
** segments. The loop consumes records straight from the slots, so ordered
** mode holds at most the window's chunks, whatever the input length.
**
** When a worker dies, the item it was running (read from its shared-memory
** slot) gets an error record; the other items it held go back to their
** slots and are handed out again, to a new worker if need be.
*/
/* One compilation unit of three rooms (as luv's src/luv.c includes its
   files), so that the per-item path stays inlined across them:
     map/internal.h  the types and the calls between rooms
     map/window.c    the chunk/slot window and its failure list
     map/output.c    worker output relayed: output = "lines" | "item"
     map/pool.c      the worker pool and its transport
     map/object.c    the Lua object: start, next, collect, close
     map/loop.c      an event loop's view (fd, poll, timeout) and stats */
#include "map/window.c"
#include "map/output.c"
#include "map/pool.c"
#include "map/object.c"
#include "map/loop.c"
