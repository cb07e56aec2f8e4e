"""Overlays of uncommitted blocks, and the commit points that publish them.

Each stored file being written on this mount has a ``FileState``: the blocks
written since its last commit (its overlay), its pending size and mtime. Reads
see the overlay first, as a page cache would. ``Transactions.commit`` turns an
overlay into one store transaction (one new volume version); if the store
refuses it, the file reverts to its last committed state, so a failed commit
never leaves anything half-written. Deciding *when* to commit (journal deleted,
fsync, close) is the file-system layer's job; this module only knows how.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import AsyncExitStack
from functools import partial
from typing import TypeVar

import trio

from fusesqlite import metrics
from fusesqlite.file_state import FileState
from fusesqlite.gc import staging_abandoned
from fusesqlite.inodes import Inode
from fusesqlite.pages import BlockCache, CorruptBlock, decode_block, encode_block
from fusesqlite.readahead import ReadAhead
from fusesqlite.store.base import ConflictError, StoreError
from fusesqlite.volume import (
    ChangeSet,
    CommitResult,
    DataCommit,
    EntryChanged,
    LeaseHeld,
    StagingConflict,
    StaleView,
    StaleWrite,
    Volume,
    WalHeld,
)

log = logging.getLogger("fusesqlite.transactions")
T = TypeVar("T")


class BlockCorrupt(StoreError):
    """Raised to the file-system layer when a block fails its checksum (EIO)."""


def commit_outcome(e: StoreError) -> str:
    """How a failed commit ended, as metrics.py counts it: another writer's commit came
    first (conflict), another mount holds the write lease (busy), or anything else."""
    if isinstance(e, (ConflictError, StaleWrite, StaleView, EntryChanged, StagingConflict)):
        return "conflict"
    if isinstance(e, (LeaseHeld, WalHeld)):
        return "busy"
    return "error"


#: raw bytes of blocks per staging transaction at most: FoundationDB advises keeping
#: transactions under 1 MB (its limit is 10 MB), and a smaller chunk costs the embedded
#: store little (docs/benchmarks.md, bulk copy)
STAGE_CHUNK_MAX = 1 << 20

#: files whose pages' version this mount remembers (Transactions.views): an int each
VIEWS_KEPT = 100_000

#: a commit of at most this many blocks, and no staging to publish, may run on the event
#: loop (``inline_commits``): encoding and writing them takes well under a millisecond
INLINE_MAX_BLOCKS = 32


class RecordCache:
    """Bounded LRU of committed inode records, each tagged with the snapshot it was read at.

    Store reads run in threads and finish in any order: a lookup that started
    before another mount's change was applied must not put its older record back
    over the refreshed one (a file would then be opened, and its blocks cached, as
    of a version this mount has moved past). So a record read at an older snapshot
    than the entry's never replaces it.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[int, tuple[int, Inode | None]] = OrderedDict()

    def get(self, ino: int) -> Inode | None:
        entry = self._lru.get(ino)
        if entry is None:
            return None
        self._lru.move_to_end(ino)
        return entry[1]

    def put(self, ino: int, rec: Inode | None, as_of: int) -> Inode | None:
        """Keep ``rec`` (None: unknown, read it again) unless a newer read is cached; return the newer record."""
        entry = self._lru.get(ino)
        if entry is not None and entry[0] > as_of:
            return entry[1]
        self._lru.pop(ino, None)
        self._lru[ino] = (as_of, rec)
        if len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return rec


async def _nothing_cached(ino: int) -> None:
    """No kernel holds pages of the files (a Transactions without a file system above)."""


