/*
** range.c: parmap.range. A range is an empty read-only table whose
** metatable computes t[i] and #t from a ParmapRange userdata (kept in the
** metatable), so it works wherever a sequence table does (the serial loop,
** the MPI coordinator, ipairs); a map's workers find the userdata and
** compute their items directly (worker.c). The items are exactly the values
** of Lua 5.4's numeric `for` with the same arguments: integers when first
** and step are integers, else floats, each the previous one plus step.
*/
#include <lauxlib.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

#include "range.h"

#define RANGE_MAGIC 0x65676e6172706d70ull
#define RANGE_UD "parmap.rangedata"
#define RANGE_KEY "__parmap_range"
/* a float range's items are counted by adding the step, as `for` does */
#define FLOAT_MAX_ITEMS 1000000000.0

/* raise at the caller of parmap.range */
static int range_error(lua_State *L, const char *fmt, ...) {
  va_list ap;
  luaL_where(L, 1);
  lua_pushliteral(L, "parmap.range: ");
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_concat(L, 3);
  return lua_error(L);
}

ParmapRange *parmap_torange(lua_State *L, int idx) {
  ParmapRange *r = NULL;
  if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx)) return NULL;
  if (lua_getfield(L, -1, RANGE_KEY) == LUA_TUSERDATA) {
    r = (ParmapRange *)luaL_testudata(L, -1, RANGE_UD);
    if (r != NULL && r->magic != RANGE_MAGIC) r = NULL;
  }
  lua_pop(L, 2);
  return r;
}

static ParmapRange *self(lua_State *L) {
  return (ParmapRange *)lua_touserdata(L, lua_upvalueindex(1));
}

/* t[k]: item k for an integer-valued k in 1..#t, else nil (as a table). */
static int range_index(lua_State *L) {
  ParmapRange *r = self(L);
  int isnum;
  lua_Integer k = lua_tointegerx(L, 2, &isnum);
  if (isnum && lua_type(L, 2) == LUA_TNUMBER && k >= 1 && k <= r->count)
    parmap_range_push(L, r, k);
  else
    lua_pushnil(L);
  return 1;
}

static int range_len(lua_State *L) {
  lua_pushinteger(L, self(L)->count);
  return 1;
}

static int range_newindex(lua_State *L) {
  return luaL_error(L, "parmap.range is read-only");
}

static int range_tostring(lua_State *L) {
  ParmapRange *r = self(L);
  if (r->isfloat)
    lua_pushfstring(L, "parmap.range(%f, %f, %f): %I items",
                    (LUAI_UACNUMBER)r->ffirst, (LUAI_UACNUMBER)r->flast,
                    (LUAI_UACNUMBER)r->fstep, (LUAI_UACINT)r->count);
  else
    lua_pushfstring(L, "parmap.range(%I, step %I): %I items",
                    (LUAI_UACINT)r->first, (LUAI_UACINT)r->step,
                    (LUAI_UACINT)r->count);
  return 1;
}

static void check_number(lua_State *L, int i, const char *name) {
  if (lua_type(L, i) != LUA_TNUMBER)
    range_error(L, "bad argument #%d '%s' (number expected, got %s)", i, name,
                luaL_typename(L, i));
}

/* Lua 5.4's forlimit: the integer limit of an integer loop; 1 if the loop
   does not run. */
static int int_limit(lua_State *L, lua_Integer init, int lim,
                     lua_Integer step, lua_Integer *p) {
  if (lua_isinteger(L, lim)) {
    *p = lua_tointeger(L, lim);
  } else {
    lua_Number f = lua_tonumber(L, lim), g = step < 0 ? ceil(f) : floor(f);
    if (g >= (lua_Number)LUA_MININTEGER && g < -(lua_Number)LUA_MININTEGER) {
      *p = (lua_Integer)g;
    } else if (f > 0) { /* too large */
      if (step < 0) return 1;
      *p = LUA_MAXINTEGER;
    } else { /* too small, or NaN */
      if (step > 0) return 1;
      *p = LUA_MININTEGER;
    }
  }
  return step > 0 ? init > *p : init < *p;
}

/* The float loop of `for x = a, b, s`, run to count its items (and, with
   marks, to note every RANGE_MARK-th value). */
static lua_Integer float_items(lua_State *L, double a, double b, double s,
                               double *marks) {
  lua_Integer n = 0;
  double x = a;
  if (s > 0 ? b < a : a < b) return 0;
  for (;;) {
    double nx;
    if (marks != NULL && n % RANGE_MARK == 0) marks[n / RANGE_MARK] = x;
    n++;
    nx = x + s;
    if (nx == x) /* `for` would never end */
      range_error(L, "step %f is too small to move from %f (a `for` loop "
                  "would never end)", (LUAI_UACNUMBER)s, (LUAI_UACNUMBER)x);
    x = nx;
    if (!(s > 0 ? x <= b : b <= x)) break;
    if ((double)n > FLOAT_MAX_ITEMS)
      range_error(L, "a float range of more than %d items (use an integer "
                  "range and compute the value in fn)", (int)FLOAT_MAX_ITEMS);
  }
  return n;
}

