"""Inode records as stored, and file-name rules shared by every kind of file."""
from __future__ import annotations

import re
import stat
import time
from typing import Any, NamedTuple

from fusesqlite.keyspace import pack, unpack

ROOT_INO = 1
#: inode numbers of transient files (journals, -shm) live above this, never in the store
TRANSIENT_BASE = 1 << 62
NAME_MAX = 255

# SQLite's rollback journals, super-journals ("%s-mj%06X9%02X") and WAL index files
# are per-mount and transient (DESIGN.md section 3); everything else is stored.
_TRANSIENT = re.compile(rb"(-journal|-shm|-mj[0-9A-F]{6}9[0-9A-F]{2})\Z")
_SUPER_JOURNAL = re.compile(rb"-mj[0-9A-F]{6}9[0-9A-F]{2}\Z")


def is_transient_name(name: bytes) -> bool:
    return _TRANSIENT.search(name) is not None


def is_super_journal(name: bytes) -> bool:
    """A multi-database transaction's super-journal: its deletion commits all the databases."""
    return _SUPER_JOURNAL.search(name) is not None


def journal_target(name: bytes) -> bytes | None:
    """The database a rollback journal belongs to (``X-journal`` -> ``X``)."""
    return name[: -len(b"-journal")] if name.endswith(b"-journal") else None


class Inode(NamedTuple):
    """An inode record: immutable, copied with changes (``with_``).

    A named tuple rather than a frozen dataclass: a small transaction makes and
    copies about twenty of them, and dataclasses.replace costs three times more.
    """

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    #: symlink target
    target: bytes = b""
    #: blocks [0, hwm) may hold data in the store; growing a file zeroes what lies below it
    hwm: int = 0
    #: version of the last commit of the file's data: its blocks are read at this version
    dver: int = 0

    def pack(self) -> bytes:
        return pack((1, *self))

    @classmethod
    def unpack(cls, value: bytes) -> Inode:
        t = unpack(value)
        if t[0] != 1:
            raise ValueError(f"unknown inode record format {t[0]}")
        return cls(*t[1:])

    @classmethod
    def new(cls, kind: int, mode: int, uid: int, gid: int, nlink: int = 1, target: bytes = b"") -> Inode:
        now = time.time_ns()
        return cls(mode=kind | (mode & 0o7777), uid=uid, gid=gid, nlink=nlink, size=len(target),
                   atime_ns=now, mtime_ns=now, ctime_ns=now, target=target)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def with_data_of(self, other: Inode) -> Inode:
        """This record's attributes with ``other``'s data fields (size, blocks, data version).

        Commits merge onto the record in the store instead of overwriting it, so a
        chmod and a data commit of one file never undo each other.
        """
        return self._replace(size=other.size, hwm=other.hwm, dver=other.dver)

    def with_(self, **changes: Any) -> Inode:
        return self._replace(**changes)
