"""What the parts of a mount's coherence share: its state of other mounts and their
leases, SQLite's lock bytes, the timings."""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import trio

from fusesqlite.inodes import Inode
from fusesqlite.own_mount import Handle, OwnMount, Ranges
from fusesqlite.transactions import Transactions
from fusesqlite.volume import (
    WalKey,
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
#: a mount holding more files and directories than this follows the whole volume
#: (``mount --watch-limit``): one watch each costs more than reading the log then
WATCH_LIMIT = 100
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
    #: the move under way: when it began (0: none), its step now, and whether a slow
    #: one was logged (``LockProxy.report_slow_moves``)
    move_started: float = 0.0
    move_step: str = ""
    move_reported: bool = False

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

    def known_inodes(self) -> Collection[int]:
        """The inodes the kernel may hold (entries, attributes, pages) of this mount."""
        ...


class CoherenceBase:
    """The state every part of a mount's coherence shares (built once, by ``Coherence``)."""

    def __init__(
        self, tx: Transactions, kernel: KernelView, own_mount: OwnMount, lease_ttl: float, follow: bool = True,
        watch_limit: int = WATCH_LIMIT,
    ) -> None:
        self.tx = tx
        self.kernel = kernel
        #: False for a mount of a past version (``mount --at``): it never moves, and
        #: other mounts' leases and WAL sessions are nothing to it (it reads frozen files)
        self.follow = follow
        self.own_mount = own_mount  # opens and locks this mount's files: never the daemon itself
        self.volume = volume = tx.volume
        self.me = volume.author
        self.lease_ttl = lease_ttl
        self.seen = tx.snapshot
        #: most files and directories this mount follows one by one (0: always the whole volume)
        self.watch_limit = watch_limit
        #: what the follower followed one by one up to ``seen`` (None: the whole volume)
        self.watched: frozenset[int] | None = frozenset()
        #: inodes read since, not in ``watched``: the oldest version each was read as of
        self._learned: dict[int, int] = {}
        #: times the follower read the log (metrics.py): each other mount's commit of what
        #: this mount holds, or of anything when it follows the whole volume
        self.log_reads = 0
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
