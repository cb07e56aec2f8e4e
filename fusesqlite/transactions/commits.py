"""Commits: an overlay (and its staging) published as one store transaction, or
staged ahead when it outgrows its memory share; a failed commit reverts the file."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack

from fusesqlite.file_state import FileState
from fusesqlite.gc import staging_abandoned
from fusesqlite.pages import encode_block
from fusesqlite.store.base import ConflictError, StoreError
from fusesqlite.transactions.base import INLINE_MAX_BLOCKS
from fusesqlite.transactions.overlays import Overlays
from fusesqlite.volume import (
    ChangeSet,
    CommitResult,
    DataCommit,
    EntryChanged,
    LeaseHeld,
    StagingConflict,
    StaleView,
    StaleWrite,
    WalHeld,
)

log = logging.getLogger("fusesqlite.transactions")


def commit_outcome(e: StoreError) -> str:
    """How a failed commit ended, as metrics.py counts it: another writer's commit came
    first (conflict), another mount holds the write lease (busy), or anything else."""
    if isinstance(e, (ConflictError, StaleWrite, StaleView, EntryChanged, StagingConflict)):
        return "conflict"
    if isinstance(e, (LeaseHeld, WalHeld)):
        return "busy"
    return "error"



class Transactions(Overlays):
    """The mount's snapshot of the volume, its overlays, and the commit path."""

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
