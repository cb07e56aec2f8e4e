"""A volume's reads at a version and its commits, as blocking store transactions.

Everything here runs off the event loop (in worker threads): it is the only code
that turns file-system state into store keys, so the commit path is in one place.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import Keyspace, pack, unpack
from fusesqlite.store.base import Store, Transaction

log = logging.getLogger("fusesqlite.volume")

FORMAT = 1
DEFAULT_BLOCK_SIZE = 4096
INO_BATCH = 1024


@dataclass
class ChangeSet:
    """Everything one commit writes; applied atomically as one new version."""

    inodes: dict[int, Inode | None] = field(default_factory=dict)
    dirents: dict[tuple[int, bytes], int | None] = field(default_factory=dict)
    #: (ino, block_no) -> encoded block value (pages.encode_block)
    blocks: dict[tuple[int, int], bytes] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inodes or self.dirents or self.blocks)

    def touched(self) -> list[int]:
        return sorted(set(self.inodes) | {ino for ino, _ in self.blocks})


class Volume:
    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.ks = Keyspace(name)
        self.block_size = DEFAULT_BLOCK_SIZE

    # -- opening ---------------------------------------------------------------------
    def open(self, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
        """Create the volume on first use; return its head version."""

        def fn(tr: Transaction) -> tuple[int, int]:
            meta = tr.get(self.ks.meta())
            if meta is not None:
                fmt, bs = unpack(meta)
                if fmt != FORMAT:
                    raise ValueError(f"volume {self.name!r} has format {fmt}, this fusesqlite reads {FORMAT}")
                return bs, unpack(tr.get(self.ks.head()))[0]
            now = time.time_ns()
            root = Inode(mode=0o40755, uid=0, gid=0, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now)
            tr.set(self.ks.meta(), pack((FORMAT, block_size)))
            tr.set(self.ks.inode(ROOT_INO, 1), root.pack())
            tr.set(self.ks.next_ino(), pack((ROOT_INO + 1,)))
            tr.set(self.ks.head(), pack((1,)))
            tr.set(self.ks.log(1), pack((time.time(), (ROOT_INO,))))
            return block_size, 1

        self.block_size, head = self.store.transact(fn)
        return head

    def head(self) -> int:
        return self.store.transact(lambda tr: unpack(tr.get(self.ks.head()))[0])

    def allocate_inodes(self, count: int = INO_BATCH) -> range:
        def fn(tr: Transaction) -> int:
            first = unpack(tr.get(self.ks.next_ino()))[0]
            tr.set(self.ks.next_ino(), pack((first + count,)))
            return first

        first = self.store.transact(fn)
        return range(first, first + count)

    # -- reads at a version ----------------------------------------------------------
    @staticmethod
    def _latest(tr: Transaction, begin_end: tuple[bytes, bytes]) -> bytes | None:
        rows = tr.get_range(*begin_end, limit=1, reverse=True)
        return rows[0][1] if rows else None

    def read_inode(self, ino: int, version: int) -> Inode | None:
        def fn(tr: Transaction) -> Inode | None:
            value = self._latest(tr, self.ks.versions_upto(version, "i", ino))
            return Inode.unpack(value) if value else None

        return self.store.transact(fn)

    def lookup(self, parent: int, name: bytes, version: int) -> tuple[int, Inode] | None:
        """The child's inode number and record, in one store transaction."""

        def fn(tr: Transaction) -> tuple[int, Inode] | None:
            value = self._latest(tr, self.ks.versions_upto(version, "d", parent, name))
            if not value:
                return None
            ino = unpack(value)[0]
            rec = self._latest(tr, self.ks.versions_upto(version, "i", ino))
            if not rec:
                log.error("event=dangling_entry parent=%d name=%r ino=%d version=%d", parent, name, ino, version)
                return None
            return ino, Inode.unpack(rec)

        return self.store.transact(fn)

    def list_dir(self, parent: int, version: int) -> list[tuple[bytes, int, Inode]]:
        """(name, ino, record) of every entry visible at ``version``, by name."""

        def fn(tr: Transaction) -> list[tuple[bytes, int, Inode]]:
            latest: dict[bytes, tuple[int, bytes]] = {}
            for key, value in tr.get_range(*self.ks.children("d", parent)):
                _, _, name, ver = self.ks.parts(key)
                if ver <= version:
                    latest[name] = (ver, value)
            out = []
            for name in sorted(latest):
                value = latest[name][1]
                if not value:
                    continue
                ino = unpack(value)[0]
                rec = self._latest(tr, self.ks.versions_upto(version, "i", ino))
                if rec:
                    out.append((name, ino, Inode.unpack(rec)))
            return out

        return self.store.transact(fn)

    def read_blocks(self, ino: int, block_nos: Iterable[int], version: int) -> dict[int, bytes]:
        """Encoded values of ``block_nos`` as of ``version`` (absent = hole)."""

        def fn(tr: Transaction) -> dict[int, bytes]:
            # One reverse read per block: a range over all versions would return
            # every version of hot blocks (page 1 changes at every commit).
            found: dict[int, bytes] = {}
            for block_no in block_nos:
                value = self._latest(tr, self.ks.versions_upto(version, "b", ino, block_no))
                if value is not None:
                    found[block_no] = value
            return found

        return self.store.transact(fn)

    # -- commits ---------------------------------------------------------------------
    def commit(self, changes: ChangeSet) -> int:
        """Write ``changes`` as the next version of the volume; return that version."""

        def fn(tr: Transaction) -> int:
            version = unpack(tr.get(self.ks.head()))[0] + 1
            for ino, rec in changes.inodes.items():
                tr.set(self.ks.inode(ino, version), rec.pack() if rec else b"")
            for (parent, name), ino in changes.dirents.items():
                tr.set(self.ks.dirent(parent, name, version), pack((ino,)) if ino else b"")
            for (ino, block_no), value in changes.blocks.items():
                tr.set(self.ks.block(ino, block_no, version), value)
            tr.set(self.ks.log(version), pack((time.time(), tuple(changes.touched()))))
            tr.set(self.ks.head(), pack((version,)))
            return version

        return self.store.transact(fn)
