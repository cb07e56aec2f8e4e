/*
 * What fusesqlite._journal offers the FUSE session hook (_fuse_init.c): a
 * journal's writes and reads answered in C, without a Python handler.
 * Passed as a PyCapsule named JOURNAL_API_CAPSULE.
 */
#ifndef FUSESQLITE_JOURNAL_H
#define FUSESQLITE_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#define JOURNAL_API_CAPSULE "fusesqlite._journal.api"

struct journal_api {
    /* 1 if the write went into the journal registered under file handle fh (the
     * caller then answers it), 0 if Python must handle it */
    int (*write)(uint64_t fh, int64_t off, const char *buf, size_t size);
    /* 1 with out and len set (free to_free after answering), 0 if Python must */
    int (*read)(uint64_t fh, int64_t off, size_t size, const char **out, size_t *len, char **to_free);
    /* 1 if fh is a registered journal handle whose fsync (flush: 1, its close)
     * C answers at once (Contents.answers, set by fs/journal.py), 0 if Python must */
    int (*sync)(uint64_t fh, int flush);
};

#endif
