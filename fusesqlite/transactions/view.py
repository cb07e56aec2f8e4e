"""The mount's view of the volume: its snapshot, inode records as of it, and the data
version of the pages the kernel holds of each file (moved only by a move)."""
from __future__ import annotations

from functools import partial

from fusesqlite.inodes import Inode
from fusesqlite.transactions.base import RECORD_READS, VIEWS_KEPT, TransactionsBase
from fusesqlite.volume import (
    ChangeSet,
    CommitResult,
)


class MountView(TransactionsBase):
    """Records and directory listings as of the snapshot, and what the kernel holds."""

    # -- records -----------------------------------------------------------------------
    async def record(self, ino: int) -> Inode | None:
        """The inode as this mount sees it (including uncommitted size and mtime).

        A read that another mount's commit of ``ino`` overtook (the follower applied
        it while the read ran: its entry in ``records`` is newer, and empty until the
        move refreshes it) is read again as of the new snapshot. Its older record
        would reach the kernel: a lookup's answer makes a new inode of it, and with
        the writeback cache the kernel keeps that inode's size (say 0, before
        another mount's first transaction) whatever getattr says later, while the
        move's invalidation may have reached the kernel before that answer.
        """
        rec = None
        for _ in range(RECORD_READS):
            fs = self.files.get(ino)
            if fs is not None:
                return fs.live_record()
            cached = self.records.get(ino)
            if cached is not None:
                return cached
            at = self.snapshot
            rec = await self.run(self.volume.read_inode, ino, at)
            if not self.records.newer(ino, at):
                if rec is not None:
                    self.records.put(ino, rec, at)
                return rec
        return rec  # overtaken every time (another mount commits it flat out): the newest read

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
        found, at = await self.run(partial(self.volume.lookup_current, exact=self.frozen), parent, name, self.snapshot)
        self.on_learned(parent, at)  # the kernel keeps the answer, absent or present
        if found is None:
            return None
        ino, rec = found
        fs = self.files.get(ino)
        if fs is not None:
            return ino, fs.live_record()
        if self.records.newer(ino, at):
            # another mount's commit of it arrived meanwhile: its record as of now, not
            # the older one the kernel would make a new inode of (``record``)
            newer = await self.record(ino)
            return None if newer is None else (ino, newer)
        return ino, self.records.put(ino, rec, at) or rec

    async def list_dir(self, parent: int) -> list[tuple[bytes, int, Inode]]:
        entries, at = await self.run(partial(self.volume.list_dir_current, exact=self.frozen), parent, self.snapshot)
        self.on_learned(parent, at)
        out = []
        for name, ino, rec in entries:
            self.on_learned(ino, at)  # the kernel makes inodes of a listing (readdirplus)
            fs = self.files.get(ino)
            if fs is not None:
                out.append((name, ino, fs.live_record()))
            elif self.records.newer(ino, at):  # the kernel makes inodes of a listing too (readdirplus)
                newer = await self.record(ino)
                if newer is not None:
                    out.append((name, ino, newer))
            else:
                out.append((name, ino, rec))
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
