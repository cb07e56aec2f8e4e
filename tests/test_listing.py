"""Directory listings cost the directory's entries, not its history; volumes of the
older layout are refused until ``fusesqlite upgrade`` moves them to the current one."""
from __future__ import annotations

import random
import sqlite3

import pytest
from helpers import run_cli

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import pack
from fusesqlite.pages import decode_block, encode_block
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.volume import FORMAT, ChangeSet, DataCommit, Volume, VolumeFormatError

pytestmark = pytest.mark.timeout(120)

FILE = Inode(mode=0o100644, uid=0, gid=0, nlink=1)
DIR = Inode(mode=0o40755, uid=0, gid=0, nlink=2)


def _churned_volume(tmp_path, steps: int = 600, seed: int = 7) -> tuple[Volume, list[int], list[int]]:
    """A volume whose root and one subdirectory saw ``steps`` random creates, unlinks,
    re-creates under a used name and renames. Returns it, the two directories and
    every version committed."""
    vol = Volume(EmbeddedStore(str(tmp_path / "store")), "default", author="test")
    vol.open()
    sub = vol.allocate_inodes(1)[0]
    versions = [vol.commit(ChangeSet(inodes={sub: DIR}, dirents={(ROOT_INO, b"sub"): sub})).version]
    rng = random.Random(seed)
    live: dict[tuple[int, bytes], int] = {}
    for _ in range(steps):
        parent = rng.choice((ROOT_INO, sub))
        name = f"f{rng.randrange(12)}".encode()
        other = (parent, f"f{rng.randrange(12)}".encode())
        key = (parent, name)
        if key in live and rng.random() < 0.3 and other not in live:  # rename
            changes = ChangeSet(dirents={key: None, other: live[key]})
            live[other] = live.pop(key)
        elif key in live:  # unlink
            changes = ChangeSet(inodes={live[key]: None}, dirents={key: None})
            del live[key]
        else:  # create
            ino = vol.allocate_inodes(1)[0]
            changes = ChangeSet(inodes={ino: FILE}, dirents={key: ino})
            live[key] = ino
        versions.append(vol.commit(changes).version)
    return vol, [ROOT_INO, sub], versions


def _names_at(vol: Volume, parent: int, version: int) -> list[tuple[bytes, int]]:
    return vol.store.transact(lambda tr: vol._entries_at(tr, parent, version))


def _names_from_history(vol: Volume, parent: int, version: int) -> list[tuple[bytes, int]]:
    return vol.store.transact(lambda tr: vol._entries_from_history(tr, parent, version))


def test_a_listing_at_any_version_is_the_directory_as_it_was_then(tmp_path):
    vol, dirs, versions = _churned_volume(tmp_path)
    vol.LIST_LAG_LIMIT = 250  # views further back take the history path: both are checked
    for parent in dirs:
        seen_lagging = seen_far = 0
        for i, version in enumerate(versions):
            expected = _names_from_history(vol, parent, version)
            assert _names_at(vol, parent, version) == expected, (parent, version)
            assert [(n, i) for n, i, _ in vol.list_dir(parent, version)] == expected
            lag = len(versions) - 1 - i  # commits after it
            seen_lagging += 0 < lag <= vol.LIST_LAG_LIMIT
            seen_far += lag > vol.LIST_LAG_LIMIT
        assert seen_lagging and seen_far


class _CountingStore:
    """The real store, counting the rows its transactions' range reads return."""

    def __init__(self, store: EmbeddedStore) -> None:
        self.store, self.rows = store, 0

    def transact(self, fn):
        store = self

        class Counted:
            def __init__(self, tr) -> None:
                self.tr = tr

            def __getattr__(self, name):
                return getattr(self.tr, name)

            def get_range(self, *a, **kw):
                rows = self.tr.get_range(*a, **kw)
                store.rows += len(rows)
                return rows

        def counted(tr):
            return fn(Counted(tr))

        return self.store.transact(counted)


def test_listing_a_directory_reads_its_entries_not_its_history(tmp_path):
    vol = Volume(EmbeddedStore(str(tmp_path / "store")), "default", author="test")
    vol.open()
    keep = vol.allocate_inodes(3)
    vol.commit(ChangeSet(inodes={i: FILE for i in keep}, dirents={(ROOT_INO, b"k%d" % i): i for i in keep}))
    for _ in range(2000):  # what a WAL database's -wal does at every connection
        ino = vol.allocate_inodes(1)[0]
        vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"x.db-wal"): ino}))
        vol.commit(ChangeSet(inodes={ino: None}, dirents={(ROOT_INO, b"x.db-wal"): None}))
    head = vol.open()
    counting = _CountingStore(vol.store)
    vol.store = counting
    listed = vol.list_dir(ROOT_INO, head)
    assert [name for name, _, _ in listed] == [b"k%d" % i for i in keep]
    assert counting.rows <= 2 * len(keep), f"{counting.rows} rows read to list 3 entries"
    behind = vol.log_range(0, head)[-11].version
    counting.rows = 0
    lagging = vol.list_dir(ROOT_INO, behind)  # a view 10 versions behind: the log between is read too
    assert lagging == listed
    assert counting.rows <= 2 * len(keep) + 10 + 5 * 2


def _downgrade(store_dir) -> None:
    """Make the volume what the older layout wrote: no current entries, format 1."""
    vol = Volume(EmbeddedStore(str(store_dir)), "default", author="test")

    def fn(tr):
        tr.clear_range(*vol.ks.children("cd"))
        tr.set(vol.ks.meta(), pack((1, 4096)))

    vol.store.transact(fn)
    vol.store.close()
