/*
** parmap_mpi.h: parmap's MPI backend, built only into build/parmap-mpi.
**
** Rank 0 runs the script; every other rank is a node agent that runs
** parmap's fork engine on its node's cores. All traffic is between rank 0
** and one agent: byte messages (MPI_BYTE) that start with a MsgHdr; the MPI
** tag says what they are. Every send is non-blocking (an Outbox keeps the
** buffers until MPI is done with them). Messages from rank 0 to an agent
** arrive in the order they were sent (MPI's non-overtaking rule, the agent
** receives with MPI_ANY_TAG), which the protocol relies on.
**
**   0 -> agent  TAG_MAP    a map starts: fn (fnenc record), then a codec
**                          record of one table of options
**               TAG_SEG    count items from global index a (codec records)
**               TAG_END    no more items for this map
**               TAG_ABORT  rank 0 closed the map early: stop, send DONE
**               TAG_QUIT   leave
**               TAG_ENV    before anything: rank 0's PARMAP_* settings,
**                          "NAME=value" strings each ending in a NUL
**   agent -> 0  TAG_HELLO  at start: a = CPUs, b = 1 when it sends
**                          heartbeats, then the host name
**               TAG_HB     every second, from a thread: alive
**               TAG_CREDIT the agent started on a segment: send one more
**               TAG_RES    count results: varint index, REC_OK|REC_ERR,
**                          codec record (values | kind err msg tb pid)
**               TAG_DONE   the agent's engine has ended this map
**               TAG_FAIL   the map could not run on the agent: FAIL_TEXT
**                          and a message, or FAIL_ERROR and a codec record
**                          of the error object's kind err message
**                          traceback pid attempts worker (init raised)
**               TAG_BYE    answer to TAG_QUIT: the agent sends no more
**   either way  TAG_BIG    a message longer than PARMAP_MPI_MAXMSG bytes
**                          (1 GiB; the environment may lower it): count =
**                          its tag, a = its length; TAG_PARTs follow
**
** Flow control without deadlock: rank 0 sends items on CREDIT, never in
** answer to results, and answers every CREDIT with a segment or TAG_END,
** at once unless buffersize items are out (then when the loop takes one).
** An agent blocks (in its items iterator) only when it holds no item,
** after sending every result it holds; so whenever an agent waits for
** items, rank 0 has a CREDIT to answer (or results for the loop), and
** whenever rank 0 waits for results, some agent either works or waits
** with a CREDIT sent.
*/
#ifndef PARMAP_MPI_H
#define PARMAP_MPI_H

#include <lua.h>
#include <mpi.h>
#include <stdint.h>

#include "buf.h"

enum {
  TAG_HELLO = 1, TAG_MAP, TAG_SEG, TAG_END, TAG_ABORT, TAG_QUIT,
  TAG_CREDIT, TAG_RES, TAG_DONE, TAG_FAIL, TAG_BYE,
  TAG_BIG, TAG_PART, /* a message over PARMAP_MPI_MAXMSG, in parts */
  TAG_HB,             /* agent -> 0, every second: alive */
  TAG_ENV             /* 0 -> agent, first: rank 0's PARMAP_* variables */
};

enum { FAIL_TEXT = 0, FAIL_ERROR = 1 }; /* TAG_FAIL's first byte */

typedef struct MsgHdr {
  uint32_t mapid, count;
  int64_t a, b;
} MsgHdr;

/* Sends in flight: each keeps its buffer until MPI_Test says done (the
   parts of a split message share theirs). */
typedef struct Shared {
  parmap_buf buf;
  int refs;
} Shared;
typedef struct Outbox {
  struct Pending {
    MPI_Request req;
    Shared *sh;
  } *v;
  int n, cap;
} Outbox;

/* Send b (which must start with a MsgHdr) to dest: the Outbox takes b's
   memory (b is left empty). Returns 0, or -1 when out of memory. */
int mpi_send(Outbox *o, parmap_buf *b, int dest, int tag);
/* A message of just a header. */
int mpi_send_hdr(Outbox *o, int dest, int tag, uint32_t mapid, int64_t a);
/* Free the buffers of finished sends. */
void mpi_poll(Outbox *o);
/* Wait for every send. */
void mpi_drain(Outbox *o);

/* Receive one message from src (or MPI_ANY_SOURCE) into b (replacing its
   contents). Blocking, or with block = 0 returns 0 when none is there.
   Returns 1 with *tag and *from set, -1 when out of memory. From one
   source (not MPI_ANY_SOURCE) with block = 0, a message that has not all
   arrived (a rendezvous: its sender must call MPI for the rest) goes on
   arriving in the background and a later call returns it: the caller
   works meanwhile rather than wait for the sender. */
int mpi_recv(int src, int block, parmap_buf *b, int *tag, int *from);

/* Header of a received message (zeroes when too short). */
MsgHdr mpi_hdr(const parmap_buf *b);
/* Start a message: b = header. */
int mpi_begin(parmap_buf *b, uint32_t mapid, uint32_t count, int64_t a,
              int64_t b2);

/* rank 0 */
int parmap_mpi_coord_open(lua_State *L); /* luaopen for "parmap.mpi" */
void parmap_mpi_coord_init(int size);    /* collects every HELLO */
void parmap_mpi_coord_quit(void);        /* QUIT to every agent, drains */

/* ranks > 0: never returns before TAG_QUIT. threads: what MPI_Init_thread
   provided (heartbeats need MPI_THREAD_MULTIPLE). */
int parmap_mpi_agent_main(lua_State *L, int rank, int threads);
/* rank 0: did an agent die (then MPI_Finalize is skipped)? */
int parmap_mpi_coord_lost(void);
/* an agent: rank 0 said so with its QUIT */
int parmap_mpi_agent_lost(void);

#endif
