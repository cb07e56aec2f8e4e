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
from fusesqlite.fs.journal import Journal
from fusesqlite.inodes import TRANSIENT_BASE, Inode

SPOOL_BYTES = 1 << 20


class TransientFile:
    """A journal or -shm: its bytes in this daemon's memory (spilled to a temporary
    file beyond SPOOL_BYTES), never in the store, and for a journal the state of its
    protocol (``journal``: fs/journal.py)."""

    __slots__ = ("ino", "parent", "name", "data", "rec", "opens", "linked", "journal")

    def __init__(self, ino: int, parent: int, name: bytes, mode: int, uid: int, gid: int) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.data = Contents(SPOOL_BYTES, tempfile.gettempdir())
        self.rec = Inode.new(stat.S_IFREG, mode, uid, gid)
        self.opens = 0
        self.linked = True
        self.journal = Journal(self.data)

    @property
    def size(self) -> int:
        return self.data.size

    def record(self) -> Inode:
        changed = self.data.take_changed()  # a record per write would cost more than the write
        if changed is not None:
            self.rec = self.rec.with_(mtime_ns=changed, ctime_ns=changed)
        return self.rec.with_(size=self.data.size)

    def read(self, offset: int, length: int) -> bytes:
        return self.data.read(offset, length)

    def write(self, offset: int, buf: bytes) -> None:
        self.data.write(offset, buf)

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
