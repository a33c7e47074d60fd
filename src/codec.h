/*
** codec.h: the value codec. Turns Lua values into bytes and back.
** Knows Lua values and buffers; knows nothing of processes or pipes.
**
** A record is: a count n, n root values, then the body of every table the
** roots reach, in the order the tables were first met (breadth first).
** A table inside a value is written as "new table" or "table #k", so the
** encoder and decoder never recurse: nesting depth costs no C stack, shared
** references and cycles come back as they were. Metatables do not travel.
*/
#ifndef PARMAP_CODEC_H
#define PARMAP_CODEC_H

#include <lua.h>

#include "buf.h"

enum { PARMAP_OK = 0, PARMAP_EVALUE = -1, PARMAP_ECORRUPT = -2 };

/*
** Encode the n values at stack indices first..first+n-1 (absolute) as one
** record appended to b. `scratch` is the absolute index of an empty table the
** codec may use and leaves empty again. Returns PARMAP_OK, or PARMAP_EVALUE
** with *what set to the type name of a value that cannot be sent (b is then
** truncated back to its old length). Raises a Lua error when out of memory;
** b may then end in part of a record and scratch hold entries, which the
** caller must drop before it encodes again.
*/
int parmap_encode(lua_State *L, int first, int n, parmap_buf *b, int scratch,
                  const char **what);

/*
** The fast path of parmap_encode for one scalar (nil, boolean, number,
** string) at idx: appends the same record and returns 1. Returns 0, with b
** unchanged, for any other value (or when out of memory), which
** parmap_encode then handles.
*/
int parmap_encode_scalar(lua_State *L, int idx, parmap_buf *b);

/*
** Decode the record that starts at p[*pos] (the input ends at p[len]):
** pushes its values and returns their count, with *pos moved past it.
** On malformed input pushes nothing, sets *err and returns PARMAP_ECORRUPT.
*/
int parmap_decode(lua_State *L, const char *p, size_t len, size_t *pos,
                  int scratch, const char **err);

/*
** The fast path of parmap_decode for the most common record, one scalar:
** pushes it, moves *pos and returns 1. Returns 0 (nothing pushed, *pos
** unchanged) for any other record, which parmap_decode then reads.
*/
int parmap_decode_scalar(lua_State *L, const char *p, size_t len, size_t *pos);

/*
** Move *pos past the record that starts at p[*pos] without decoding it
** (the MPI agent relays records it never reads). Returns 0, or -1 when the
** record is malformed or truncated (*pos unchanged). It checks the layout
** only; the decoder that reads the record later checks the rest.
*/
int parmap_skip(const char *p, size_t len, size_t *pos);

/* parmap_decode_scalar for a number, a boolean or nil only: it allocates
   nothing, so it runs no finalizer and raises no error. */
int parmap_decode_plain(lua_State *L, const char *p, size_t len, size_t *pos);

/* Limits of the decoder, stated in its errors. */
#define PARMAP_MAX_VALUES 1000000 /* values in one record (Lua's stack) */
#define PARMAP_MAX_PREALLOC 0x4000000 /* array slots preallocated for a
                                          table, whatever its size hint */

/* Varints (7 bits a byte, low first), shared with the engine's framing. */
#define PARMAP_VARINT_MAX 10 /* bytes of the longest (64-bit) varint */

/* Append v at q, which has room for PARMAP_VARINT_MAX bytes (reserved
   once by the caller: lua-cjson's strbuf _unsafe style); returns the end. */
static inline char *parmap_varint_unsafe(char *q, unsigned long long v) {
  while (v >= 0x80) {
    *q++ = (char)(v | 0x80);
    v >>= 7;
  }
  *q++ = (char)v;
  return q;
}

/* Signed integers as varints: small magnitudes, small codes. */
static inline unsigned long long parmap_zigzag(lua_Integer i) {
  return ((unsigned long long)i << 1) ^ (i < 0 ? ~0ULL : 0ULL);
}
static inline lua_Integer parmap_unzigzag(unsigned long long v) {
  return (lua_Integer)((v >> 1) ^ (0ULL - (v & 1)));
}

/* Append v to b; 0, or -1 when out of memory. */
int parmap_put_varint(parmap_buf *b, unsigned long long v);
int parmap_get_varint(const char *p, size_t len, size_t *pos,
                      unsigned long long *v);

#endif