@pytest.mark.embedded
def test_a_volume_of_the_older_format_is_refused_until_upgraded(mounts, tmp_path):
    m = mounts()
    for i in range(3):
        with sqlite3.connect(m / f"db{i}.sqlite") as c:
            c.execute("create table t(x)")
            c.execute("insert into t values (?)", (i,))
        c.close()
    (m / "gone").write_bytes(b"x")
    (m / "gone").unlink()
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"y")
    m.stop()
    _downgrade(m.store)

    unused = tmp_path / "mp-unused"
    unused.mkdir()
    r = run_cli("mount", str(unused), "--store", m.store, timeout=30)
    lines = [line for line in r.stderr.splitlines() if line.startswith("fusesqlite: error:")]  # after the log's
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "has format 1" in lines[0] and "fusesqlite upgrade" in lines[0], lines[0]

    r = run_cli("upgrade", "--store", m.store)
    assert r.returncode == 0, r.stderr
    assert f"upgraded to format {FORMAT} (5 directory entries indexed)" in r.stdout, r.stdout
    r = run_cli("upgrade", "--store", m.store)
    assert r.returncode == 0 and "nothing to do" in r.stdout, (r.stdout, r.stderr)

    m2 = mounts.remount(m)
    assert sorted(p.name for p in m2.mountpoint.iterdir()) == ["d", "db0.sqlite", "db1.sqlite", "db2.sqlite"]
    assert [p.name for p in (m2 / "d").iterdir()] == ["f"]
    for i in range(3):
        c = sqlite3.connect(m2 / f"db{i}.sqlite")
        assert c.execute("select x from t").fetchall() == [(i,)]
        c.close()


def test_an_upgrade_that_meets_a_commit_fails_and_runs_again(tmp_path):
    vol, dirs, _ = _churned_volume(tmp_path, steps=200)
    expected = {parent: _names_at(vol, parent, vol.open()) for parent in dirs}
    vol.store.close()
    _downgrade(tmp_path / "store")
    vol = Volume(EmbeddedStore(str(tmp_path / "store")), "default", author="other")
    with pytest.raises(VolumeFormatError, match="fusesqlite upgrade"):
        vol.open()
    vol.UPGRADE_BATCH = 50
    writer = Volume(vol.store, "default", author="old-mount")

    def commit_once(read: int) -> None:
        if read == 50:
            ino = writer.allocate_inodes(1)[0]
            writer.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"late"): ino}))
            expected[ROOT_INO] = sorted([*expected[ROOT_INO], (b"late", ino)])

    with pytest.raises(VolumeFormatError, match="during the upgrade"):
        vol.upgrade(commit_once)
    with pytest.raises(VolumeFormatError, match="fusesqlite upgrade"):
        vol.open()  # still the older format
    assert vol.upgrade() == sum(len(v) for v in expected.values())
    head = vol.open()
    for parent in dirs:
        assert _names_at(vol, parent, head) == expected[parent]
    assert vol.upgrade() is None



def test_a_volume_of_format_2_keeps_its_versions_and_goes_on_after_upgrade(tmp_path):
    """Format 2 numbered versions 1, 2, 3... from the head: its keys stay as they are, and
    every stamped version is greater, so the upgrade only sets the format."""
    vol = Volume(EmbeddedStore(str(tmp_path / "store")), "default", author="test")
    vol.open()
    ino = vol.allocate_inodes(1)[0]
    old = Inode(mode=0o100644, uid=0, gid=0, nlink=1, size=2 * 4096, hwm=2, dver=2)
    data = [bytes([7]) * 4096, bytes([8]) * 4096]

    def format_2(tr):  # what the format-2 code wrote for a create with data at version 2
        tr.set(vol.ks.inode(ino, 2), old.pack())
        tr.set(vol.ks.dirent(ROOT_INO, b"old.db", 2), pack((ino,)))
        tr.set(vol.ks.current_dirent(ROOT_INO, b"old.db"), pack((ino,)))
        for b, block in enumerate(data):
            tr.set(vol.ks.block(ino, b, 2), encode_block(block, ino, b))
        tr.set(vol.ks.log(2), pack((0.0, "old-mount", (ino,), ((ROOT_INO, b"old.db"),), ())))
        tr.set(vol.ks.head(), pack((2,)))
        tr.set(vol.ks.meta(), pack((2, 4096)))

    vol.store.transact(format_2)
    with pytest.raises(VolumeFormatError, match="has format 2.*fusesqlite upgrade"):
        vol.open()
    assert vol.upgrade() == 0 and vol.upgrade() is None
    assert vol.open() == 2
    assert vol.read_inode(ino, 2) == old
    raw = vol.read_blocks(ino, range(2), 2)
    assert [decode_block(raw[b], ino, b, 4096) for b in range(2)] == data
    new_block = bytes([9]) * 4096
    result = vol.commit(ChangeSet(inodes={ino: old}, blocks={(ino, 1): encode_block(new_block, ino, 1)}),
                        {ino: DataCommit(based_on=2)})
    assert result.version > 2 and result.records[ino].dver == result.version
    raw = vol.read_blocks(ino, range(2), result.version)
    assert [decode_block(raw[b], ino, b, 4096) for b in range(2)] == [data[0], new_block]
    assert [e.version for e in vol.log_range(1, result.version)] == [2, result.version]
    assert [n for n, _, _ in vol.list_dir(ROOT_INO, 2)] == [b"old.db"]
    vol.store.close()