/* core.range(n) | core.range(first, last[, step]) */
static int core_range(lua_State *L) {
  int nargs = lua_gettop(L), t;
  ParmapRange *r;
  ParmapRange tmp;
  memset(&tmp, 0, sizeof tmp);
  if (nargs == 3 && lua_isnil(L, 3)) nargs = 2; /* no step: 1 */
  lua_settop(L, nargs);
  if (nargs < 1 || nargs > 3)
    return range_error(L, "1 to 3 arguments expected (n, or first, last[, "
                          "step]), got %d", nargs);
  if (nargs == 1) {
    check_number(L, 1, "n");
    lua_pushinteger(L, 1);
    lua_insert(L, 1);
  } else {
    check_number(L, 1, "first");
    check_number(L, 2, "last");
  }
  if (nargs == 3) check_number(L, 3, "step");
  else {
    lua_settop(L, 2);
    lua_pushinteger(L, 1);
  }
  if (lua_isinteger(L, 1) && lua_isinteger(L, 3)) {
    lua_Integer init = lua_tointeger(L, 1), step = lua_tointeger(L, 3), lim;
    if (step == 0) return range_error(L, "step is zero");
    tmp.first = init;
    tmp.step = step;
    if (!int_limit(L, init, 2, step, &lim)) {
      lua_Unsigned c; /* items - 1, as lvm.c's forprep counts */
      if (step > 0) c = ((lua_Unsigned)lim - (lua_Unsigned)init) /
                        (lua_Unsigned)step;
      else c = ((lua_Unsigned)init - (lua_Unsigned)lim) /
               ((lua_Unsigned)(-(step + 1)) + 1u);
      if (c >= (lua_Unsigned)LUA_MAXINTEGER)
        return range_error(L, "more than math.maxinteger items");
      tmp.count = (lua_Integer)c + 1;
    }
    r = (ParmapRange *)lua_newuserdatauv(L, sizeof *r, 0);
    *r = tmp;
  } else {
    double a = (double)lua_tonumber(L, 1), b = (double)lua_tonumber(L, 2),
           s = (double)lua_tonumber(L, 3), est;
    lua_Integer nmarks;
    if (s == 0) return range_error(L, "step is zero");
    est = (b - a) / s;
    if (est > FLOAT_MAX_ITEMS) /* NaN and negatives: the loop decides */
      return range_error(L, "a float range of more than %d items (use an "
                         "integer range and compute the value in fn)",
                         (int)FLOAT_MAX_ITEMS);
    tmp.isfloat = 1;
    tmp.ffirst = a;
    tmp.flast = b;
    tmp.fstep = s;
    tmp.count = float_items(L, a, b, s, NULL);
    nmarks = tmp.count > 0 ? (tmp.count - 1) / RANGE_MARK + 1 : 0;
    tmp.nmarks = nmarks;
    r = (ParmapRange *)lua_newuserdatauv(
        L, sizeof *r + (size_t)(nmarks > 0 ? nmarks - 1 : 0) * sizeof(double),
        0);
    *r = tmp;
    if (tmp.count > 0) float_items(L, a, b, s, r->marks);
  }
  r->magic = RANGE_MAGIC;
  luaL_setmetatable(L, RANGE_UD);
  t = lua_gettop(L);
  lua_newtable(L); /* the range: empty; its metatable does the rest */
  lua_createtable(L, 0, 7);
  lua_pushvalue(L, t);
  lua_setfield(L, -2, RANGE_KEY);
  lua_pushvalue(L, t);
  lua_pushcclosure(L, range_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushvalue(L, t);
  lua_pushcclosure(L, range_len, 1);
  lua_setfield(L, -2, "__len");
  lua_pushvalue(L, t);
  lua_pushcclosure(L, range_tostring, 1);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, range_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_pushliteral(L, "parmap.range");
  lua_setfield(L, -2, "__name");
  lua_pushliteral(L, "parmap.range");
  lua_setfield(L, -2, "__metatable");
  lua_setmetatable(L, -2);
  return 1;
}

/* core.isrange(v): is v a range? */
static int core_isrange(lua_State *L) {
  lua_pushboolean(L, parmap_torange(L, 1) != NULL);
  return 1;
}

void parmap_range_register(lua_State *L) {
  luaL_newmetatable(L, RANGE_UD);
  lua_pop(L, 1);
  lua_pushcfunction(L, core_range);
  lua_setfield(L, -2, "range");
  lua_pushcfunction(L, core_isrange);
  lua_setfield(L, -2, "isrange");
}
