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
from fusesqlite.store.base import StoreError
from fusesqlite.volume import (
    WANT,
    LogEntry,
)

#: following other mounts' commits later than this is logged at INFO
SLOW_FOLLOW_SECONDS = 1.0


class Following(Leases):
    """This mount's view of the volume, moved along with other mounts' commits."""

    async def _follow(self) -> None:
        while True:
            try:
                head = await self._wait_head()
                if head > self.seen:
                    self._behind_since = self._behind_since or time.monotonic()
                    # versions are versionstamps, not a count: only the log says whether
                    # another mount committed between this mount's own commits
                    others = [e for e in await self.tx.run(self.volume.log_range, self.seen, head) if e.author != self.me]
                    if others:
                        await self._apply(others, head)
                    else:
                        self.seen = head  # this mount's own commits: nothing to apply
                    if self.lag() > SLOW_FOLLOW_SECONDS:
                        log.info("event=followed_late seconds=%.1f commits=%d", self.lag(), len(others))
                    self._behind_since = 0.0
                self._caught_up()
                await self._expire_remote_leases()
            except StoreError as e:
                log.warning("event=follow_failed cause=%s", e)
                await trio.sleep(POLL_TIMEOUT)

    async def _wait_head(self) -> int:
        """The volume's head version, once it differs from what this mount has seen (or after a while)."""
        return await trio.to_thread.run_sync(
            self.volume.wait_for_head, self.seen, POLL_TIMEOUT, abandon_on_cancel=True)

    async def _apply(self, entries: list[LogEntry], head: int) -> None:
        self.epoch += 1
        self.seen = head
        self.tx.snapshot = max(self.tx.snapshot, head)
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
            self.tx.records.put(ino, None, head)  # an open file keeps its own until it moves
            self._proxy(ino).move = True
        for ino, p in list(self.proxies.items()):
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
