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

import errno
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from fusesqlite.identity import dead_here
from fusesqlite.inodes import Inode
from fusesqlite.own_mount import Handle, OwnMount, Ranges
from fusesqlite.store.base import StoreError
from fusesqlite.transactions import Transactions
from fusesqlite.volume import (
    WANT,
    Lease,
    LeaseHeld,
    LogEntry,
    StaleView,
    WalGrant,
    WalHeld,
    WalKey,
    wal_database,
)

log = logging.getLogger("fusesqlite.coherence")

# SQLite's lock bytes (os_unix.c): PENDING, RESERVED, then the SHARED range
PENDING_BYTE = 0x40000000
RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
RESERVED: Ranges = ((RESERVED_BYTE, 1),)
#: SQLite's EXCLUSIVE lock, taken in SQLite's order (RESERVED is held already, or comes first)
EXCLUSIVE: Ranges = ((PENDING_BYTE, 1), (SHARED_FIRST, SHARED_SIZE))

#: how often a mount asks the store whether anything changed
POLL_TIMEOUT = 0.5
#: how long a mount refused a lease holds the holder's next writers back
WANT_SECONDS = 2.0
#: longest a refused write holds this mount's next writers back while it catches up
BEHIND_SECONDS = 1.0
#: a move that failed (the own-mount helper gone, the store unreachable) is tried again after this
PROXY_RETRY_SECONDS = 1.0
#: a transaction started on an idle lease (no store round trip) marks the lease busy
#: once it has run this long, so that only short transactions can lose it to a steal
PROMOTE_AFTER = 0.05


@dataclass
class Proxy:
    """This mount standing in, with SQLite's locks, for another mount's writer."""

    fd: Handle | None = None
    reserved: bool = False  # holding RESERVED now
    want_reserved: bool = False  # another mount holds (or asked for) the write lease
    #: a local write was refused on a stale view: hold local writers back until this
    #: mount has followed the volume to this version (0: not behind)
    behind: int = 0
    behind_deadline: float = 0.0  # trio time: stop holding them back even if following stalls
    move: bool = False  # another mount committed: refresh under EXCLUSIVE
    running: bool = False

    def hold(self) -> bool:
        """Whether local writers should wait (SQLITE_BUSY) rather than start."""
        return self.want_reserved or self.behind > 0


class KernelView(Protocol):
    """What following other mounts needs of the file system above it, whose kernel
    caches must come along (fs/base.py implements it)."""

    def abs_path(self, ino: int) -> bytes | None:
        """Where ``ino`` is on this host, if the mount knows it."""
        ...

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Another mount changed ``name`` in ``parent``: the kernel must look it up again."""
        ...

    async def moved(self, ino: int, rec: Inode | None) -> None:
        """This mount's view of ``ino`` moved to another mount's commit (``rec``)."""
        ...


class Coherence:
    def __init__(
        self, tx: Transactions, kernel: KernelView, own_mount: OwnMount, lease_ttl: float, follow: bool = True,
    ) -> None:
        self.tx = tx
        self.kernel = kernel
        #: False for a mount of a past version (``mount --at``): it never moves, and
        #: other mounts' leases and WAL sessions are nothing to it (it reads frozen files)
        self.follow = follow
        self.own_mount = own_mount  # opens and locks this mount's files: never the daemon itself
        own_mount.on_restart.append(self._helper_restarted)
        self.volume = volume = tx.volume
        self.me = volume.author
        self.lease_ttl = lease_ttl
        self.seen = tx.snapshot
        #: when this mount learned of a newer head it has not followed yet (0: caught up)
        self._behind_since = 0.0
        self.my_leases: dict[int, float] = {}  # ino -> expiry: taken for a transaction, busy in the store
        self.idle: set[int] = set()  # leases this mount keeps between its transactions
        #: databases with a local transaction: on a lease taken for it ("busy"), on the
        #: idle one ("idle"), or on one another mount has taken since ("lost")
        self.writing: dict[int, str] = {}
        self.txn_of: dict[int, int] = {}  # ino -> number of its transaction on an idle lease
        self._txn = 0
        self.promoting: dict[int, trio.Event] = {}
        #: transactions on idle leases, oldest first: (when to promote, ino, txn, view_dver)
        self._to_promote: deque[tuple[float, int, int, int]] = deque()
        self._promote_wanted = trio.Event()
        self.remote_leases: dict[int, tuple[str, float]] = {}
        self.proxies: dict[int, Proxy] = {}
        self.nursery: trio.Nursery | None = None
        #: moves when other mounts' changes arrive: an answer computed across a
        #: move must not be cached by the kernel (it may predate an invalidation)
        self.epoch = 0
        #: databases this mount has in WAL mode (a session): apps' -shm and -wal handles
        #: open here (their WAL ownership in the store is renewed with the write leases)
        self.wal_opens: dict[WalKey, int] = {}
        #: one change of WAL ownership at a time: a release in flight must not clear
        #: the record an open taking it again has just written
        self._wal_lock = trio.Lock()

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

    # -- write leases ------------------------------------------------------------------
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

    # -- WAL ownership (fs/wal.py calls these) -----------------------------------------------
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

    # -- following other mounts ------------------------------------------------------------
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

    def _kick(self, ino: int, p: Proxy) -> None:
        """Start the proxy's work on ``ino`` if it has any. Not from a cancelled task (the
        mount stopping): the new task, cancelled at once, would start the next on its
        way out, and the loop spun for ever (seen: 1 stop in 5 of two busy mounts hung)."""
        if trio.current_effective_deadline() == -math.inf:
            return
        if (p.move or p.hold() != p.reserved) and not p.running and self.nursery is not None:
            p.running = True
            self.nursery.start_soon(self._work, ino, p)

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

    def known(self, ino: int) -> None:
        """This mount just learned a path of ``ino``: stand in for a remote writer now."""
        p = self.proxies.get(ino)
        if p is not None:
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

    def _proxy(self, ino: int) -> Proxy:
        p = self.proxies.get(ino)
        if p is None:
            p = self.proxies[ino] = Proxy()
        return p

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
        started = time.monotonic()
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
                await self.own_mount.write_back(p.fd)
                wrote_back_at = time.monotonic()
            await self.kernel.moved(ino, await self.tx.refresh(ino))
        finally:
            if locked:
                await self._unlock(p, ranges[::-1])
        log.debug(
            "event=moved ino=%d locked=%s lock_ms=%.2f write_back_ms=%.2f total_ms=%.2f opens=%d dirty_blocks=%d",
            ino, locked, (locked_at - started) * 1000, (wrote_back_at - locked_at) * 1000,
            (time.monotonic() - started) * 1000, fs.opens if fs else 0, len(fs.dirty) if fs else 0,
        )

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
