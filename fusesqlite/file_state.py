"""A stored file's state on one mount beyond what is committed: its overlay of
written blocks, its pending size and mtime, its staging (transactions/ commits
it; readahead.py and the file system's operations read it)."""
from __future__ import annotations

import trio

from fusesqlite.inodes import Inode


class FileState:
    """A stored file's state on this mount beyond what is committed."""

    __slots__ = (
        "ino", "record", "size", "mtime_ns", "dirty", "committing", "opens", "gen", "commit_lock", "label",
        "staging", "staged_hwm", "modified",
    )

    def __init__(self, ino: int, record: Inode, label: str) -> None:
        self.ino = ino
        self.record = record  # as last committed
        self.size = record.size
        self.mtime_ns = record.mtime_ns
        self.dirty: dict[int, bytes | bytearray] = {}
        self.committing: dict[int, bytes | bytearray] = {}
        self.opens = 0
        self.gen = 0  # bumped when committed content changes; guards cache fills
        self.commit_lock = trio.Lock()
        self.label = label  # the file's name, for log lines
        #: version holding blocks staged (written, unpublished) by this mount, if any
        self.staging: int | None = None
        self.staged_hwm = 0
        #: data written or truncated since the last commit: the commit moves mtime
        #: (see Transactions.write for why not every write does)
        self.modified = False

    @property
    def changed(self) -> bool:
        return (
            bool(self.dirty) or self.staging is not None or self.modified
            or self.size != self.record.size or self.mtime_ns != self.record.mtime_ns
        )

    @property
    def read_version(self) -> int:
        """Stored blocks are read as of the file's data version, or of its own staging."""
        return self.staging if self.staging is not None else self.record.dver

    def live_record(self) -> Inode:
        return self.record.with_(size=self.size, mtime_ns=self.mtime_ns)
