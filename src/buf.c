/*
** buf.c: growable byte buffer (see buf.h).
*/
#define _GNU_SOURCE
#include "buf.h"

#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#define HUGE_MIN ((size_t)4 << 20) /* from here on, a mapping */
#define HUGE_PAGE ((size_t)2 << 20)

static char *map_region(size_t cap) {
  void *p = mmap(NULL, cap, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
  madvise(p, cap, MADV_HUGEPAGE); /* advice only: ignore a refusal */
#endif
  return (char *)p;
}

int parmap_buf_grow(parmap_buf *b, size_t extra) {
  size_t need, cap;
  char *p;
  if (extra > SIZE_MAX - b->len) return -1;
  need = b->len + extra;
  if (need <= b->cap) return 0;
  cap = b->cap ? b->cap : 256;
  while (cap < need) cap = (cap > SIZE_MAX / 2) ? need : cap * 2;
  if (cap < HUGE_MIN) {
    p = realloc(b->p, cap);
    if (p == NULL) return -1;
  } else {
    cap = (cap + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    if (b->mapped) {
#ifdef MREMAP_MAYMOVE
      void *q = mremap(b->p, b->cap, cap, MREMAP_MAYMOVE);
      if (q == MAP_FAILED) return -1;
      p = (char *)q;
#ifdef MADV_HUGEPAGE
      madvise(p, cap, MADV_HUGEPAGE);
#endif
#else
      if ((p = map_region(cap)) == NULL) return -1;
      memcpy(p, b->p, b->len);
      munmap(b->p, b->cap);
#endif
    } else {
      if ((p = map_region(cap)) == NULL) return -1;
      if (b->len) memcpy(p, b->p, b->len);
      free(b->p);
      b->mapped = 1;
    }
  }
  b->p = p;
  b->cap = cap;
  return 0;
}

void parmap_buf_free(parmap_buf *b) {
  if (b->mapped)
    munmap(b->p, b->cap);
  else
    free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
  b->mapped = 0;
}