class Transactions:
    """The mount's snapshot of the volume, its overlays, and the commit path."""

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
        self.records = RecordCache()
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

    # -- records -----------------------------------------------------------------------
    async def record(self, ino: int) -> Inode | None:
        """The inode as this mount sees it (including uncommitted size and mtime)."""
        fs = self.files.get(ino)
        if fs is not None:
            return fs.live_record()
        rec = self.records.get(ino)
        if rec is None:
            at = self.snapshot
            rec = await self.run(self.volume.read_inode, ino, at)
            if rec is not None:
                rec = self.records.put(ino, rec, at) or rec
        return rec

    async def open_record(self, ino: int) -> tuple[Inode | None, bool]:
        """The record a file opened now starts from (its FileState's), and whether the
        kernel may keep the pages it holds of the file.

        The kernel keeps a file's pages across opens and drops them only in a move
        (coherence/), so they may be older than the store's record: between another
        mount's commit and this mount's move to it (which waits for SQLite's locks on
        this host), or when a lookup read the record as of this mount's own later
        commit. A file opened then with the newer record would write, on the old pages,
        a commit the store takes as based on the new one: a lost update (seen once in
        about 12 runs of three mounts incrementing a counter). So it starts from the
        record of the pages' version, and its writes are refused as stale until the
        move. A file whose view was forgotten (VIEWS_KEPT) starts afresh instead:
        the kernel drops its pages at the open.
        """
        while True:
            fs = self.files.get(ino)
            if fs is not None:
                return fs.live_record(), True
            view = self.views.get(ino)
            rec = await self.record(ino)
            if ino in self.files or self.views.get(ino) != view:
                continue  # opened or moved meanwhile
            if rec is None or view is None or rec.dver == view:
                return rec, view is not None
            old = await self.run(self.volume.read_inode, ino, view)  # dver is a version
            if ino in self.files or self.views.get(ino) != view:
                continue
            return (old, True) if old is not None and old.dver == view else (rec, False)

    def _view(self, ino: int, dver: int) -> None:
        self.views[ino] = dver
        self.views.move_to_end(ino)
        if len(self.views) > VIEWS_KEPT:
            self.views.popitem(last=False)

    async def lookup(self, parent: int, name: bytes) -> tuple[int, Inode] | None:
        at = self.snapshot
        found = await self.run(self.volume.lookup, parent, name, at)
        if found is None:
            return None
        ino, rec = found
        fs = self.files.get(ino)
        if fs is not None:
            return ino, fs.live_record()
        return ino, self.records.put(ino, rec, at) or rec

    async def list_dir(self, parent: int) -> list[tuple[bytes, int, Inode]]:
        entries = await self.run(self.volume.list_dir, parent, self.snapshot)
        out = []
        for name, ino, rec in entries:
            fs = self.files.get(ino)
            out.append((name, ino, fs.live_record() if fs else rec))
        return out

    async def commit_changes(self, changes: ChangeSet) -> int:
        """Commit metadata changes (entries, records) as one version."""
        result = await self.run(self.volume.commit, changes)
        self._committed(result)
        return result.version

    def _committed(self, result: CommitResult) -> None:
        self.snapshot = max(self.snapshot, result.version)
        for ino, rec in result.records.items():
            self.records.put(ino, rec, result.version)
            fs = self.files.get(ino)
            if fs is None or rec is None:
                continue
            if rec.dver == result.version:  # its data, committed here
                fs.record = rec
                self._view(ino, rec.dver)
            else:  # attributes only, merged onto the store's data fields: this view keeps its own
                fs.record = rec.with_data_of(fs.record)

    async def refresh(self, ino: int) -> Inode | None:
        """Another mount committed ``ino``: read it again as of the snapshot.

        The caller holds SQLite's locks on the file (coherence/), so no local
        transaction sees the change half-way.
        """
        at = self.snapshot
        rec = await self.run(self.volume.read_inode, ino, at)
        self.cache.drop_inode(ino)
        fs = self.files.get(ino)
        if fs is not None:
            fs.gen += 1
            if rec is not None and not fs.changed:  # local uncommitted writes will fail as stale
                fs.record = rec
                fs.size, fs.mtime_ns = rec.size, rec.mtime_ns
                self.behind.discard(ino)
            elif rec is not None:
                self.behind.add(ino)  # moved again once those fail (Coherence.reverted)
        self.records.put(ino, rec, at)
        current = fs.record if fs is not None else rec
        if current is None:
            self.views.pop(ino, None)
        else:
            self._view(ino, current.dver)  # the caller makes the kernel's pages that version
        return rec

    # -- file data ---------------------------------------------------------------------
    def state(self, ino: int, rec: Inode, label: str) -> FileState:
        fs = self.files.get(ino)
        if fs is None:
            fs = self.files[ino] = FileState(ino, rec, label)
            self._view(ino, rec.dver)  # the kernel holds pages of it from now on
        return fs

    def forget_state(self, fs: FileState) -> None:
        """Drop a FileState that has no opens and nothing uncommitted."""
        if fs.opens == 0 and not fs.changed and not fs.committing and self.files.get(fs.ino) is fs:
            del self.files[fs.ino]

    async def blocks(self, fs: FileState, block_nos: Iterable[int]) -> dict[int, bytes | bytearray]:
        """Current content of blocks (overlay, then cache, then store at the snapshot).

        Blocks come from the store in a worker thread while commits and stagings
        go on; when one of those changed the file's cached blocks meanwhile, the
        loaded content may be older than theirs, so the blocks are looked up again.
        """
        out: dict[int, bytes | bytearray] = {}
        wanted = list(block_nos)
        for _ in range(3):
            missing = self._known(fs, wanted, out)
            if not missing:
                break
            loaded, settled = await self._fetch(fs, missing)
            for b, data in loaded.items():
                current = fs.dirty.get(b)
                if current is None:
                    current = fs.committing.get(b)
                out[b] = data if current is None else current
            if settled:
                break
            wanted = missing
        return out

    def _known(self, fs: FileState, block_nos: Iterable[int], out: dict[int, bytes | bytearray]) -> list[int]:
        """Put the blocks known without the store into ``out``; return the others."""
        missing = []
        hwm = max(fs.record.hwm, fs.staged_hwm)
        dirty, committing, cache, ino = fs.dirty, fs.committing, self.cache, fs.ino
        for b in block_nos:
            data = dirty.get(b)
            if data is None:
                data = committing.get(b)
            if data is None:
                data = cache.get(ino, b)
            if data is None:
                if b >= hwm:
                    data = self.zero_block
                else:
                    missing.append(b)
                    continue
            out[b] = data
        return missing

    async def _fetch(self, fs: FileState, missing: list[int]) -> tuple[dict[int, bytes], bool]:
        """Committed content of ``missing``, and whether no commit or staging changed
        the file's blocks while it was loaded."""
        gen, mark = fs.gen, self.cache.mark()
        loaded = await self.run(self._load, fs.ino, fs.label, missing, fs.read_version)
        if gen == fs.gen:
            for b, data in loaded.items():
                self.cache.fill(fs.ino, b, data, mark)
        return loaded, self.cache.unchanged_since(fs.ino, mark)

    def _load(self, ino: int, label: str, block_nos: list[int], version: int) -> dict[int, bytes]:
        values = self.volume.read_blocks(ino, block_nos, version)
        out = {}
        for b in block_nos:
            value = values.get(b)
            if value is None:
                out[b] = self.zero_block
                continue
            try:
                out[b] = bytes(decode_block(value, ino, b, self.bs))
            except CorruptBlock as e:
                log.error("event=block_corrupt path=%s ino=%d block=%d version<=%d cause=%s", label, ino, b, version, e)
                raise BlockCorrupt(f"{label}: block {b} failed its checksum") from None
        return out

    async def read(self, fs: FileState, offset: int, length: int) -> bytes | memoryview:
        end = min(offset + length, fs.size)
        if offset >= end:
            return b""
        bs = self.bs
        first, last = offset // bs, (end - 1) // bs
        self.readahead.note_read(fs, first, last, bs)
        ahead = await self.readahead.read(fs, offset, end, bs)
        if ahead is not None:
            return ahead
        content = await self.blocks(fs, range(first, last + 1))
        if first == last:
            return bytes(content[first][offset - first * bs : end - first * bs])
        # one copy: only the partial first and last blocks are sliced
        return b"".join([
            content[first][offset - first * bs :],
            *(content[b] for b in range(first + 1, last)),
            content[last][: end - last * bs],
        ])

    async def write(self, fs: FileState, offset: int, data: bytes) -> None:
        if not data:
            return
        self.written_bytes += len(data)
        if offset > fs.size:
            await self._grow(fs, offset)
        bs = self.bs
        end = offset + len(data)
        first, last = offset // bs, (end - 1) // bs
        partial_blocks = [b for b in (first, last) if max(offset, b * bs) > b * bs or min(end, (b + 1) * bs) < (b + 1) * bs]
        bases = await self.blocks(fs, dict.fromkeys(partial_blocks)) if partial_blocks else {}
        view = memoryview(data)
        for b in range(first, last + 1):
            lo, hi = max(offset, b * bs), min(end, (b + 1) * bs)
            chunk = view[lo - offset : hi - offset]
            if hi - lo == bs:
                fs.dirty[b] = bytes(chunk)
            else:
                block = fs.dirty.get(b)
                if not isinstance(block, bytearray):
                    block = bytearray(bases[b] if block is None else block)
                block[lo - b * bs : hi - b * bs] = chunk
                fs.dirty[b] = block
        fs.size = max(fs.size, end)
        # The mtime moves at the commit, not here: one new mtime per commit, not per
        # write. Where libfuse's auto_inval_data is still on (fuse_caps.py), the
        # kernel drops a file's whole page cache whenever a getattr shows a new
        # mtime, and it asks for the attributes after every write. Every write
        # passes through this mount's kernel, so its page cache is right; other
        # mounts' commits invalidate it explicitly (coherence/).
        fs.modified = True

    async def truncate(self, fs: FileState, size: int) -> None:
        if size > fs.size:
            await self._grow(fs, size)
        elif size < fs.size:
            keep = -(-size // self.bs)
            for b in [b for b in fs.dirty if b >= keep]:
                del fs.dirty[b]
            fs.size = size
        fs.modified = True  # mtime moves at the commit, as for write

    async def _grow(self, fs: FileState, size: int) -> None:
        """Extend to ``size``, zeroing what earlier, longer versions left beyond the old end."""
        bs, old = self.bs, fs.size
        if old % bs:
            b = old // bs
            block = bytearray((await self.blocks(fs, [b]))[b])
            block[old % bs :] = bytes(bs - old % bs)
            fs.dirty[b] = block
        stale_end = max([fs.record.hwm, fs.staged_hwm, *(b + 1 for b in fs.dirty), *(b + 1 for b in fs.committing)])
        for b in range(-(-old // bs), min(-(-size // bs), stale_end)):
            fs.dirty[b] = self.zero_block
        fs.size = size

    async def commit(self, fs: FileState, reason: str) -> None:
        """Publish ``fs``'s overlay (and staging) as one new version; on failure revert it and raise."""
        await self.commit_many([fs], reason)

    async def commit_many(
        self, files: list[FileState], reason: str, release: Iterable[int] = (), keep: Iterable[int] = ()
    ) -> None:
        """Publish several files' overlays in one store transaction (ATTACHed databases).

        On failure every one of them reverts to its last committed state. This
        mount's write leases on ``release`` end with the commit; those on ``keep``
        must still be this mount's, and stay so, idle (Volume.commit).
        """
        release, keep = tuple(release), tuple(keep)
        async with AsyncExitStack() as stack:
            for fs in sorted(files, key=lambda f: f.ino):  # one lock order: no deadlock
                await stack.enter_async_context(fs.commit_lock)
            files = [fs for fs in files if fs.changed]
            if not files:
                if release or keep:
                    self._committed(await self.run(self.volume.commit, ChangeSet(), None, release, keep))
                return
            changes = ChangeSet()
            data: dict[int, DataCommit] = {}
            mtimes: dict[int, tuple[int, int]] = {}  # ino -> (mtime before, mtime committed)
            for fs in files:
                # a big overlay is staged first, so that the publishing transaction stays small
                while len(fs.dirty) * self.bs > self.stage_chunk:
                    await self._stage_chunk(fs)
                dirty, fs.dirty = fs.dirty, {}
                fs.committing = dirty
                hwm = max([fs.record.hwm, fs.staged_hwm, *(b + 1 for b in dirty)])
                mtime = time.time_ns() if fs.modified else fs.mtime_ns
                mtimes[fs.ino] = (fs.mtime_ns, mtime)
                fs.modified = False  # writes from now on move it again at the next commit
                changes.inodes[fs.ino] = fs.record.with_(size=fs.size, mtime_ns=mtime, ctime_ns=mtime, hwm=hwm)
                for b, block in dirty.items():
                    changes.blocks[(fs.ino, b)] = block  # encoded off the event loop
                data[fs.ino] = DataCommit(based_on=fs.record.dver, staging=fs.staging)
            started = time.monotonic()
            try:
                result = await self._publish(changes, data, release, keep)
            except StoreError as e:
                self.commits[commit_outcome(e)] += 1
                for fs in files:
                    await self._failed(fs, reason, len(fs.committing), e)
                raise
            elapsed = time.monotonic() - started
            self.commits["ok"] += 1
            self.commit_seconds.observe(elapsed)
            self.committed_bytes += len(changes.blocks) * self.bs
            for fs in files:
                for b, block in fs.committing.items():
                    self.cache.put(fs.ino, b, bytes(block))
                fs.committing = {}
                before, mtime = mtimes[fs.ino]
                if fs.mtime_ns == before:  # not set explicitly (utime) meanwhile
                    fs.mtime_ns = mtime
                fs.staging, fs.staged_hwm = None, 0
                fs.gen += 1
            self._committed(result)
            log.debug(
                "event=commit paths=%s reason=%s version=%d blocks=%d ms=%.1f",
                ",".join(fs.label for fs in files), reason, result.version, len(changes.blocks), elapsed * 1000,
            )

    async def _publish(
        self, changes: ChangeSet, data: dict[int, DataCommit], release: tuple[int, ...], keep: tuple[int, ...]
    ) -> CommitResult:
        for attempt in (1, 2):
            try:
                return await self._commit_once(changes, data, release, keep)
            except StagingConflict as e:
                if attempt == 2 or not await self.reclaim_staging(e.ino, e.version, e.owner, e.heartbeat):
                    raise
        raise AssertionError("unreachable")

    async def _commit_once(
        self, changes: ChangeSet, data: dict[int, DataCommit], release: tuple[int, ...], keep: tuple[int, ...]
    ) -> CommitResult:
        """One commit: on the event loop if allowed and the store is free, else on a worker thread."""
        # not a big transaction's: publishing its staging clears every staged block's key
        small = len(changes.blocks) <= INLINE_MAX_BLOCKS and all(dc.staging is None for dc in data.values())
        if self.inline_commits and small:
            try:
                return self._encode_and_commit(changes, data, release, keep, nowait=True)
            except ConflictError as e:  # another writer holds the store: wait for it off the loop
                log.debug("event=commit_inline_busy cause=%s", e)
        return await self.run(self._encode_and_commit, changes, data, release, keep)

    def _encode_and_commit(
        self,
        changes: ChangeSet,
        data: dict[int, DataCommit],
        release: tuple[int, ...],
        keep: tuple[int, ...],
        nowait: bool = False,
    ) -> CommitResult:
        blocks: dict[tuple[int, int], bytes | bytearray] = {
            (ino, b): encode_block(bytes(block), ino, b) for (ino, b), block in changes.blocks.items()
        }
        return self.volume.commit(
            ChangeSet(inodes=changes.inodes, dirents=changes.dirents, blocks=blocks), data, release, keep, nowait=nowait
        )

    async def stage(self, fs: FileState) -> None:
        """Move the overlay into the store, unpublished, until it fits the memory budget."""
        async with fs.commit_lock:
            while len(fs.dirty) * self.bs > self.stage_chunk:
                await self._stage_chunk(fs)

    async def _stage_chunk(self, fs: FileState) -> None:
        chunk = self.stage_chunk // self.bs
        picked = sorted(fs.dirty)[:chunk]
        blocks = {b: fs.dirty.pop(b) for b in picked}
        fs.committing = blocks
        try:
            if fs.staging is None:
                fs.staging = await self.run(self.volume.begin_staging, fs.ino, self.mount_id)
            await self.run(self._stage_blocks, fs.ino, fs.staging, blocks)
        except StoreError as e:
            await self._failed(fs, "stage", len(blocks), e)
            raise
        for b, block in blocks.items():
            self.cache.put(fs.ino, b, bytes(block))
        fs.committing = {}
        fs.staged_hwm = max(fs.staged_hwm, picked[-1] + 1)
        self.staged_bytes += len(blocks) * self.bs
        log.debug("event=staged path=%s ino=%d version=%d blocks=%d", fs.label, fs.ino, fs.staging, len(blocks))

    def _stage_blocks(self, ino: int, version: int, blocks: dict) -> None:
        encoded = {b: encode_block(bytes(block), ino, b) for b, block in blocks.items()}
        self.volume.stage_blocks(ino, version, encoded, self.mount_id)

    async def _failed(self, fs: FileState, reason: str, blocks: int, e: StoreError) -> None:
        log.error(
            "event=commit_failed path=%s ino=%d reason=%s blocks=%d cause=%s: %s",
            fs.label, fs.ino, reason, blocks, type(e).__name__, e,
        )
        await self.rollback(fs)

    async def rollback(self, fs: FileState) -> None:
        """Forget everything uncommitted of ``fs``: it reads as last committed again."""
        staging = fs.staging
        fs.dirty = {}
        fs.committing = {}
        fs.staging, fs.staged_hwm = None, 0
        fs.size = fs.record.size
        fs.mtime_ns = fs.record.mtime_ns
        fs.modified = False
        fs.gen += 1
        self.cache.drop_inode(fs.ino)
        await self.on_rollback(fs.ino)
        if staging is not None:
            try:
                removed = await self.run(self.volume.cleanup_staging, fs.ino, staging)
                log.info("event=staging_removed path=%s ino=%d version=%d blocks=%d", fs.label, fs.ino, staging, removed)
            except StoreError as e:  # left for the next mount or `fusesqlite gc`
                log.warning("event=staging_left ino=%d version=%d cause=%s", fs.ino, staging, e)

    async def reclaim_staging(self, ino: int, version: int, owner: str, heartbeat: float) -> bool:
        """Remove another mount's staging if that mount is gone; say whether it was."""
        if not staging_abandoned(owner, heartbeat, self.mount_id):
            return False
        removed = await self.run(self.volume.cleanup_staging, ino, version)
        log.info("event=staging_reclaimed ino=%d version=%d owner=%s blocks=%d", ino, version, owner, removed)
        return True
