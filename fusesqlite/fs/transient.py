"""Transient files: rollback journals, super-journals and WAL index (-shm) files.

They live in the daemon's memory only, never in the store (DESIGN.md section 3):
a journal matters only to processes on this mount, and after a daemon crash the
store is already at the last commit, which is what playing the journal back would
have produced. Their inode numbers come from a range the store never uses.
Their contents are a ``_journal.Contents`` (C): in memory up to ``SPOOL_BYTES``,
beyond that in an unlinked local temporary file, so a journal as big as its
transaction does not count against the daemon's memory. Being C, the FUSE session
hook answers most of a journal's writes and reads from it without a Python handler
(``_journal.c``).
"""
from __future__ import annotations

import itertools
import stat
import tempfile

from fusesqlite._journal import Contents
from fusesqlite.inodes import TRANSIENT_BASE, Inode

SPOOL_BYTES = 1 << 20


class TransientFile:
    __slots__ = (
        "ino", "parent", "name", "data", "rec", "opens", "linked", "_writing", "db_synced",
        "cached_opens", "unsettled", "kept_open", "refused",
    )

    def __init__(self, ino: int, parent: int, name: bytes, mode: int, uid: int, gid: int) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.data = Contents(SPOOL_BYTES, tempfile.gettempdir())
        self.rec = Inode.new(stat.S_IFREG, mode, uid, gid)
        self.opens = 0
        self.linked = True
        self._writing: int | None = None
        #: its database was fsynced while this journal was active: the kernel holds
        #: none of the transaction's pages (SQLite fsyncs last, unless synchronous=OFF)
        self.db_synced = False
        #: open handles through the page cache (files.py): the kernel sends their
        #: writes when SQLite fsyncs or closes the journal, not when it writes it
        self.cached_opens = 0
        #: created through the page cache, or written back, since its last commit: the
        #: transaction it started may still be running in the kernel's pages
        self.unsettled = False
        #: a handle through the page cache stayed open across a commit (locking_mode
        #: EXCLUSIVE): the next transaction through it starts unseen
        self.kept_open = False
        #: the errno of a write lease refused at the create, for the first write
        self.refused: int | None = None

    @property
    def writing(self) -> int | None:
        """The database whose transaction this journal's writes belong to, once started (files.py)."""
        return self._writing

    @writing.setter
    def writing(self, ino: int | None) -> None:
        self._writing = ino
        # then the C hook answers the writes that follow the header itself (_journal.c)
        self.data.started = ino is not None

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def first(self) -> int:
        return self.data.first

    def record(self) -> Inode:
        changed = self.data.take_changed()  # a record per write would cost more than the write
        if changed is not None:
            self.rec = self.rec.with_(mtime_ns=changed, ctime_ns=changed)
        return self.rec.with_(size=self.data.size)

    @property
    def active(self) -> bool:
        """Whether this is a journal SQLite would play back (its rule: non-empty, first byte set).

        While it is, the database's writes are an uncommitted transaction; the
        moment it stops being (deleted, truncated to zero, header zeroed) is
        SQLite's commit point.
        """
        data = self.data
        return data.size > 0 and data.first != 0

    @property
    def settle_due(self) -> bool:
        """The kernel wrote back a header that ended the transaction (PERSIST mode, a
        journal through the page cache): its commit waits for the app's next fsync or
        close of the journal, which SQLite makes before going on (files.py)."""
        return self.data.settle_wanted

    @settle_due.setter
    def settle_due(self, due: bool) -> None:
        self.data.settle_wanted = due  # then the C hook hands those to Python

    @property
    def in_transaction(self) -> bool:
        """Whether the database's writes may belong to an uncommitted transaction of this
        journal: then nothing but the journal's own commit point commits them."""
        return self.active or self.settle_due or self.unsettled or (self.kept_open and self.cached_opens > 0)

    def read(self, offset: int, length: int) -> bytes:
        return self.data.read(offset, length)

    def write(self, offset: int, buf: bytes) -> None:
        self.data.write(offset, buf)

    def truncate(self, size: int) -> None:
        self.settle_due = False
        self.data.truncate(size)

    def close(self) -> None:
        self.data.close()


class TransientFiles:
    """Registry by inode and by (parent, name)."""

    def __init__(self) -> None:
        self.by_ino: dict[int, TransientFile] = {}
        self.by_name: dict[tuple[int, bytes], TransientFile] = {}
        self._inos = itertools.count(TRANSIENT_BASE)

    def get(self, parent: int, name: bytes) -> TransientFile | None:
        return self.by_name.get((parent, name))

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> TransientFile:
        tf = TransientFile(next(self._inos), parent, name, mode, uid, gid)
        self.by_ino[tf.ino] = tf
        self.by_name[(parent, name)] = tf
        return tf

    def unlink(self, tf: TransientFile) -> None:
        self.by_name.pop((tf.parent, tf.name), None)
        tf.linked = False
        self.release_if_unused(tf)

    def move(self, tf: TransientFile, parent: int, name: bytes) -> None:
        replaced = self.by_name.get((parent, name))
        if replaced is not None and replaced is not tf:
            self.unlink(replaced)
        self.by_name.pop((tf.parent, tf.name), None)
        tf.parent, tf.name = parent, name
        self.by_name[(parent, name)] = tf

    def release_if_unused(self, tf: TransientFile) -> None:
        if not tf.linked and tf.opens == 0:
            self.by_ino.pop(tf.ino, None)
            tf.close()

    def in_dir(self, parent: int) -> list[TransientFile]:
        return [tf for (p, _), tf in self.by_name.items() if p == parent]
