/*
** journal.h: a map's journal (option `journal`): the result records of
** finished items, appended as they arrive, so that a later run of the
** same map yields them without running those items again.
*/
#ifndef PARMAP_JOURNAL_H
#define PARMAP_JOURNAL_H

#include <stddef.h>
#include <lua.h>

typedef struct ParmapJournal ParmapJournal;

#define PARMAP_JOURNAL_MT "parmap.Journal"

/* The journal at idx (a userdata of core.journal), or NULL for nil. */
ParmapJournal *parmap_journal_check(lua_State *L, int idx);
/* The first index >= from that the journal holds, or 0. */
lua_Integer parmap_journal_next(const ParmapJournal *j, lua_Integer from);
/* The item count the journal knows (its header's, or the one a completed
   run recorded), or -1. */
lua_Integer parmap_journal_count(const ParmapJournal *j);
/* Raise: the items iterator gave more items than the journal's count. */
int parmap_journal_more(lua_State *L, const ParmapJournal *j);
/* The REC_OK record of item `index` as the journal holds it, or NULL. */
const char *parmap_journal_get(const ParmapJournal *j, lua_Integer index,
                               size_t *len);
/* Add item index's REC_OK record to what is to be written. */
void parmap_journal_append(lua_State *L, ParmapJournal *j, lua_Integer index,
                           const char *rec, size_t len);
/* Write what was added (one write: a frame's, a batch's records), and
   fdatasync every PARMAP_JOURNAL_BATCH records or second; raises naming
   the file when the write fails. */
void parmap_journal_commit(lua_State *L, ParmapJournal *j);
/* The map delivered all its `count` items: record the count if the header
   did not know it, raise if it differs from the one recorded; close. */
void parmap_journal_end(lua_State *L, ParmapJournal *j, lua_Integer count);
/* Write and sync what is pending (errors ignored: a stop's path), then
   close the file (its lock goes); later calls do nothing. */
void parmap_journal_close(ParmapJournal *j);
void parmap_journal_register(lua_State *L);

#define PARMAP_JOURNAL_BATCH 64

#endif
