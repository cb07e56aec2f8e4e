"""The lock proxy: SQLite's locks taken on this host's own files, standing in for
another mount's writer (RESERVED) and for moves of a file to another mount's commit
(EXCLUSIVE), by the own-mount helper process (own_mount.py)."""
from __future__ import annotations

import errno
import logging
import math
import time

import trio

from fusesqlite.coherence.base import (
    EXCLUSIVE,
    PROXY_RETRY_SECONDS,
    RESERVED,
    WATCH_LIMIT,
    CoherenceBase,
    KernelView,
    Proxy,
    log,
)
from fusesqlite.own_mount import OwnMount, Ranges
from fusesqlite.transactions import Transactions

#: a move that took longer than this is logged at INFO (local transactions held it up)
SLOW_MOVE_SECONDS = 1.0


class LockProxy(CoherenceBase):
    """SQLite's locks on this host for other mounts: RESERVED while another mount holds a
    write lease, EXCLUSIVE for a move (coherence/__init__.py says why)."""

    def __init__(
        self, tx: Transactions, kernel: KernelView, own_mount: OwnMount, lease_ttl: float, follow: bool = True,
        watch_limit: int = WATCH_LIMIT,
    ) -> None:
        super().__init__(tx, kernel, own_mount, lease_ttl, follow, watch_limit)
        own_mount.on_restart.append(self._helper_restarted)  # its files and locks went with it

    def _proxy(self, ino: int) -> Proxy:
        p = self.proxies.get(ino)
        if p is None:
            p = self.proxies[ino] = Proxy()
        return p

    def _kick(self, ino: int, p: Proxy) -> None:
        """Start the proxy's work on ``ino`` if it has any. Not from a cancelled task (the
        mount stopping): the new task, cancelled at once, would start the next on its
        way out, and the loop spun for ever (seen: 1 stop in 5 of two busy mounts hung)."""
        if trio.current_effective_deadline() == -math.inf:
            return
        if (p.move or p.hold() != p.reserved) and not p.running and self.nursery is not None:
            p.running = True
            self.nursery.start_soon(self._work, ino, p)


    def known(self, ino: int) -> None:
        """This mount just learned a path of ``ino``: stand in for a remote writer now."""
        p = self.proxies.get(ino)
        if p is not None:
            self._kick(ino, p)

    # -- the lock proxy --------------------------------------------------------------------
    async def _work(self, ino: int, p: Proxy) -> None:
        """Bring this host's locks and caches of ``ino`` to what the store says, in order."""
        parked = False  # waiting for a local path (`known` starts it again), not busy-retrying
        moving = False
        try:
            while True:
                if p.move:
                    p.move, moving = False, True
                    await self._move(ino, p)
                    moving = False
                elif p.hold() and not p.reserved:
                    p.reserved = await self._lock(ino, p, RESERVED)
                    if not p.reserved:
                        parked = True
                        break
                elif p.reserved and not p.hold():
                    await self._unlock(p, RESERVED)
                    p.reserved = False
                else:
                    break
        except Exception:
            log.exception("event=proxy_failed ino=%d", ino)
            parked = True
            if moving:  # a file left unmoved keeps an old view: try again, not too often
                p.move = True
                await trio.sleep(PROXY_RETRY_SECONDS)
        finally:
            if not p.reserved:
                await self._close(p)  # also drops every lock we held on it
            p.running = False
            if not (p.reserved or p.hold() or p.move):
                self.proxies.pop(ino, None)
            elif p.move or not parked:  # something arrived while it was finishing
                self._kick(ino, p)

    async def _move(self, ino: int, p: Proxy) -> None:
        """Refresh ``ino`` while no local SQLite transaction is reading or writing it.

        The locks are taken in SQLite's own order: RESERVED, PENDING, then the SHARED
        range. Without RESERVED first, the proxy could hold PENDING while waiting for a
        local writer's SHARED lock, and that writer (holding RESERVED) could not get
        PENDING for its commit: a deadlock only SQLite's busy timeout broke (measured:
        both mounts' writers stalled 10 s). With it, the proxy waits for the writer's
        transaction to end first.
        """
        ranges = EXCLUSIVE if p.reserved else (*RESERVED, *EXCLUSIVE)
        started = p.move_started = time.monotonic()
        p.move_step, p.move_reported = "lock", False
        locked = await self._lock(ino, p, ranges)  # one helper round trip for all three
        locked_at = wrote_back_at = time.monotonic()
        fs = None
        try:
            fs = self.tx.files.get(ino)
            if locked and p.fd is not None and fs is not None and fs.opens > 1:
                # SQLite without a journal (journal_mode MEMORY or OFF) and with
                # synchronous=OFF leaves its committed pages dirty in this kernel: they
                # come first, so that the refresh sees them as local changes made on
                # the old version (their commit fails as stale) rather than taking
                # them, once the kernel wrote them back, as made on the new one (a
                # lost update)
                p.move_step = "write_back"
                await self.own_mount.write_back(p.fd)
                wrote_back_at = time.monotonic()
            p.move_step = "refresh"
            rec = await self.tx.refresh(ino)
            p.move_step = "kernel"
            await self.kernel.moved(ino, rec)
        finally:
            p.move_started = 0.0
            if locked:
                await self._unlock(p, ranges[::-1])
        total = time.monotonic() - started
        log.log(
            logging.INFO if total > SLOW_MOVE_SECONDS else logging.DEBUG,
            "event=moved ino=%d locked=%s lock_ms=%.2f write_back_ms=%.2f total_ms=%.2f opens=%d dirty_blocks=%d",
            ino, locked, (locked_at - started) * 1000, (wrote_back_at - locked_at) * 1000,
            total * 1000, fs.opens if fs else 0, len(fs.dirty) if fs else 0,
        )

    def report_slow_moves(self) -> None:
        """Log once each move under way for more than SLOW_MOVE_SECONDS, and its step: a
        move that never ends (local readers holding SQLite's lock, a hung helper)
        would otherwise leave nothing in the log (``event=moved`` comes at its end)."""
        now = time.monotonic()
        for ino, p in self.proxies.items():
            if p.move_started and not p.move_reported and now - p.move_started > SLOW_MOVE_SECONDS:
                p.move_reported = True
                log.info("event=move_waiting ino=%d path=%s seconds=%.1f step=%s", ino,
                         (self.kernel.abs_path(ino) or b"?").decode(errors="replace"), now - p.move_started,
                         p.move_step)

    async def _lock(self, ino: int, p: Proxy, ranges: Ranges) -> bool:
        """Take write locks on SQLite's bytes of ``ino`` on this host, in order (False: no local path)."""
        if p.fd is None:
            path = self.kernel.abs_path(ino)
            if path is None:
                return False  # nobody here knows the file: no local reader to protect
            try:
                p.fd = await self.own_mount.open(path)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
                    log.warning("event=proxy_open_failed ino=%d path=%s cause=%s", ino, path, e)
                return False
            if p.fd is None:
                return False
        await self.own_mount.lock(p.fd, ranges)
        return True

    async def _unlock(self, p: Proxy, ranges: Ranges) -> None:
        if p.fd is not None:
            await self.own_mount.unlock(p.fd, ranges)

    def _helper_restarted(self) -> None:
        """The own-mount helper died, and the proxy's files and locks with it: take them
        again through the new one, and make every move again (one may have failed half-way;
        a file not moved keeps an old view, consistent but stale, until it is)."""
        for ino, p in list(self.proxies.items()):
            p.fd = None
            p.reserved = False
            p.move = True
            self._kick(ino, p)

    async def _close(self, p: Proxy) -> None:
        """Close the proxy's handle, if any (dropping its locks); shielded, so that a
        stopping mount closes it while it still serves."""
        if p.fd is None:
            return
        fd, p.fd = p.fd, None
        with trio.CancelScope(shield=True):
            try:
                await self.own_mount.close(fd)
            except OSError as e:
                log.warning("event=proxy_close_failed cause=%s", e)
