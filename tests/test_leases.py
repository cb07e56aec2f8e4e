"""Write leases as the volume grants them: a view is stale only where another mount
committed since it was read."""
from __future__ import annotations

import pytest

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.volume import ChangeSet, DataCommit, StaleView, Volume

FILE = Inode(mode=0o100644, uid=0, gid=0, nlink=1)


def test_a_write_lease_taken_on_a_view_older_than_its_own_last_commit_is_granted(tmp_path):
    """A WAL session's last close publishes the database while SQLite, still holding
    its lock, writes the next transaction's journal: the journal's lease may be asked
    with the record read before that commit landed. That version is the asker's own
    and based on everything before it, so the view is not stale; another mount's
    newer version is (walnoshm.test's 2.1.5 failed with "disk I/O error" otherwise)."""
    vol = Volume(EmbeddedStore(str(tmp_path / "store")), "default", author="mount-a")
    vol.open()
    ino = vol.allocate_inodes(1)[0]
    first = vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"db"): ino})).version
    before = vol.read_inode(ino, first).dver
    vol.commit(ChangeSet(inodes={ino: FILE}), {ino: DataCommit(based_on=before, staging=None)})
    vol.acquire_lease(ino, 10.0, before)  # the record read before its own commit landed

    other = Volume(vol.store, "default", author="mount-b")
    seen = vol.read_inode(ino, vol.head()).dver
    vol.commit(ChangeSet(inodes={ino: FILE}), {ino: DataCommit(based_on=seen, staging=None)}, release_leases=[ino])
    latest = other.read_inode(ino, other.head()).dver
    other.commit(ChangeSet(inodes={ino: FILE}), {ino: DataCommit(based_on=latest, staging=None)})
    with pytest.raises(StaleView):
        vol.acquire_lease(ino, 10.0, latest)  # mount-b's version: this view is stale
