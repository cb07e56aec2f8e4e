"""WAL ownership: one mount at a time has a database in WAL mode; the sessions (apps'
-shm and -wal handles) that rule reads, their hand-over, and the poisoning of an
index that may no longer match the store (fs/wal.py calls these)."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio

from fusesqlite.coherence.base import (
    log,
)
from fusesqlite.coherence.proxy import LockProxy
from fusesqlite.store.base import StoreError
from fusesqlite.volume import (
    Lease,
    WalGrant,
    WalHeld,
    WalKey,
    wal_database,
)


class WalSessions(LockProxy):
    """Which databases this mount has in WAL mode, and their ownership in the store."""

    # The rule itself is checked by every commit, in its own store transaction
    # (Volume._check_wal); here: the sessions (apps' -shm and -wal handles) that rule reads,
    # their hand-over, and the poisoning of an index that may no longer match the store.
    def _wal_refused(self, e: WalHeld, path: str, op: str) -> None:
        log.warning(
            "event=wal_refused path=%s op=%s holder=%s holder_expires_in=%.1f cause=%r",
            path, op, e.holder.owner, e.holder.expiry - time.time(),
            "in WAL mode on another mount (docs/many-mounts.md, 'WAL and several mounts')",
        )

    def wal_poison(self, key: WalKey, path: str, why: str) -> None:
        """This mount's WAL index of ``key`` may no longer match the store's database and
        -wal: refuse every commit of them from here (Volume._check_wal) until a new
        session of it starts here (``index_opened``), whose index SQLite builds from the
        store's files."""
        if key not in self.volume.wal_poisoned:
            self.volume.wal_poisoned.add(key)
            log.error("event=wal_poisoned path=%s cause=%r action=%r", path, why,
                      "its commits on this mount fail until every connection to it here is closed")

    async def index_opened(
        self, key: WalKey, path: str, op: str, current: Callable[[WalGrant], bool],
        reset: Callable[[], Awaitable[None]],
    ) -> None:
        """An app opens a -shm or -wal of database ``key`` here (``op``): SQLite is using
        it in WAL mode. The first such handle starts this mount's session, taking its
        WAL ownership (WalHeld, logged, while another live mount has it); the others
        share it (one WAL index per mount, in -shm or in one process's heap).

        Taking it, this mount must see the database and its -wal exactly as the store
        has them (``current``): the last owner's last commits may not have reached it
        yet, and a WAL index built on an older database with a newer -wal, or the
        reverse, would let this mount's frames replace them. Otherwise WalHeld too
        (the app's retry finds this mount caught up: following takes milliseconds).

        A poisoned session (``wal_poison``) admits no new handle: SQLite would share its
        index. Once its last handle is gone, the next open starts a new one; what the
        poisoned one left uncommitted of the database and -wal is dropped first (``reset``).
        """
        async with self._wal_lock:
            if key in self.volume.wal_poisoned:
                if key in self.wal_opens:
                    log.warning("event=wal_refused path=%s op=%s reason=poisoned", path, op)
                    raise WalHeld(key[0], key[1], Lease(self.me, 0.0, False))
                await reset()
                self.volume.wal_poisoned.discard(key)
                log.info("event=wal_unpoisoned path=%s", path)
            if key not in self.wal_opens:
                try:
                    grant = await self.tx.run(self.volume.acquire_wal, key[0], key[1], self.lease_ttl)
                except WalHeld as e:
                    self._wal_refused(e, path, op)
                    raise
                if not (await self._followed(key, grant) and current(grant)):
                    with trio.CancelScope(shield=True):
                        await self.tx.run(self.volume.release_wal, [key])
                    log.info("event=wal_refused path=%s op=%s reason=view_behind seen=%d last_change=%d",
                             path, op, self.seen, grant.last_change)
                    raise WalHeld(key[0], key[1], Lease(self.me, 0.0, False))
                log.info("event=wal_owned path=%s", path)
                self.volume.wal_mine.add(key)
            self.wal_opens[key] = self.wal_opens.get(key, 0) + 1

    async def _followed(self, key: WalKey, grant: WalGrant) -> bool:
        """Whether this mount has followed every other mount's change to the database and
        its -wal up to ``grant``: the log between what it followed and the last change
        (usually nothing to read: ``seen`` lags this mount's own commits only), and no
        move of either still to run. A move of the -wal is not held back by SQLite's
        locks (SQLite locks the database and -shm, never -wal): run under a WAL index,
        it would write back the index's own frames as changes made on the old version."""
        inos = {ino for _, ino, _ in grant.files if ino is not None}
        for ino in inos:
            p = self.proxies.get(ino)
            if p is not None and (p.move or p.running):
                return False
        if grant.last_change <= self.seen:
            return True
        names = {(key[0], name) for name, _, _ in grant.files}
        for e in await self.tx.run(self.volume.log_range, self.seen, grant.last_change):
            if e.author != self.me and (inos.intersection(e.inodes) or names.intersection(e.dirents)):
                return False
        return True

    async def wal_check(self, key: WalKey, path: str, op: str) -> None:
        """A read-only mount opens a -wal or -shm of ``key``: it writes nothing, so it takes
        no ownership, but is refused (WalHeld, logged) while another live mount has one.
        A mount of a past version reads files no session can change: never refused."""
        if not self.follow:
            return
        holder = await self.tx.run(self.volume.wal_holder, key[0], key[1])
        if holder is not None:
            e = WalHeld(key[0], key[1], holder)
            self._wal_refused(e, path, op)
            raise e

    async def index_closed(
        self, key: WalKey, path: str, publish: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """A -shm or -wal handle of ``key`` was released (or never made): the session's
        last one ends this mount's ownership, after ``publish`` (fs/wal.py commits the
        database and its -wal). That runs while the session still holds its ownership
        and no new handle can join it (``index_opened`` waits for the lock): an app
        opening the database meanwhile would otherwise checkpoint and start the -wal
        over while the commit takes the files, and the store could get the -wal
        started over without the pages checkpointed from it."""
        async with self._wal_lock:
            if key not in self.wal_opens:
                return  # a handle opened before the session (a -wal renamed since)
            left = self.wal_opens[key] - 1
            if left > 0:
                self.wal_opens[key] = left
                return
            if publish is not None:
                await publish()
            self.wal_opens.pop(key, None)
            self.volume.wal_mine.discard(key)
            try:
                with trio.CancelScope(shield=True):
                    await self.tx.run(self.volume.release_wal, [key])
            except StoreError as e:  # it expires (--lease-seconds)
                log.warning("event=wal_release_failed path=%s cause=%s", path, e)
                return
            log.info("event=wal_released path=%s", path)

    def _wal_reverted(self, ino: int) -> None:
        """A failed commit dropped this mount's changes of ``ino``: if it is a database
        or -wal with a WAL index open here, that index may name frames the -wal no longer
        has, or pages the database no longer has (``wal_poison``)."""
        known = self.volume.wal_names(ino)
        fs = self.tx.files.get(ino)
        if known is None or (fs is not None and fs.record.nlink == 0):
            return  # an unlinked file's last close drops its data: nothing was refused
        parent, name = known
        key = (parent, wal_database(name) or name)
        if key in self.wal_opens:
            self.wal_poison(key, fs.label if fs else repr(key), "a commit of the database or its -wal failed")

    async def _release_all_wal(self) -> None:
        """A stopping mount ends its WAL ownerships (its apps' handles die with it)."""
        keys = list(self.wal_opens)
        self.wal_opens.clear()
        self.volume.wal_mine.clear()
        if not keys:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.tx.run(self.volume.release_wal, keys)
            except StoreError as e:
                log.warning("event=wal_release_failed keys=%r cause=%s", keys, e)
