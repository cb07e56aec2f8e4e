"""Write leases: taken for a local transaction, kept idle between transactions,
promoted when one runs long, renewed, and lost to another mount."""
from __future__ import annotations

import time
from collections.abc import Iterable

import trio

from fusesqlite.coherence.base import (
    BEHIND_SECONDS,
    PROMOTE_AFTER,
    WANT_SECONDS,
    log,
)
from fusesqlite.coherence.wal_sessions import WalSessions
from fusesqlite.store.base import StoreError
from fusesqlite.volume import (
    LeaseHeld,
    StaleView,
)


class Leases(WalSessions):
    """This mount's write leases on databases, and the local writers they hold back."""

    def holds(self, ino: int) -> bool:
        """Whether a local transaction on ``ino`` may go on writing without asking the store."""
        mode = self.writing.get(ino)
        if mode == "idle":
            return True  # its commit checks that the lease is still this mount's
        expiry = self.my_leases.get(ino)
        return mode == "busy" and expiry is not None and expiry - time.time() > self.lease_ttl / 2

    async def begin_write(self, ino: int, view_dver: int) -> None:
        """A local writer starts a transaction on database ``ino``: make sure this mount has its lease.

        The lease this mount kept idle since its last commit costs nothing; otherwise
        one store transaction takes it (and checks that this mount's view is current).
        """
        if self.holds(ino):
            return
        if ino in self.idle and ino not in self.writing:
            self.writing[ino] = "idle"
            self._txn += 1
            self.txn_of[ino] = self._txn
            self._to_promote.append((trio.current_time() + PROMOTE_AFTER, ino, self._txn, view_dver))
            self._promote_wanted.set()
            return
        try:
            self.my_leases[ino] = await self.tx.run(self.volume.acquire_lease, ino, self.lease_ttl, view_dver)
        except (LeaseHeld, StaleView) as e:
            # this transaction fails (held: another mount writes; stale: it read a version
            # older than another mount's last commit, which this mount has yet to follow).
            # Ask the holder to let the next one through: without it, a mount that
            # follows a busy writer's commits 10 ms late never caught up and never wrote.
            if isinstance(e, StaleView):
                self._hold_until_caught_up(ino, e.head)
            try:
                await self.tx.run(self.volume.want_lease, ino, WANT_SECONDS)
            except StoreError as e:
                log.warning("event=lease_want_failed ino=%d cause=%s", ino, e)
            raise
        self.idle.discard(ino)
        self.writing[ino] = "busy"
        log.debug("event=lease_taken ino=%d", ino)

    def _hold_until_caught_up(self, ino: int, head: int) -> None:
        """Make the local writer's retry wait (SQLITE_BUSY, its busy handler) until this
        mount has followed ``head``: retried at once on the same stale view, it was
        refused again, each time an I/O error for the app (measured: up to 10 in a row
        per lease hand-over between two mounts writing flat out)."""
        if head <= self.seen:
            return
        p = self._proxy(ino)
        p.behind = max(p.behind, head)
        p.behind_deadline = trio.current_time() + BEHIND_SECONDS
        self._kick(ino, p)

    def _caught_up(self) -> None:
        """Let local writers go where this mount has followed far enough (or waited long enough)."""
        now = trio.current_time()
        for ino, p in list(self.proxies.items()):
            if p.behind and (p.behind <= self.seen or now > p.behind_deadline):
                p.behind = 0
                self._kick(ino, p)

    def _still_idle(self, ino: int, txn: int) -> bool:
        return self.txn_of.get(ino) == txn and self.writing.get(ino) == "idle"

    async def _promoter(self) -> None:
        """Promote the transactions on idle leases that run PROMOTE_AFTER. One task and one
        timer for all of them: most end long before, and a task each cost every commit."""
        while True:
            while self._to_promote and not self._still_idle(*self._to_promote[0][1:3]):
                self._to_promote.popleft()  # ended in time, as most do
            if not self._to_promote:
                self._promote_wanted = trio.Event()
                await self._promote_wanted.wait()
                continue
            due, ino, txn, view_dver = self._to_promote[0]
            if due > trio.current_time():
                await trio.sleep_until(due)
                continue
            self._to_promote.popleft()
            assert self.nursery is not None
            self.nursery.start_soon(self._promote, ino, txn, view_dver)

    async def _promote(self, ino: int, txn: int, view_dver: int) -> None:
        """Mark the idle lease of a transaction still running after PROMOTE_AFTER busy."""
        if not self._still_idle(ino, txn):
            return
        done = self.promoting[ino] = trio.Event()
        try:
            expiry = await self.tx.run(self.volume.acquire_lease, ino, self.lease_ttl, view_dver)
            if self.writing.get(ino) == "idle":
                self.my_leases[ino] = expiry
                self.writing[ino] = "busy"
        except (LeaseHeld, StaleView) as e:
            log.info("event=lease_lost ino=%d cause=%s", ino, e)
            self._lose(ino)
        except StoreError as e:
            log.warning("event=lease_promote_failed ino=%d cause=%s", ino, e)
        finally:
            del self.promoting[ino]
            done.set()

    async def promoted(self, ino: int) -> None:
        """Wait for a promotion of ``ino``'s lease in flight (a commit must come after it)."""
        done = self.promoting.get(ino)
        if done is not None:
            await done.wait()

    def end_write(self, ino: int) -> tuple[int, ...]:
        """The leases a commit of ``ino`` must still hold (it fails if one was lost)."""
        self.my_leases.pop(ino, None)
        self.txn_of.pop(ino, None)
        return (ino,) if self.writing.pop(ino, None) is not None else ()

    def kept(self, inos: Iterable[int], ok: bool) -> None:
        """A commit holding ``inos``' leases ended: they stay this mount's, idle, if it succeeded."""
        if ok:
            self.idle.update(inos)
        else:
            self.idle.difference_update(inos)

    def lag(self) -> float:
        """Seconds since a newer head than this mount follows became known (0: caught up)."""
        return time.monotonic() - self._behind_since if self._behind_since else 0.0

    def held(self) -> tuple[int, ...]:
        """Every lease this mount holds, busy or idle (released at unmount)."""
        return tuple(set(self.my_leases) | self.idle)

    def _lose(self, ino: int) -> None:
        """Another mount took ``ino``'s lease or committed it: a local transaction on it fails at commit."""
        self.idle.discard(ino)
        self.my_leases.pop(ino, None)
        if ino in self.writing:
            self.writing[ino] = "lost"

    async def _renew(self) -> None:
        """Renew the busy write leases and the WAL ownerships, in one store transaction."""
        while True:
            await trio.sleep(self.lease_ttl / 3)
            wal = [key for key in self.wal_opens if key not in self.volume.wal_poisoned]
            if self.my_leases or wal:
                held = list(self.my_leases)
                try:
                    lost, lost_wal = await self.tx.run(self.volume.renew_leases, held, self.lease_ttl, wal)
                except StoreError as e:
                    log.warning("event=lease_renew_failed cause=%s", e)
                    continue
                expiry = time.time() + self.lease_ttl
                for ino in held:
                    if ino in lost:
                        self._lose(ino)
                        log.warning("event=lease_lost ino=%d", ino)
                    elif ino in self.my_leases:
                        self.my_leases[ino] = expiry
                for key in lost_wal:
                    if key in self.wal_opens:  # else released meanwhile
                        # expired while this mount could not renew it, and perhaps taken:
                        # another mount may have changed the -wal under this index
                        self.wal_poison(key, repr(key), "its WAL ownership expired")
