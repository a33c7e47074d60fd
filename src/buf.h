/*
** buf.h: a growable byte buffer.
** Owns only memory; knows nothing of Lua or processes. A buffer that must
** survive a Lua error lives inside a userdata whose __gc frees it.
** Large buffers are anonymous mappings advised for transparent huge pages:
** where a page fault is expensive (a VM exit on some hypervisors), faulting
** 2 MiB at a time instead of 4 KiB is worth several times the bandwidth.
*/
#ifndef PARMAP_BUF_H
#define PARMAP_BUF_H

#include <stddef.h>
#include <string.h>

typedef struct parmap_buf {
  char *p;
  size_t len; /* bytes in use */
  size_t cap; /* bytes allocated */
  int mapped; /* p is an mmap'd region (large buffers), not malloc'd */
} parmap_buf;

#define PARMAP_BUF_INIT {NULL, 0, 0, 0}

/* Make room for `extra` more bytes. Returns 0, or -1 when out of memory. */
int parmap_buf_grow(parmap_buf *b, size_t extra);
void parmap_buf_free(parmap_buf *b);

static inline int parmap_buf_reserve(parmap_buf *b, size_t extra) {
  return (b->cap - b->len >= extra) ? 0 : parmap_buf_grow(b, extra);
}

#endif
