"""Commits to different databases never conflict in the store.

FoundationDB refuses a transaction when another one committed, after its read
version, a write into a range it read (not through the snapshot). The embedded
store cannot show that (SQLite conflicts per database file), so these tests record
what each of the volume's transactions reads and writes on the real store, as
FoundationDB's resolver sees it, and check the sets: two databases' commits must
not meet, one database's two commits must.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.pages import encode_block
from fusesqlite.store.base import STAMP_BYTES
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.volume import ChangeSet, DataCommit, Volume

T = TypeVar("T")
FILE = Inode(mode=0o100644, uid=0, gid=0, nlink=1)
BS = 4096

#: [begin, end) key ranges
Ranges = list[tuple[bytes, bytes]]


@dataclass
class Footprint:
    """What one committed transaction read (its read conflict ranges) and wrote."""

    reads: Ranges = field(default_factory=list)
    writes: Ranges = field(default_factory=list)

    def conflicts_with(self, earlier: Footprint) -> bool:
        """Whether FoundationDB would refuse this transaction had ``earlier`` committed after its read version."""
        return any(rb < we and wb < re for rb, re in self.reads for wb, we in earlier.writes)


def _point(key: bytes) -> tuple[bytes, bytes]:
    return key, key + b"\x00"


class _Recorded:
    """The real transaction, noting reads and writes (ranges as wide as asked: a
    limited read's real conflict range is narrower, so this errs towards conflicts)."""

    def __init__(self, tr, fp: Footprint) -> None:
        self._tr, self._fp = tr, fp
        self.snapshot = tr.snapshot  # snapshot reads add no conflict range

    def get(self, key):
        self._fp.reads.append(_point(key))
        return self._tr.get(key)

    def get_range(self, begin, end, **kw):
        self._fp.reads.append((begin, end))
        return self._tr.get_range(begin, end, **kw)

    def get_ranges(self, reads):
        self._fp.reads.extend((r.begin, r.end) for r in reads)
        return self._tr.get_ranges(reads)

    def set(self, key, value):
        self._fp.writes.append(_point(key))
        self._tr.set(key, value)

    def clear(self, key):
        self._fp.writes.append(_point(key))
        self._tr.clear(key)

    def clear_range(self, begin, end):
        self._fp.writes.append((begin, end))
        self._tr.clear_range(begin, end)

    def set_versionstamped_key(self, key, offset, value):
        prefix = key[:offset]  # any stamp: every key with these bytes before it
        self._fp.writes.append((prefix, prefix + b"\xff" * (STAMP_BYTES + 1)))
        self._tr.set_versionstamped_key(key, offset, value)

    def set_versionstamped_value(self, key, value, offset):
        self._fp.writes.append(_point(key))
        self._tr.set_versionstamped_value(key, value, offset)

    def versionstamp(self):
        return self._tr.versionstamp()


class RecordingStore:
    """The embedded store, keeping the footprint of the last transaction that committed."""

    def __init__(self, inner: EmbeddedStore) -> None:
        self.inner, self.limits, self.description = inner, inner.limits, inner.description
        self.last = Footprint()

    def transact(self, fn: Callable) -> T:
        def recorded(tr):
            fp = Footprint()
            result = fn(_Recorded(tr, fp))
            self.last = fp
            return result

        return self.inner.transact(recorded)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def mounts(tmp_path):
    """Two mounts' volumes on one store: a call of either clears only its own earlier
    calls' keys, which nothing running reads any more."""
    store = RecordingStore(EmbeddedStore(tmp_path / "store"))
    a, b = (Volume(store, "default", author=f"mount-{x}") for x in "ab")  # type: ignore[arg-type]
    a.open()
    yield a, b
    store.close()


def _create(vol: Volume, name: bytes) -> tuple[int, Inode]:
    ino = vol.allocate_inodes(1)[0]
    rec = vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, name): ino},
                               expect={(ROOT_INO, name): None})).records[ino]
    return ino, rec


def _write(vol: Volume, ino: int, rec: Inode, byte: int) -> tuple[Inode, Footprint]:
    """A small data commit on an idle lease, as a mount's next SQLite transaction makes it."""
    result = vol.commit(
        ChangeSet(inodes={ino: rec.with_(size=BS, hwm=1)}, blocks={(ino, 0): encode_block(bytes([byte]) * BS, ino, 0)}),
        {ino: DataCommit(based_on=rec.dver)},
        idle_leases=(ino,),
    )
    return result.records[ino], vol.store.last  # type: ignore[attr-defined]


def _apart(one: Footprint, other: Footprint) -> bool:
    return not one.conflicts_with(other) and not other.conflicts_with(one)


def test_commits_of_two_databases_do_not_conflict_and_two_of_one_do(mounts):
    vol_a, vol_b = mounts
    a, rec_a = _create(vol_a, b"a.db")
    b, rec_b = _create(vol_b, b"b.db")
    vol_a.acquire_lease(a, 30.0, rec_a.dver)
    vol_b.acquire_lease(b, 30.0, rec_b.dver)
    rec_a, first_a = _write(vol_a, a, rec_a, 1)
    rec_b, first_b = _write(vol_b, b, rec_b, 2)
    assert _apart(first_a, first_b)
    # the check can fail: two commits of one database read what the other writes
    rec_a, second_a = _write(vol_a, a, rec_a, 3)
    assert second_a.conflicts_with(first_a) and first_a.conflicts_with(second_a)


def test_leases_and_creates_do_not_conflict_with_another_database_s_commits(mounts):
    vol_a, vol_b = mounts
    a, rec_a = _create(vol_a, b"a.db")
    b, rec_b = _create(vol_b, b"b.db")
    vol_b.acquire_lease(b, 30.0, rec_b.dver)
    _, commit_b = _write(vol_b, b, rec_b, 1)
    vol_a.acquire_lease(a, 30.0, rec_a.dver)
    lease_a = vol_a.store.last  # type: ignore[attr-defined]
    vol_a.want_lease(a, 1.0)
    want_a = vol_a.store.last  # type: ignore[attr-defined]
    _create(vol_b, b"c.db")
    create_c = vol_b.store.last  # type: ignore[attr-defined]
    assert _apart(lease_a, commit_b) and _apart(want_a, commit_b) and _apart(create_c, lease_a)
    # an unlink and a create of one name do
    vol_a.commit(ChangeSet(inodes={a: None}, dirents={(ROOT_INO, b"a.db"): None}, expect={(ROOT_INO, b"a.db"): a}))
    unlink_a = vol_a.store.last  # type: ignore[attr-defined]
    _create(vol_b, b"a.db")
    assert vol_b.store.last.conflicts_with(unlink_a)  # type: ignore[attr-defined]
