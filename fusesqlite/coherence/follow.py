"""Following other mounts' commits: the log since what this mount has seen, applied
to its caches and handed to the lock proxy as moves; other mounts' leases expiring."""
from __future__ import annotations

import time

import trio

from fusesqlite.coherence.base import (
    POLL_TIMEOUT,
    log,
)
from fusesqlite.coherence.leases import Leases
from fusesqlite.identity import dead_here
from fusesqlite.inodes import ROOT_INO
from fusesqlite.store.base import StoreError
from fusesqlite.volume import (
    WANT,
    LogEntry,
)

#: following other mounts' commits later than this is logged at INFO
SLOW_FOLLOW_SECONDS = 1.0


class Following(Leases):
    """This mount's view of the volume, moved along with other mounts' commits.

    It follows one by one the files and directories it holds (``watched``: their
    ``changed`` keys, Volume.changes), and reads the log only when one of them
    changed: other databases' commits cost it nothing on FoundationDB, where a watch
    wakes only its own mount. Holding more than ``watch_limit`` of them it follows
    the whole volume (the head), reading the log at every commit.
    """

    def learned(self, ino: int, as_of: int) -> None:
        """This mount now holds state of ``ino`` read as of version ``as_of`` (a record, a
        directory's entries). Unless already followed, the follower must check that
        nothing changed it since ``as_of``: it may have moved its view past that
        version meanwhile, without reading the log entries of an inode it did not
        hold (``_apply_late``). Following the whole volume, it applies every entry."""
        if not self.follow or self.watched is None or ino in self.watched:
            return
        known = self._learned.get(ino)
        if known is None or as_of < known:
            self._learned[ino] = as_of
        if known is None:
            self.volume.store.wake()  # follow it now, not after the wait under way

    def _holds(self, ino: int) -> bool:
        """Whether this mount holds state of ``ino`` that another mount's commit of it
        makes stale: an open file, the kernel's pages or entries, a cached record or
        blocks. Nothing else needs to move with such a commit."""
        tx = self.tx
        return (ino in tx.files or ino in tx.views or ino in tx.records.held() or ino in tx.cache.inodes()
                or ino in self.kernel.known_inodes())

    def _watch_set(self) -> set[int] | None:
        """Every inode this mount holds state of (``_holds``), or has a write lease on; None
        past ``watch_limit``. Other mounts' leases on files it does not hold are left
        to expire here (``_expire_remote_leases`` asks the store about them)."""
        limit = self.watch_limit
        tx = self.tx
        if not limit or max(len(tx.records.held()), len(tx.cache.inodes()), len(self.kernel.known_inodes())) > limit:
            return None
        inos = {ROOT_INO, *tx.records.held(), *tx.cache.inodes(), *self.kernel.known_inodes(), *tx.files,
                *tx.views, *self.my_leases, *self.idle, *self._learned}
        return inos if len(inos) <= limit else None

    async def _follow(self) -> None:
        while True:
            try:
                olds = await self._follow_once()
                if olds is not None:
                    await trio.to_thread.run_sync(
                        self.volume.store.wait_for_changes, olds, POLL_TIMEOUT, abandon_on_cancel=True)
            except StoreError as e:
                log.warning("event=follow_failed cause=%s", e)
                await trio.sleep(POLL_TIMEOUT)

    async def _follow_once(self) -> dict[bytes, bytes | None] | None:
        """Bring this mount's view up to the store's head; return the keys to wait on
        before the next time, as they were at that head, which its view now is (None:
        it waited for the head itself, following the whole volume)."""
        learned, self._learned = self._learned, {}
        late = {ino: at for ino, at in learned.items() if at < self.seen}
        watched = self._watch_set()
        if watched is None:
            olds = None
            self.watched = None
            head = await self._wait_head()
            if head > self.seen or late:
                await self._follow_to(head, late)
        else:
            since = {ino: min(late.get(ino, self.seen), self.seen) for ino in watched}
            head, olds, entries = await self.tx.run(self.volume.changes, since, self._log_start(late))
            if entries is not None:
                await self._follow_to(head, late, entries)
            else:  # nothing it holds changed: its view is the store's at ``head``
                self._advance(head)
            self.watched = frozenset(watched)
        self._caught_up()
        self.report_slow_moves()
        await self._expire_remote_leases()
        return olds

    def _log_start(self, late: dict[int, int]) -> int:
        """Where the log must be read from: ``seen``, or back to the oldest read of ``late``."""
        return min([self.seen, *late.values()])

    async def _follow_to(self, head: int, late: dict[int, int], read: list[LogEntry] | None = None) -> None:
        """Apply other mounts' log entries up to ``head`` (``read``: those after
        ``_log_start``, read already): every one after ``seen``, and before it those
        naming an inode of ``late`` after the version it was read at."""
        self._behind_since = self._behind_since or time.monotonic()
        # versions are versionstamps, not a count: only the log says whether
        # another mount committed between this mount's own commits
        self.log_reads += 1
        if read is None:
            read = await self.tx.run(self.volume.log_range, self._log_start(late), head)
        entries = [e for e in read if e.author != self.me]
        old = [e for e in entries if e.version <= self.seen]
        others = [e for e in entries if e.version > self.seen]
        if others:
            await self._apply(others, head)
        else:
            self._advance(head)  # this mount's own commits: nothing to apply
        if old:
            self._apply_late(old, late)
        if self.lag() > SLOW_FOLLOW_SECONDS:
            log.info("event=followed_late seconds=%.1f commits=%d", self.lag(), len(others))
        self._behind_since = 0.0

    def _advance(self, head: int) -> None:
        self.seen = max(self.seen, head)
        self.tx.snapshot = max(self.tx.snapshot, head)

    async def _wait_head(self) -> int:
        """The volume's head version, once it differs from what this mount has seen (or after a while)."""
        return await trio.to_thread.run_sync(
            self.volume.wait_for_head, self.seen, POLL_TIMEOUT, abandon_on_cancel=True)

    async def _apply(self, entries: list[LogEntry], head: int) -> None:
        self.epoch += 1
        self._advance(head)
        files: set[int] = set()
        for e in entries:
            if e.author == self.me:
                continue
            for parent, name in e.dirents:
                self.tx.records.put(parent, None, head)
                self.kernel.invalidate_entry(parent, name)
            files.update(e.inodes)
            for ino in e.inodes:
                self._lose(ino)
            for ino, owner, expiry in e.leases:
                if owner.startswith(WANT):
                    # another mount waits: hold local writers back (SQLITE_BUSY) once the
                    # local transaction ends, until it has had the lease or stops waiting
                    self.remote_leases.setdefault(ino, (owner, expiry))
                    self._proxy(ino).want_reserved = True
                elif owner:
                    self._lose(ino)
                    self.remote_leases[ino] = (owner, expiry)
                    self._proxy(ino).want_reserved = True
                else:
                    self.remote_leases.pop(ino, None)
                    self._proxy(ino).want_reserved = False
        for ino in files:
            held = self._holds(ino)
            self.tx.records.put(ino, None, head)  # an open file keeps its own until it moves
            if held:
                self._proxy(ino).move = True
        for ino, p in list(self.proxies.items()):
            self._kick(ino, p)

    def _apply_late(self, entries: list[LogEntry], late: dict[int, int]) -> None:
        """Entries this mount moved its view past while it did not hold ``late``'s inodes,
        which it read (``learned``) as of a version before them: whatever of those
        inodes they changed is read again (records, kernel entries, a move)."""
        self.epoch += 1
        head = self.seen
        for e in entries:
            for parent, name in e.dirents:
                if e.version > late.get(parent, head):
                    self.tx.records.put(parent, None, head)
                    self.kernel.invalidate_entry(parent, name)
            for ino in e.inodes:
                if e.version > late.get(ino, head):
                    held = self._holds(ino)
                    self.tx.records.put(ino, None, head)
                    if held:
                        p = self._proxy(ino)
                        p.move = True
                        self._kick(ino, p)

    def reverted(self, ino: int) -> None:
        """A failed commit reverted ``ino``, which a move found with local changes and
        so left behind (Transactions.behind): move it again, since nothing else would
        bring it to the store's version before another mount's next commit."""
        self._wal_reverted(ino)
        if ino not in self.tx.behind:
            return  # a lone mount's refused commit: nothing to move, no locks to take
        self.tx.behind.discard(ino)
        p = self._proxy(ino)
        p.move = True
        self._kick(ino, p)

    async def _expire_remote_leases(self) -> None:
        now = time.time()
        for ino, (owner, expiry) in list(self.remote_leases.items()):
            if expiry > now and not dead_here(owner):
                continue
            current = await self.tx.run(self.volume.lease, ino)
            if current is not None and current.owner == owner and current.expiry > now and not dead_here(owner):
                self.remote_leases[ino] = (owner, current.expiry)  # renewed by its holder
                continue
            log.info("event=lease_expired ino=%d owner=%s", ino, owner)
            del self.remote_leases[ino]
            p = self._proxy(ino)
            p.want_reserved = False
            self._kick(ino, p)
