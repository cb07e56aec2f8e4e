"""Transient files: rollback journals, super-journals and WAL index (-shm) files.

They live in the daemon's memory only, never in the store (DESIGN.md section 3):
a journal matters only to processes on this mount, and after a daemon crash the
store is already at the last commit, which is what playing the journal back would
have produced. Their inode numbers come from a range the store never uses.
Contents beyond ``SPOOL_BYTES`` spill to an unlinked local temporary file, so a
journal as big as its transaction does not count against the daemon's memory.
Below that they are a bytearray: a small transaction writes its journal ten times,
and a SpooledTemporaryFile's seek and write cost more than the slice assignment.
"""
from __future__ import annotations

import itertools
import os
import stat
import tempfile
import time
from typing import IO

from fusesqlite.inodes import TRANSIENT_BASE, Inode

SPOOL_BYTES = 1 << 20


class TransientFile:
    __slots__ = (
        "ino", "parent", "name", "mem", "spill", "size", "rec", "opens", "linked", "writing", "first", "changed_ns", "db_synced",
    )

    def __init__(self, ino: int, parent: int, name: bytes, mode: int, uid: int, gid: int) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.mem = bytearray()  # the contents while they fit in SPOOL_BYTES (len(mem) == size)
        self.spill: IO[bytes] | None = None  # then: a temporary file of length ``size``
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
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        if self.spill is None:
            return bytes(self.mem[offset:end])
        return os.pread(self.spill.fileno(), end - offset, offset)

    def write(self, offset: int, buf: bytes) -> None:
        if not buf:
            return
        if offset == 0:
            self.first = buf[0]
        elif self.size == 0:
            self.first = 0  # the gap before ``offset`` reads as zeros
        end = offset + len(buf)
        if self.spill is None and end > SPOOL_BYTES:
            self._spill()
        if self.spill is None:
            mem = self.mem
            if offset > len(mem):
                mem.extend(bytes(offset - len(mem)))  # writing past the end fills the gap with zeros
            mem[offset:end] = buf
        else:
            os.pwrite(self.spill.fileno(), buf, offset)
        if end > self.size:
            self.size = end
        self.changed_ns = time.time_ns()

    def truncate(self, size: int) -> None:
        if size > self.size and self.size == 0:
            self.first = 0
        if self.spill is None and size > SPOOL_BYTES:
            self._spill()
        if self.spill is None:
            if size < self.size:
                del self.mem[size:]
            else:
                self.mem.extend(bytes(size - self.size))
        else:
            os.ftruncate(self.spill.fileno(), size)  # growing reads as zeros
        self.size = size
        self.changed_ns = time.time_ns()

    def _spill(self) -> None:
        """Move the contents to an unlinked temporary file (local disk, not memory)."""
        spill = tempfile.TemporaryFile()
        spill.write(self.mem)
        spill.flush()
        self.spill, self.mem = spill, bytearray()

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
        self.mem = bytearray()


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
