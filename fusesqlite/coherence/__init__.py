"""Many mounts, one store: write leases, following other mounts' commits, lock proxy.

Each mount follows the volume's log. For a file another mount committed, it moves
its view only while holding SQLite's EXCLUSIVE lock on the file on this host
(RESERVED, PENDING, then the SHARED range: the kernel grants it once local
writers and readers are done, and blocks new ones), so a local read
transaction sees one version from start to end. While another mount holds a
database's write lease, this mount holds SQLite's RESERVED byte on it, so local
writers get SQLITE_BUSY and their busy handler waits. The locks are taken on this
mount's own files (the kernel keeps fcntl locks per host) by a helper process
(own_mount.py), while the event loop serves the requests that causes.
docs/many-mounts.md says why this is correct.
"""
from __future__ import annotations

import trio

from fusesqlite.coherence.base import WATCH_LIMIT, KernelView
from fusesqlite.coherence.follow import Following
from fusesqlite.own_mount import OwnMount
from fusesqlite.transactions import Transactions

__all__ = ["WATCH_LIMIT", "Coherence", "KernelView"]


class Coherence(Following):
    """A mount's dealings with the other mounts of its volume: write leases (leases.py),
    WAL ownership (wal_sessions.py), following their commits (follow.py), and
    SQLite's locks standing in for them (proxy.py)."""

    def __init__(
        self, tx: Transactions, kernel: KernelView, own_mount: OwnMount, lease_ttl: float, follow: bool = True,
        watch_limit: int = WATCH_LIMIT,
    ) -> None:
        super().__init__(tx, kernel, own_mount, lease_ttl, follow, watch_limit)
        tx.on_learned = self.learned  # every read of state this mount then holds
        tx.frozen = not follow

    async def run(self) -> None:
        if not self.follow:
            await trio.sleep_forever()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._follow)
                nursery.start_soon(self._promoter)
                nursery.start_soon(self._renew)
        finally:
            # a commit that fails at unmount reverts its file (``reverted``): with the
            # nursery closed, its move must not be started (it raised, and the mount
            # exited with status 1)
            self.nursery = None
            # the files the proxy still holds (for other mounts' writers) are on this
            # mount: closed while it serves, or its unmount would find them busy
            for p in self.proxies.values():
                await self._close(p)
            await self._release_all_wal()
