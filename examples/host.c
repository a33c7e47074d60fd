/*
** examples/host.c: a C program that runs Lua and embeds parmap.
**
**   cc -std=c99 host.c -I$PREFIX/include -L$PREFIX/lib -lparmap \
**      $(pkg-config --cflags --libs lua5.4) -lm -ldl -pthread
**
**   host                  run the built-in script (or: host script.lua)
**   host --sigchld [...]  first install a SIGCHLD handler that reaps every
**                         child with waitpid(-1), as some hosts do
**   host --sigchld=ignore [...]   or set SIGCHLD to SIG_IGN: the kernel
**                         then reaps every child at once
**
** One call registers the whole module: the Lua front is compiled into
** libparmap.a, so nothing is read from disk (package.path and package.cpath
** are emptied to prove it). The script maps a closure defined in the
** script; the workers are forked copies of this process, so the closure and
** its upvalues simply exist in them.
*/
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <parmap.h>

static const char *script =
    "local parmap = require 'parmap'\n"
    "local base = 100 -- an upvalue: the workers have it through fork\n"
    "local function f(x) return x * x + base end\n"
    "local items = {}\n"
    "for i = 1, 10 do items[i] = i end\n"
    "local out = {}\n"
    "for i, r in parmap(f, items, { N = 2 }) do out[i] = r end\n"
    "print(table.concat(out, ' '))\n"
    "print(parmap.map(function(s) return s:upper() end, { 'a', 'b' })[2])\n";

/* ---------------------------------------------------------------- SIGCHLD */

/* The kind of handler a host may already have: it reaps whatever child
   ended, parmap's workers included. */
static volatile sig_atomic_t reaped = 0;

static void on_sigchld(int sig) {
  int saved = errno;
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) reaped++;
  errno = saved;
}

static int install_sigchld(int ignore) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = ignore ? SIG_IGN : on_sigchld;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_NOCLDSTOP; /* no SA_RESTART: system calls see EINTR */
  return sigaction(SIGCHLD, &sa, NULL);
}

/* host.reaped(): how many children the host's handler has reaped;
   host.sigchld: "default", "reap" or "ignore". */
static int host_reaped(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)reaped);
  return 1;
}

/* ---------------------------------------------------------------- main */

static int report(lua_State *L, int status) {
  if (status != LUA_OK) {
    fprintf(stderr, "host: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return status;
}

static int msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int run(lua_State *L, const char *path) {
  int status, base;
  lua_pushcfunction(L, msgh);
  base = lua_gettop(L);
  status = path ? luaL_loadfile(L, path)
                : luaL_loadbuffer(L, script, strlen(script), "=script");
  if (status == LUA_OK) status = lua_pcall(L, 0, 0, base);
  report(L, status);
  lua_remove(L, base);
  return status;
}

int main(int argc, char **argv) {
  lua_State *L;
  const char *path = NULL, *mode = "default";
  int i, status;
  for (i = 1; i < argc; i++) {
    if (strncmp(argv[i], "--sigchld", 9) == 0) {
      mode = strcmp(argv[i], "--sigchld=ignore") == 0 ? "ignore" : "reap";
      if (install_sigchld(mode[0] == 'i')) {
        perror("host: sigaction");
        return 1;
      }
    } else {
      path = argv[i];
    }
  }
  L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "host: cannot create a Lua state\n");
    return 1;
  }
  luaL_openlibs(L);
  /* no module files anywhere: parmap must come from the library */
  lua_getglobal(L, "package");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "path");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);

  /* the one call a host makes */
  luaL_requiref(L, "parmap", luaopen_parmap, 1);
  lua_pop(L, 1);

  lua_newtable(L);
  lua_pushcfunction(L, host_reaped);
  lua_setfield(L, -2, "reaped");
  lua_pushstring(L, mode);
  lua_setfield(L, -2, "sigchld");
  lua_setglobal(L, "host");

  status = run(L, path);
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
