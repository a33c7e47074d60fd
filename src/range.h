/*
** range.h: parmap.range(n) / parmap.range(first, last[, step]), a sequence
** of numbers that holds no items: a map's workers compute item i from the
** range's parameters (their inherited copy), so nothing is built or sent.
*/
#ifndef PARMAP_RANGE_H
#define PARMAP_RANGE_H

#include <lua.h>
#include <stdint.h>

/* float ranges keep the value of every RANGE_MARK-th item: item i is then
   at most RANGE_MARK - 1 additions away, as Lua's `for` adds the step */
#define RANGE_MARK 4096

typedef struct ParmapRange {
  uint64_t magic;
  int isfloat;
  lua_Integer count;        /* items: 1..count */
  lua_Integer first, step;  /* integer range */
  double ffirst, flast, fstep; /* float range */
  lua_Integer last_i;       /* float range: the last item computed ... */
  double last_v;            /* ... and its value (this process's copy) */
  lua_Integer nmarks;
  double marks[1];          /* marks[j]: item j * RANGE_MARK + 1 */
} ParmapRange;

/* Push item i (1 <= i <= r->count) of r. */
static inline void parmap_range_push(lua_State *L, ParmapRange *r,
                                     lua_Integer i) {
  if (!r->isfloat) {
    lua_pushinteger(L, (lua_Integer)((lua_Unsigned)r->first +
                                     (lua_Unsigned)(i - 1) *
                                         (lua_Unsigned)r->step));
  } else {
    double v;
    lua_Integer k;
    if (i == r->last_i + 1 && r->last_i > 0) {
      v = r->last_v + r->fstep;
    } else if (i == r->last_i) {
      v = r->last_v;
    } else {
      lua_Integer j = (i - 1) / RANGE_MARK;
      v = r->marks[j];
      for (k = j * RANGE_MARK + 1; k < i; k++) v += r->fstep;
    }
    r->last_i = i;
    r->last_v = v;
    lua_pushnumber(L, (lua_Number)v);
  }
}

/* The range behind the value at idx (a table made by parmap.range), or
   NULL. */
ParmapRange *parmap_torange(lua_State *L, int idx);

/* Sets range and isrange in the table on top (the core module). */
void parmap_range_register(lua_State *L);

#endif
