"""A lookup (or record read) that another mount's commit overtakes: its answer is the
record as of the commit, not the older one it read. The kernel makes a new inode of a
lookup's answer, and with the writeback cache keeps that inode's size whatever getattr
says later; the move's invalidation of the inode may reach the kernel before the
answer does (the kernel had no inode yet), so an older record there stays: a database
another mount had just filled looked empty ("no such table") on this one."""
from __future__ import annotations

import stat
import threading

import trio

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.transactions import Transactions
from fusesqlite.volume import ChangeSet, Volume


def _held(fn, read_done: threading.Event, go: threading.Event):
    """``fn``, whose result is held back until ``go`` (the read itself done first)."""
    def call(*args, **kw):
        result = fn(*args, **kw)
        read_done.set()
        go.wait(10)
        return result
    return call


def _setup(tmp_path):
    store = EmbeddedStore(tmp_path / "store")
    a, b = (Transactions(Volume(store, "default", author=n), cache_bytes=1 << 20, mount_id=n) for n in "ab")
    return store, a, b


async def _empty_file(a: Transactions, b: Transactions) -> int:
    """An empty file "f" both see."""
    await a.open_volume()
    await b.open_volume()
    ino = await a.new_ino()
    await a.commit_changes(ChangeSet(inodes={ino: Inode.new(stat.S_IFREG, 0o644, 0, 0)},
                                     dirents={(ROOT_INO, b"f"): ino}))
    b.snapshot = a.snapshot  # b follows the create
    return ino


async def _fill(a: Transactions, ino: int) -> None:
    fa = a.state(ino, await a.record(ino), "f")
    await a.write(fa, 0, b"hello")
    await a.commit(fa, "test")


async def _filled_behind_b(a: Transactions, b: Transactions) -> int:
    """An empty file "f" both see, then filled by a and not yet followed by b."""
    ino = await _empty_file(a, b)
    await _fill(a, ino)
    return ino


def _follow(b: Transactions, a: Transactions, ino: int) -> None:
    """What Following._apply does for a's commit (its move comes later)."""
    b.snapshot = max(b.snapshot, a.snapshot)
    b.records.put(ino, None, b.snapshot)


def test_a_lookup_overtaken_by_another_mounts_commit_answers_the_commits_record(tmp_path):
    store, a, b = _setup(tmp_path)
    read_done, go = threading.Event(), threading.Event()

    async def main() -> None:
        ino = await _empty_file(a, b)
        b.volume.lookup_current = _held(b.volume.lookup_current, read_done, go)  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            found: list = []

            async def look() -> None:
                found.append(await b.lookup(ROOT_INO, b"f"))

            nursery.start_soon(look)
            await trio.to_thread.run_sync(read_done.wait, 10)  # read as of the create: size 0
            await _fill(a, ino)
            _follow(b, a, ino)
            go.set()
        assert found[0] is not None and found[0][0] == ino
        assert found[0][1].size == 5, "the lookup answered the record its read found, older than the view"

    try:
        trio.run(main)
    finally:
        store.close()


def test_a_record_read_overtaken_by_another_mounts_commit_is_read_again(tmp_path):
    store, a, b = _setup(tmp_path)
    read_done, go = threading.Event(), threading.Event()

    async def main() -> None:
        ino = await _filled_behind_b(a, b)
        b.volume.read_inode = _held(b.volume.read_inode, read_done, go)  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            got: list = []

            async def read() -> None:
                got.append(await b.record(ino))

            nursery.start_soon(read)
            await trio.to_thread.run_sync(read_done.wait, 10)
            _follow(b, a, ino)
            go.set()
        assert got[0] is not None and got[0].size == 5
        # and the newer read is what the cache keeps
        assert b.records.get(ino) is not None and b.records.get(ino).size == 5

    try:
        trio.run(main)
    finally:
        store.close()
