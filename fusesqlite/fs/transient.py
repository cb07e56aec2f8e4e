"""Transient files: rollback journals, super-journals and WAL index (-shm) files.

They live in the daemon's memory only, never in the store (DESIGN.md section 3):
a journal matters only to processes on this mount, and after a daemon crash the
store is already at the last commit, which is what playing the journal back would
have produced. Their inode numbers come from a range the store never uses.
Contents beyond ``SPOOL_BYTES`` spill to an unlinked local temporary file, so a
journal as big as its transaction does not count against the daemon's memory.
"""
from __future__ import annotations

import itertools
import stat
import tempfile
import time

from fusesqlite.inodes import TRANSIENT_BASE, Inode

SPOOL_BYTES = 1 << 20


class TransientFile:
    __slots__ = (
        "ino", "parent", "name", "data", "size", "rec", "opens", "linked", "writing", "first", "changed_ns", "db_synced",
    )

    def __init__(self, ino: int, parent: int, name: bytes, mode: int, uid: int, gid: int) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.data = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.size = 0
        self.rec = Inode.new(stat.S_IFREG, mode, uid, gid)
        self.opens = 0
        self.linked = True
        #: the database whose transaction this journal's writes belong to, once started (files.py)
        self.writing: int | None = None
        self.first = 0  # the first byte, kept apart: ``active`` is asked at every write
        #: when the data last changed, not yet in ``rec`` (a record per write cost more than the write)
        self.changed_ns: int | None = None
        #: its database was fsynced while this journal was active: the kernel holds
        #: none of the transaction's pages (SQLite fsyncs last, unless synchronous=OFF)
        self.db_synced = False

    def record(self) -> Inode:
        if self.changed_ns is not None:
            self.rec = self.rec.with_(mtime_ns=self.changed_ns, ctime_ns=self.changed_ns)
            self.changed_ns = None
        return self.rec.with_(size=self.size)

    @property
    def active(self) -> bool:
        """Whether this is a journal SQLite would play back (its rule: non-empty, first byte set).

        While it is, the database's writes are an uncommitted transaction; the
        moment it stops being (deleted, truncated to zero, header zeroed) is
        SQLite's commit point.
        """
        return self.size > 0 and self.first != 0

    def read(self, offset: int, length: int) -> bytes:
        self.data.seek(offset)
        return self.data.read(max(0, min(length, self.size - offset)))

    def write(self, offset: int, buf: bytes) -> None:
        if not buf:
            return
        if offset == 0:
            self.first = buf[0]
        elif self.size == 0:
            self.first = 0  # the gap before ``offset`` reads as zeros
        self.data.seek(offset)  # writing past the end fills the gap with zeros
        self.data.write(buf)
        self.size = max(self.size, offset + len(buf))
        self.changed_ns = time.time_ns()

    def truncate(self, size: int) -> None:
        if size < self.size:
            self.data.truncate(size)
        elif size > self.size:
            if self.size == 0:
                self.first = 0
            self.data.seek(size - 1)
            self.data.write(b"\0")
        self.size = size
        self.changed_ns = time.time_ns()

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
