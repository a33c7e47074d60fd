/*
** buf.h: a growable byte buffer.
** Owns only memory; knows nothing of Lua or processes. A buffer that must
** survive a Lua error lives inside a userdata whose __gc frees it.
*/
#ifndef PARMAP_BUF_H
#define PARMAP_BUF_H

#include <stddef.h>
#include <string.h>

typedef struct parmap_buf {
  char *p;
  size_t len; /* bytes in use */
  size_t cap; /* bytes allocated */
} parmap_buf;

#define PARMAP_BUF_INIT {NULL, 0, 0}

/* Make room for `extra` more bytes. Returns 0, or -1 when out of memory. */
int parmap_buf_grow(parmap_buf *b, size_t extra);
void parmap_buf_free(parmap_buf *b);
/* Drop the first n bytes, keeping the rest. */
void parmap_buf_consume(parmap_buf *b, size_t n);

static inline int parmap_buf_reserve(parmap_buf *b, size_t extra) {
  return (b->cap - b->len >= extra) ? 0 : parmap_buf_grow(b, extra);
}

#endif
