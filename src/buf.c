/*
** buf.c: growable byte buffer (see buf.h).
*/
#include "buf.h"

#include <stdint.h>
#include <stdlib.h>

int parmap_buf_grow(parmap_buf *b, size_t extra) {
  size_t need, cap;
  if (extra > SIZE_MAX - b->len) return -1;
  need = b->len + extra;
  if (need <= b->cap) return 0;
  cap = b->cap ? b->cap : 256;
  while (cap < need) cap = (cap > SIZE_MAX / 2) ? need : cap * 2;
  {
    char *p = realloc(b->p, cap);
    if (p == NULL) return -1;
    b->p = p;
    b->cap = cap;
  }
  return 0;
}

void parmap_buf_free(parmap_buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

void parmap_buf_consume(parmap_buf *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
    return;
  }
  memmove(b->p, b->p + n, b->len - n);
  b->len -= n;
}
