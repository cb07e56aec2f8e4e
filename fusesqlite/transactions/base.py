"""The state a mount's view of the volume, its overlays and its commits share: the
snapshot, the caches, the files being written, the worker threads for store calls."""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TypeVar

import trio

from fusesqlite import metrics
from fusesqlite.file_state import FileState
from fusesqlite.inodes import Inode
from fusesqlite.pages import BlockCache
from fusesqlite.readahead import ReadAhead
from fusesqlite.store.base import StoreError
from fusesqlite.volume import (
    Volume,
)

log = logging.getLogger("fusesqlite.transactions")
T = TypeVar("T")

#: raw bytes of blocks per staging transaction at most: FoundationDB advises keeping
#: transactions under 1 MB (its limit is 10 MB), and a smaller chunk costs the embedded
#: store little (docs/benchmarks.md, bulk copy)
STAGE_CHUNK_MAX = 1 << 20

#: reads of a record that another mount's commit of it overtook, before the last one's
#: answer goes out as it is (MountView.record)
RECORD_READS = 3

#: files whose pages' version this mount remembers (Transactions.views): an int each
VIEWS_KEPT = 100_000

#: a commit of at most this many blocks, and no staging to publish, may run on the event
#: loop (``inline_commits``): encoding and writing them takes well under a millisecond
INLINE_MAX_BLOCKS = 32


class BlockCorrupt(StoreError):
    """Raised to the file-system layer when a block fails its checksum (EIO)."""



class RecordCache:
    """Bounded LRU of committed inode records, each tagged with the snapshot it was read at.

    Store reads run in threads and finish in any order: a lookup that started
    before another mount's change was applied must not put its older record back
    over the refreshed one (a file would then be opened, and its blocks cached, as
    of a version this mount has moved past). So a record read at an older snapshot
    than the entry's never replaces it. ``on_put`` hears of every record kept (the
    mount follows what it holds: coherence/follow.py).
    """

    def __init__(self, capacity: int = 100_000, on_put: Callable[[int, int], None] | None = None) -> None:
        self.capacity = capacity
        self.on_put = on_put
        self._lru: OrderedDict[int, tuple[int, Inode | None]] = OrderedDict()
        self._held: set[int] = set()  # the inodes with a record (not None)

    def get(self, ino: int) -> Inode | None:
        entry = self._lru.get(ino)
        if entry is None:
            return None
        self._lru.move_to_end(ino)
        return entry[1]

    def newer(self, ino: int, as_of: int) -> bool:
        """Whether the entry of ``ino`` is newer than a read as of ``as_of`` (another
        mount's commit of it was applied meanwhile, or this mount committed it)."""
        entry = self._lru.get(ino)
        return entry is not None and entry[0] > as_of

    def put(self, ino: int, rec: Inode | None, as_of: int) -> Inode | None:
        """Keep ``rec`` (None: unknown, read it again) unless a newer read is cached; return the newer record."""
        entry = self._lru.get(ino)
        if entry is not None and entry[0] > as_of:
            return entry[1]
        self._lru.pop(ino, None)
        self._lru[ino] = (as_of, rec)
        if rec is None:
            self._held.discard(ino)
        else:
            self._held.add(ino)
            if self.on_put is not None:
                self.on_put(ino, as_of)
        if len(self._lru) > self.capacity:
            gone, _ = self._lru.popitem(last=False)
            self._held.discard(gone)
        return rec

    def held(self) -> set[int]:
        """The inodes it has a record of."""
        return self._held


def _ignore(ino: int, as_of: int) -> None:
    """Nobody follows other mounts' commits (a Transactions without a mount above)."""


async def _nothing_cached(ino: int) -> None:
    """No kernel holds pages of the files (a Transactions without a file system above)."""



class TransactionsBase:
    """What the mount's view, its overlays and its commits share (built once, as ``Transactions``)."""

    def __init__(
        self,
        volume: Volume,
        cache_bytes: int,
        mount_id: str,
        overlay_bytes: int = 16 << 20,
        store_threads: int = 4,
    ) -> None:
        self.volume = volume
        self.bs = volume.block_size
        self.zero_block = bytes(self.bs)
        self.cache = BlockCache(cache_bytes)
        self.readahead = ReadAhead(volume, self.cache)
        #: the mount's coherence hears of every inode this mount reads state of, and the
        #: version it read it as of (coherence/follow.py, ``learned``)
        self.on_learned: Callable[[int, int], None] = _ignore
        #: a view of a past version (``mount --at``): every read exactly as of the snapshot
        self.frozen = False
        self.records = RecordCache(on_put=lambda ino, as_of: self.on_learned(ino, as_of))
        self.files: dict[int, FileState] = {}
        self.snapshot = 0
        #: called after a failed commit reverted a file: the file system above brings
        #: the kernel's pages along (fs/base.py sets it when it takes this object)
        self.on_rollback: Callable[[int], Awaitable[None]] = _nothing_cached
        self.mount_id = mount_id
        #: a file's overlay is staged into the store beyond this (bounds memory)
        self.overlay_bytes = overlay_bytes
        #: raw bytes per staging transaction: well inside the store's transaction limit
        #: (a block's value is at most a few bytes longer than the block)
        self.stage_chunk = max(self.bs, min(STAGE_CHUNK_MAX, overlay_bytes, volume.store.limits.transaction_bytes // 3))
        self.limiter = trio.CapacityLimiter(store_threads)
        #: ino -> data version of the pages the kernel may hold of it: its page cache
        #: outlives the file's opens, and moves only with a move (open_record)
        self.views: OrderedDict[int, int] = OrderedDict()
        #: files a move found with local changes, so their record stayed behind the store's
        self.behind: set[int] = set()
        self._inos: Iterator[int] = iter(())
        #: small commits run on the event loop's own thread (mount.py decides: when the
        #: mount has a single CPU, a hop to a worker thread and back costs more than
        #: the commit's wait for the disk; docs/decisions/2026-11-24-commit-on-a-worker-thread.md)
        self.inline_commits = False
        # what metrics.py reports (plain counters: the hot path only adds to them)
        self.commits: Counter[str] = Counter()  # by outcome: metrics.OUTCOMES
        self.commit_seconds = metrics.latency_histogram("fusesqlite_commit", "Commits of stored files, from the "
                                                        "commit point to the store's answer")
        self.written_bytes = self.committed_bytes = self.staged_bytes = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """A blocking store call, off the event loop (not cancellable: commits finish)."""
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter)

    async def open_volume(self) -> None:
        self.snapshot = await self.run(self.volume.open)
        self.bs = self.volume.block_size
        self.zero_block = bytes(self.bs)

    async def new_ino(self) -> int:
        ino = next(self._inos, None)
        if ino is None:
            self._inos = iter(await self.run(self.volume.allocate_inodes))
            ino = next(self._inos)
        return ino
