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
from collections import OrderedDict
from functools import partial
from typing import Callable, Iterable, TypeVar

import trio

from fusesqlite.inodes import Inode
from fusesqlite.pages import BlockCache, CorruptBlock, decode_block, encode_block
from fusesqlite.store.base import StoreError
from fusesqlite.volume import ChangeSet, Volume

log = logging.getLogger("fusesqlite.transactions")
T = TypeVar("T")


class BlockCorrupt(StoreError):
    """Raised to the file-system layer when a block fails its checksum (EIO)."""


class FileState:
    """A stored file's state on this mount beyond what is committed."""

    __slots__ = ("ino", "record", "size", "mtime_ns", "dirty", "committing", "opens", "gen", "commit_lock", "label")

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

    @property
    def changed(self) -> bool:
        return bool(self.dirty) or self.size != self.record.size or self.mtime_ns != self.record.mtime_ns

    def live_record(self) -> Inode:
        return self.record.with_(size=self.size, mtime_ns=self.mtime_ns)


class RecordCache:
    """Bounded LRU of committed inode records as of the mount's snapshot."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[int, Inode] = OrderedDict()

    def get(self, ino: int) -> Inode | None:
        rec = self._lru.get(ino)
        if rec is not None:
            self._lru.move_to_end(ino)
        return rec

    def put(self, ino: int, rec: Inode | None) -> None:
        self._lru.pop(ino, None)
        if rec is None:
            return
        self._lru[ino] = rec
        if len(self._lru) > self.capacity:
            self._lru.popitem(last=False)


class Transactions:
    """The mount's snapshot of the volume, its overlays, and the commit path."""

    def __init__(
        self,
        volume: Volume,
        cache_bytes: int,
        on_rollback: Callable[[int], None],
        store_threads: int = 4,
    ) -> None:
        self.volume = volume
        self.bs = volume.block_size
        self.zero_block = bytes(self.bs)
        self.cache = BlockCache(cache_bytes)
        self.records = RecordCache()
        self.files: dict[int, FileState] = {}
        self.snapshot = 0
        self.on_rollback = on_rollback
        self.limiter = trio.CapacityLimiter(store_threads)
        self._inos: Iterable[int] = iter(())

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """A blocking store call, off the event loop (not cancellable: commits finish)."""
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter)

    async def open_volume(self) -> None:
        self.snapshot = await self.run(self.volume.open)
        self.bs = self.volume.block_size
        self.zero_block = bytes(self.bs)

    async def new_ino(self) -> int:
        ino = next(self._inos, None)  # type: ignore[call-overload]
        if ino is None:
            self._inos = iter(await self.run(self.volume.allocate_inodes))
            ino = next(self._inos)  # type: ignore[call-overload]
        return ino

    # -- records -----------------------------------------------------------------------
    async def record(self, ino: int) -> Inode | None:
        """The inode as this mount sees it (including uncommitted size and mtime)."""
        fs = self.files.get(ino)
        if fs is not None:
            return fs.live_record()
        rec = self.records.get(ino)
        if rec is None:
            rec = await self.run(self.volume.read_inode, ino, self.snapshot)
            if rec is not None:
                self.records.put(ino, rec)
        return rec

    async def lookup(self, parent: int, name: bytes) -> tuple[int, Inode] | None:
        found = await self.run(self.volume.lookup, parent, name, self.snapshot)
        if found is None:
            return None
        ino, rec = found
        fs = self.files.get(ino)
        if fs is not None:
            return ino, fs.live_record()
        self.records.put(ino, rec)
        return ino, rec

    async def list_dir(self, parent: int) -> list[tuple[bytes, int, Inode]]:
        entries = await self.run(self.volume.list_dir, parent, self.snapshot)
        out = []
        for name, ino, rec in entries:
            fs = self.files.get(ino)
            out.append((name, ino, fs.live_record() if fs else rec))
        return out

    async def commit_changes(self, changes: ChangeSet) -> int:
        """Commit metadata changes (entries, records) as one version."""
        version = await self.run(self.volume.commit, changes)
        self.snapshot = max(self.snapshot, version)
        for ino, rec in changes.inodes.items():
            self.records.put(ino, rec)
            fs = self.files.get(ino)
            if fs is not None and rec is not None:
                fs.record = rec.with_(size=fs.record.size, mtime_ns=fs.record.mtime_ns, hwm=fs.record.hwm)
        return version

    # -- file data ---------------------------------------------------------------------
    def state(self, ino: int, rec: Inode, label: str) -> FileState:
        fs = self.files.get(ino)
        if fs is None:
            fs = self.files[ino] = FileState(ino, rec, label)
        return fs

    def forget_state(self, fs: FileState) -> None:
        """Drop a FileState that has no opens and nothing uncommitted."""
        if fs.opens == 0 and not fs.changed and not fs.committing and self.files.get(fs.ino) is fs:
            del self.files[fs.ino]
            self.records.put(fs.ino, fs.record)

    async def blocks(self, fs: FileState, block_nos: Iterable[int]) -> dict[int, bytes | bytearray]:
        """Current content of blocks (overlay, then cache, then store at the snapshot)."""
        out: dict[int, bytes | bytearray] = {}
        missing = []
        hwm = fs.record.hwm
        for b in block_nos:
            data = fs.dirty.get(b)
            if data is None:
                data = fs.committing.get(b)
            if data is None:
                data = self.cache.get(fs.ino, b)
            if data is None:
                if b >= hwm:
                    data = self.zero_block
                else:
                    missing.append(b)
                    continue
            out[b] = data
        if missing:
            gen = fs.gen
            loaded = await self.run(self._load, fs.ino, fs.label, missing, self.snapshot)
            cache = gen == fs.gen
            for b, data in loaded.items():
                current = fs.dirty.get(b)
                if current is None:
                    current = fs.committing.get(b)
                out[b] = data if current is None else current
                if cache:
                    self.cache.put(fs.ino, b, data)
        return out

    def _load(self, ino: int, label: str, block_nos: list[int], version: int) -> dict[int, bytes]:
        values = self.volume.read_blocks(ino, block_nos, version)
        out = {}
        for b in block_nos:
            value = values.get(b)
            if value is None:
                out[b] = self.zero_block
                continue
            try:
                out[b] = decode_block(value, ino, b, self.bs)
            except CorruptBlock as e:
                log.error("event=block_corrupt path=%s ino=%d block=%d version<=%d cause=%s", label, ino, b, version, e)
                raise BlockCorrupt(f"{label}: block {b} failed its checksum") from None
        return out

    async def read(self, fs: FileState, offset: int, length: int) -> bytes:
        end = min(offset + length, fs.size)
        if offset >= end:
            return b""
        bs = self.bs
        first, last = offset // bs, (end - 1) // bs
        content = await self.blocks(fs, range(first, last + 1))
        if first == last:
            return bytes(content[first][offset - first * bs : end - first * bs])
        data = b"".join(bytes(content[b]) for b in range(first, last + 1))
        return data[offset - first * bs : end - first * bs]

    async def write(self, fs: FileState, offset: int, data: bytes) -> None:
        if not data:
            return
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
        fs.mtime_ns = time.time_ns()

    async def truncate(self, fs: FileState, size: int) -> None:
        if size > fs.size:
            await self._grow(fs, size)
        elif size < fs.size:
            keep = -(-size // self.bs)
            for b in [b for b in fs.dirty if b >= keep]:
                del fs.dirty[b]
            fs.size = size
        fs.mtime_ns = time.time_ns()

    async def _grow(self, fs: FileState, size: int) -> None:
        """Extend to ``size``, zeroing what earlier, longer versions left beyond the old end."""
        bs, old = self.bs, fs.size
        if old % bs:
            b = old // bs
            block = bytearray((await self.blocks(fs, [b]))[b])
            block[old % bs :] = bytes(bs - old % bs)
            fs.dirty[b] = block
        stale_end = max([fs.record.hwm, *(b + 1 for b in fs.dirty), *(b + 1 for b in fs.committing)])
        for b in range(-(-old // bs), min(-(-size // bs), stale_end)):
            fs.dirty[b] = self.zero_block
        fs.size = size

    async def commit(self, fs: FileState, reason: str) -> None:
        """Publish ``fs``'s overlay as one new version; on failure revert it and raise."""
        async with fs.commit_lock:
            if not fs.changed:
                return
            dirty, fs.dirty = fs.dirty, {}
            fs.committing = dirty
            hwm = max([fs.record.hwm, *(b + 1 for b in dirty)])
            record = fs.record.with_(size=fs.size, mtime_ns=fs.mtime_ns, ctime_ns=fs.mtime_ns, hwm=hwm)
            started = time.monotonic()
            try:
                version = await self.run(self._commit_blocks, fs.ino, record, dirty)
            except StoreError as e:
                log.error(
                    "event=commit_failed path=%s ino=%d reason=%s blocks=%d cause=%s: %s",
                    fs.label, fs.ino, reason, len(dirty), type(e).__name__, e,
                )
                self.rollback(fs)
                raise
            for b, data in dirty.items():
                self.cache.put(fs.ino, b, bytes(data))
            fs.committing = {}
            fs.record = record
            fs.gen += 1
            self.records.put(fs.ino, record)
            self.snapshot = max(self.snapshot, version)
            log.debug(
                "event=commit path=%s ino=%d reason=%s version=%d blocks=%d size=%d ms=%.1f",
                fs.label, fs.ino, reason, version, len(dirty), record.size, (time.monotonic() - started) * 1000,
            )

    def _commit_blocks(self, ino: int, record: Inode, dirty: dict[int, bytes | bytearray]) -> int:
        changes = ChangeSet(inodes={ino: record})
        for b, data in dirty.items():
            changes.blocks[(ino, b)] = encode_block(bytes(data), ino, b)
        return self.volume.commit(changes)

    def rollback(self, fs: FileState) -> None:
        """Forget everything uncommitted of ``fs``: it reads as last committed again."""
        fs.dirty = {}
        fs.committing = {}
        fs.size = fs.record.size
        fs.mtime_ns = fs.record.mtime_ns
        fs.gen += 1
        self.cache.drop_inode(fs.ino)
        self.on_rollback(fs.ino)
