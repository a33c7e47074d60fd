/*
** mpi_main.c: parmap-mpi, the launcher of the MPI backend.
**
**   mpirun -n K parmap-mpi script.lua args...
**
** Rank 0 runs the script as lua5.4 would (arg, ...), with the module
** "parmap.mpi" (the coordinator, mpi_coord.c) available; parmap's "auto"
** backend then sends maps to the K - 1 other ranks, the node agents
** (mpi_agent.c), which never run the script. parmap itself is compiled in
** (libparmap.a), so every rank runs the same parmap.
*/
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>
#include <parmap.h>

#include "parmap_mpi.h"

static int msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Rank 0 of a job that lost a rank: MPI_Finalize, or an exit without it,
   would wait for the lost rank (stopped, cut off: for ever, whatever
   --enable-recovery says); MPI_Abort ends the job at once with status. */
static void end_lost(int status) {
  fprintf(stderr, "parmap-mpi: a rank was lost (above): the job ends through "
          "MPI_Abort with status %d\n", status);
  fflush(NULL);
  MPI_Abort(MPI_COMM_WORLD, status);
  _exit(status);
}

/* os.exit on rank 0: tell the agents to leave first, so the job ends
   cleanly (an MPI process that exits without MPI_Finalize ends the job
   with an error). */
static int os_exit(lua_State *L) {
  int status;
  if (lua_isboolean(L, 1)) status = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
  else status = (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
  fflush(NULL);
  parmap_mpi_coord_quit();
  if (parmap_mpi_coord_lost()) end_lost(status);
  MPI_Finalize();
  exit(status);
  return 0;
}

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return NULL;
  luaL_openlibs(L);
  /* require "parmap" finds the compiled-in module on every rank */
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_parmap);
  lua_setfield(L, -2, "parmap");
  lua_pop(L, 1);
  return L;
}

static int run_script(lua_State *L, int argc, char **argv) {
  int i, status, base, n = argc - 2;
  /* arg as lua5.4 sets it: arg[0] the script, arg[-1] the interpreter */
  lua_createtable(L, n, 2);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");
  lua_getglobal(L, "os");
  lua_pushcfunction(L, os_exit);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
  luaL_requiref(L, "parmap.mpi", parmap_mpi_coord_open, 0);
  lua_pop(L, 1);
  lua_pushcfunction(L, msgh);
  base = lua_gettop(L);
  status = luaL_loadfile(L, argv[1]);
  if (status == LUA_OK) {
    luaL_checkstack(L, n + 1, "too many arguments");
    for (i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
    status = lua_pcall(L, n, 0, base);
  }
  if (status != LUA_OK) {
    fprintf(stderr, "parmap-mpi: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return status;
}

int main(int argc, char **argv) {
  int rank = 0, size = 1, status = 0, threads = MPI_THREAD_SINGLE;
  lua_State *L;
  /* agents fork workers: no warning about it; children of any rank (and
     their scripts) know they run under parmap-mpi */
  setenv("OMPI_MCA_mpi_warn_on_fork", "0", 0);
  setenv("PARMAP_MPI", "1", 1);
  /* MPI_THREAD_MULTIPLE: an agent's heartbeat thread sends while its main
     thread works (resilient maps); without it an agent sends none */
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &threads);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank == 0 && argc < 2) {
    fprintf(stderr, "usage: mpirun -n K parmap-mpi script.lua [args...]\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  L = new_state();
  if (L == NULL) {
    fprintf(stderr, "parmap-mpi: rank %d cannot create a Lua state\n", rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  if (rank == 0) {
    parmap_mpi_coord_init(size);
    status = run_script(L, argc, argv) == LUA_OK ? 0 : 1;
    fflush(NULL);
    parmap_mpi_coord_quit();
  } else {
    status = parmap_mpi_agent_main(L, rank, threads);
  }
  lua_close(L);
  if (rank == 0 && parmap_mpi_coord_lost()) end_lost(status);
  if (rank > 0 && parmap_mpi_agent_lost()) {
    /* a rank is gone: MPI_Finalize may wait for it forever; rank 0 ends
       the job */
    fflush(NULL);
    _exit(status);
  }
  MPI_Finalize();
  return status;
}
