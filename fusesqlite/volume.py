"""A volume's reads at a version and its commits, as blocking store transactions.

Everything here runs off the event loop (in worker threads): it is the only code
that turns file-system state into store keys, so the commit path is in one place.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fusesqlite.identity import dead_here
from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import ALL_VERSIONS, STAMPED, Keyspace, pack, stamped_version, unpack
from fusesqlite.store.base import (
    STAMP_BYTES,
    CommitUnknownResult,
    RangeRead,
    Stamp,
    Store,
    StoreError,
    Transaction,
)

log = logging.getLogger("fusesqlite.volume")

#: the volume layout this code reads and writes (keyspace.py); ``upgrade`` moves an
#: older volume to it
FORMAT = 3
#: the layouts ``upgrade`` moves from: format 2 numbers versions from a counter every
#: commit reads (its versions stay valid: every stamped one is greater); format 1
#: also lacks the current directory entries ('cd' keys)
UPGRADABLE = (1, 2)
#: an inode record's data version when it is the version of the record itself: a data
#: commit's versionstamp goes into the record's key, and a store puts a commit's stamp
#: into the key or the value of a write, not both (``Volume._record`` resolves it)
THIS_VERSION = 1 << 79
DEFAULT_BLOCK_SIZE = 4096
INO_BATCH = 1024
#: how long a transaction that writes a version is called again while the store gives
#: up with its result unknown (CommitUnknownResult; each call first looks for what an
#: earlier attempt committed: ``Attempts``). The app's request waits meanwhile: a
#: failure reported for a commit that landed would be a lie, and a cluster that cannot
#: say for this long is down
RESOLVE_SECONDS = 60.0
#: a call key (``Attempts``) older than this belongs to a call long settled or given
#: up (a store call gives up within seconds): gc removes it
CALL_KEEP_SECONDS = 3600.0

R = TypeVar("R")


def _value(rows: list[tuple[bytes, bytes]]) -> bytes | None:
    """The value of a ``RangeRead.key`` or ``RangeRead.last`` read (None: nothing there)."""
    return rows[0][1] if rows else None


class VolumeFormatError(ValueError):
    """The volume's layout is not the one this code reads (``FORMAT``)."""


class VolumeNotFound(ValueError):
    """A command that reads a volume found none of that name in the store."""


class VolumeExists(ValueError):
    """A clone named a volume that exists."""


@dataclass
class BlockRows:
    """A run of blocks as read from the store, still encoded (``Volume.read_run``)."""

    #: (key, value) of every version of the run's first blocks, in key order; each key
    #: is ``prefix_len`` bytes of block prefix, then the tuple (block_no, version)
    rows: list[tuple[bytes, bytes]]
    prefix_len: int
    #: ``rows`` settle the blocks below this one (above: ``rest``)
    settled_end: int
    #: encoded values of the blocks from ``settled_end`` on (absent: a hole)
    rest: dict[int, bytes]

    def values(self, version: int) -> dict[int, bytes]:
        """Encoded value of each block present, as of ``version``."""
        found = dict(self.rest)
        pick_versions(self.rows, self.prefix_len, self.settled_end, version, found)
        return found


def pick_versions(rows: list[tuple[bytes, bytes]], prefix_len: int, settled_end: int, version: int,
                  found: dict[int, bytes]) -> None:
    """Per block below ``settled_end``, the value of its last row at a version <= ``version``."""
    int_pair = Keyspace.int_pair
    for key, value in rows:
        block_no, ver = int_pair(key[prefix_len:])
        if block_no >= settled_end:
            break
        if ver <= version:  # rows come oldest version first: the last one wins
            found[block_no] = value


@dataclass
class ChangeSet:
    """Everything one commit writes; applied atomically as one new version."""

    inodes: dict[int, Inode | None] = field(default_factory=dict)
    dirents: dict[tuple[int, bytes], int | None] = field(default_factory=dict)
    #: (ino, block_no) -> encoded block value (pages.encode_block)
    blocks: dict[tuple[int, int], bytes | bytearray] = field(default_factory=dict)
    #: what each changed entry must still be in the store (another mount may have
    #: changed it since this mount looked): its inode number, or None for "absent"
    expect: dict[tuple[int, bytes], int | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inodes or self.dirents or self.blocks)

    def touched(self) -> list[int]:
        return sorted(set(self.inodes) | {ino for ino, _ in self.blocks})


@dataclass(frozen=True)
class LogEntry:
    """What one version changed, for other mounts to follow (and, later, time travel)."""

    version: int
    author: str
    inodes: tuple[int, ...] = ()
    dirents: tuple[tuple[int, bytes], ...] = ()
    #: (ino, owner, expiry): a write lease taken (owner set) or released (owner "")
    leases: tuple[tuple[int, str, float], ...] = ()
    #: when it was committed, by the committing host's clock (time.time())
    time: float = 0.0

    def named(self) -> set[int]:
        """Every inode whose state it changes for a mount holding it: files and directories
        it wrote, the directories of the entries it changed, the files of its lease events."""
        return {*self.inodes, *(parent for parent, _ in self.dirents), *(ino for ino, _, _ in self.leases)}


#: prefix of a lease event's owner that means "waiting for it", not "holding it"
WANT = "?"


class LeaseHeld(StoreError):
    """Another mount is writing the database (its write lease has not expired)."""

    errno = errno.EBUSY


class LeaseLost(StoreError):
    """Another mount took this mount's idle write lease while a local transaction ran on it."""

    errno = errno.EBUSY


@dataclass(frozen=True)
class Lease:
    """A database's write lease as stored. An idle lease stays with the mount that
    last wrote, so that its next transaction needs no store round trip; any other
    mount may take it at once (docs/many-mounts.md)."""

    owner: str
    expiry: float
    busy: bool

    @classmethod
    def unpack(cls, value: bytes) -> Lease:
        owner, expiry, *busy = unpack(value)
        return cls(owner, expiry, bool(busy[0]) if busy else True)

    def live(self, now: float) -> bool:
        """Whether its owner still holds it: not expired, and not a mount of this host whose process is gone."""
        return self.expiry > now and not dead_here(self.owner)

    def pack(self) -> bytes:
        return pack((self.owner, self.expiry, self.busy))


class WalHeld(StoreError):
    """Another live mount has the database in WAL mode (its WAL index, -shm, is in that
    mount's memory only: a second mount with its own would lose commits)."""

    errno = errno.EBUSY

    def __init__(self, parent: int, name: bytes, holder: Lease) -> None:
        super().__init__(f"{name!r} in directory {parent} is in WAL mode on mount {holder.owner}")
        self.holder = holder


class WalLost(StoreError):
    """This mount's WAL index of the database may no longer describe the store's files:
    its WAL record is gone (expired and taken), or a commit of the database or its
    -wal failed here. Commits of either from this mount are refused until its apps
    have closed them (docs/many-mounts.md, "WAL and several mounts")."""

    errno = errno.EIO

    def __init__(self, parent: int, name: bytes, why: str) -> None:
        super().__init__(f"{name!r} in directory {parent}: {why}; close the database and open it again")


#: a database named by its directory entry: (directory inode, name)
WalKey = tuple[int, bytes]
WAL_SUFFIX = b"-wal"


def wal_database(name: bytes) -> bytes | None:
    """``X`` for ``X-wal``, else None."""
    return name[: -len(WAL_SUFFIX)] if name.endswith(WAL_SUFFIX) and len(name) > len(WAL_SUFFIX) else None


@dataclass(frozen=True)
class WalGrant:
    """A WAL ownership taken (``Volume.acquire_wal``)."""

    expiry: float
    #: the last version that changed the database or its -wal (data, attributes, or the name)
    last_change: int
    #: (name, inode or None if absent, data version) of the database and of its -wal
    files: tuple[tuple[bytes, int | None, int], ...]


class EntryChanged(StoreError):
    """Another mount changed a directory entry after this mount looked it up."""

    def __init__(self, parent: int, name: bytes, expected: int | None, current: int | None) -> None:
        super().__init__(f"entry {name!r} in directory {parent} is now {current}, not {expected}")
        self.errno = errno.EEXIST if expected is None else errno.ENOENT if current is None else errno.EBUSY


class StaleView(StoreError):
    """Another mount committed the database since this mount last read it."""

    errno = errno.EBUSY

    def __init__(self, message: str, head: int = 0) -> None:
        super().__init__(message)
        self.head = head  # the volume's version then: following it brings this mount's view up to date


@dataclass(frozen=True)
class CommitResult:
    version: int
    #: the inode records as written (merged onto the store's, see Inode.with_data_of)
    records: dict[int, Inode | None]


@dataclass(frozen=True)
class DataCommit:
    """A file whose data a commit publishes: the record's data version moves to the commit's."""

    #: the data version this mount's writes were made on; another is a lost update
    based_on: int
    #: this mount's staging of the file, published by the commit
    staging: int | None = None
    #: the record's attributes (mode, owner, times) replace the store's too, not only its
    #: data fields: a restore makes the file what it was, where a write keeps a chmod
    #: another mount committed meanwhile
    attributes: bool = False


class StaleWrite(StoreError):
    """Another writer committed the file after this mount's writes began."""

    errno = errno.EBUSY


class HistoryCollected(StoreError):
    """A commit built on reads of a version that gc has removed since (retention.py)."""

    errno = errno.ESTALE


class StagingConflict(StoreError):
    """Another staging of the file is in the store (a live writer elsewhere, or a dead one's leftovers)."""

    errno = errno.EBUSY

    def __init__(self, ino: int, version: int, owner: str, heartbeat: float) -> None:
        super().__init__(f"ino {ino} has a staged transaction at version {version} by mount {owner}")
        self.ino, self.version, self.owner, self.heartbeat = ino, version, owner, heartbeat


#: what a transaction function of an ``Attempts`` call returns: the attempt's number and
#: its version, known (an earlier attempt landed) or to come (the store's Stamp)
Outcome = tuple[int, "int | Stamp"]


class Attempts(Generic[R]):
    """One call of a transaction function that writes a version, retried until its
    result is known, and what each attempt would return.

    A store may report a commit that was applied as failed ("result unknown":
    FoundationDB's 1021, a timeout during the commit, the simulated cluster) and run
    the function again. So every attempt reads the call's own key (``key``, which
    names the mount and a number new for each call) with the rest of what it reads,
    in the same round trip, and writes it with its number and the version it commits
    (``trying``). An attempt that finds the key returns what the attempt that wrote
    it would have returned, writing nothing (``landed``). Two attempts cannot both
    land: each reads the key that the other writes, so whichever commits second
    conflicts, whatever else they read; on FoundationDB an attempt still in flight
    conflicts the same way with the retry that read the key before it landed.

    A commit's version is its versionstamp, known only once it committed: an attempt
    hands ``trying`` a function of the version that makes its result, and ``run``
    calls the one of the attempt that landed.

    The keys of calls that returned are cleared by a later call of the same Volume
    (``Volume._settled``); those of a mount that died, or of a call given up with its
    result unknown, by gc once they are ``CALL_KEEP_SECONDS`` old.
    """

    __slots__ = ("volume", "what", "key", "tried", "clears")

    def __init__(self, volume: Volume, what: str) -> None:
        self.volume = volume
        self.what = what  # for log lines
        self.key = volume.ks.call(volume.author, next(volume._call_ids))
        #: per attempt that wrote, what makes its result from its version
        self.tried: list[Callable[[int], R]] = []
        #: call keys of this Volume's earlier calls, cleared by each attempt of this one
        self.clears = volume._take_settled()

    def read(self) -> RangeRead:
        """The read every attempt adds to its others: the call's key."""
        return RangeRead.key(self.key)

    def landed(self, rows: list[tuple[bytes, bytes]]) -> Outcome | None:
        """The outcome of an earlier attempt that committed, if one did (``rows``: what
        ``read`` read)."""
        if not rows:
            return None
        _, attempt, version = unpack(rows[0][1])
        log.info("event=commit_found what=%s version=%d call=%r cause=%r", self.what, version, self.key,
                 "the store reported an attempt's result as unknown; it had committed")
        return attempt, version

    def trying(self, tr: Transaction, result: Callable[[int], R]) -> Outcome:
        """Write the call's key for an attempt whose commit, at the version it gets, returns ``result(version)``."""
        for key in self.clears:
            tr.clear(key)
        value = pack((time.time(), len(self.tried), STAMPED))
        tr.set_versionstamped_value(self.key, value, len(value) - STAMP_BYTES)
        self.tried.append(result)
        return len(self.tried) - 1, tr.versionstamp()

    def write_only(self, write: Callable[[Transaction], Callable[[int], R]]) -> R:
        """The call for a transaction that reads nothing but its call key: ``write``
        makes its writes and returns what makes its result from its version."""
        reads = [self.read()]

        def fn(tr: Transaction) -> Outcome:
            (call,) = tr.get_ranges(reads)
            landed = self.landed(call)
            if landed is not None:
                return landed
            return self.trying(tr, write(tr))

        return self.run(fn)

    def run(self, fn: Callable[[Transaction], Outcome], nowait: bool = False) -> R:
        """``fn``'s call to its end (``nowait``: one attempt, ``transact_nowait``); the
        result of the attempt that landed."""
        try:
            if nowait:
                attempt, version = self.volume.store.transact_nowait(fn)  # type: ignore[attr-defined]
            else:
                attempt, version = self.volume._write(fn, self.what)
        except BaseException:
            self.volume._settle(self.clears)  # perhaps not cleared: by the next call
            raise
        self.volume._settle([self.key])
        if not isinstance(version, int):
            version = stamped_version(version.known())
        return self.tried[attempt](version)


def transact_resolved(store: Store, fn: Callable[[Transaction], R], what: str) -> R:
    """``store.transact(fn)``, called again (for up to RESOLVE_SECONDS, with a growing
    pause) while the store gives up with the result unknown. ``fn`` must first look for
    what an earlier attempt committed (``Attempts.landed``), so a call after the commit
    landed returns its result instead of writing. An attempt still in flight cannot land
    after the next call's attempt has read the call key (it would conflict), so a later
    call settles it."""
    deadline = time.monotonic() + RESOLVE_SECONDS
    pause = 0.05
    while True:
        try:
            return store.transact(fn)
        except CommitUnknownResult as e:
            if time.monotonic() >= deadline:
                log.error("event=commit_unknown_given_up what=%r seconds=%g cause=%s", what, RESOLVE_SECONDS, e)
                raise
            log.warning("event=commit_unknown_resolving what=%r cause=%s", what, e)
            time.sleep(pause)
            pause = min(2 * pause, 2.0)


class Volume:
    def __init__(self, store: Store, name: str, author: str = "") -> None:
        self.store = store
        self.name = name
        #: this mount's id, written into every log entry so a mount skips its own
        self.author = author
        self.ks = Keyspace(name)
        self.block_size = DEFAULT_BLOCK_SIZE
        #: ids of this Volume's calls that write a version (``Attempts``): counted from
        #: a random start, so that two Volumes with one author (gc's and upgrade's have
        #: none) do not share ids
        self._call_ids = itertools.count(int.from_bytes(os.urandom(7), "big") + 1)
        #: call keys of calls that returned, for the next call to clear (``Attempts``)
        self._settled: list[bytes] = []
        self._settled_lock = threading.Lock()
        #: WAL ownership as commits check it, in their own store transaction (``_check_wal``).
        #: This mount's (parent, name) of an inode (set by the file system's operations,
        #: fs/base.py; read from worker threads)
        self.wal_names: Callable[[int], tuple[int, bytes] | None] = lambda ino: None
        #: databases with a WAL index (-shm) open on this mount (coherence/)
        self.wal_mine: set[WalKey] = set()
        #: databases whose WAL index here may not match the store (coherence/): every
        #: commit of them or of their -wal from this mount is refused (WalLost)
        self.wal_poisoned: set[WalKey] = set()
        #: a clone's parent volume and the version it was cloned at (``clone``): reads
        #: find there, as of that version, what this volume has not written itself
        self.base: Volume | None = None
        self.base_version = 0
        #: per inode, the data version its record has in the base at ``base_version``
        #: (it never changes): base blocks newer than it are not the file's then
        self._base_dvers: dict[int, int] = {}

    def _take_settled(self) -> list[bytes]:
        with self._settled_lock:
            keys, self._settled = self._settled, []
        return keys

    def _settle(self, keys: list[bytes]) -> None:
        if keys:
            with self._settled_lock:
                self._settled.extend(keys)

    def _write(self, fn: Callable[[Transaction], R], what: str) -> R:
        """``store.transact`` for a transaction that writes: ``fn`` must be idempotent
        (each one here says why it is), so a call that ended with its result unknown
        is settled by calling it again (``transact_resolved``)."""
        return transact_resolved(self.store, fn, what)

    # -- opening ---------------------------------------------------------------------
    def open(self, block_size: int = DEFAULT_BLOCK_SIZE, create: bool = True) -> int:
        """Create the volume on first use (``create``; else VolumeNotFound); return its
        head version (VolumeFormatError, which says what to do, if its layout is not
        ``FORMAT``).

        Idempotent: an attempt run again after its creation landed finds the volume."""

        base: list = []

        def fn(tr: Transaction) -> tuple[int, int]:
            meta = tr.get(self.ks.meta())
            if meta is not None:
                fmt, bs, *rest = unpack(meta)
                if fmt != FORMAT:
                    raise VolumeFormatError(self._format_advice(fmt))
                base[:] = rest  # a clone: (parent volume, version)
                return bs, unpack(tr.get(self.ks.head()))[0]
            if not create:
                raise VolumeNotFound(f"the store has no volume {self.name!r}; check --volume and --store")
            now = time.time_ns()
            root = Inode(mode=0o40755, uid=0, gid=0, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now)
            tr.set(self.ks.meta(), pack((FORMAT, block_size)))
            tr.set(self.ks.inode(ROOT_INO, 1), root.pack())
            tr.set(self.ks.next_ino(), pack((ROOT_INO + 1,)))
            tr.set(self.ks.head(), pack((1,)))
            tr.set(self.ks.log(1), self._log_value(LogEntry(1, self.author, (ROOT_INO,))))
            return block_size, 1

        self.block_size, head = self._write(fn, "open")
        if base and self.base is None:
            self.base = Volume(self.store, base[0])
            self.base.open(create=False)
            self.base_version = base[1]
        return head

    def clone(self, source: Volume, version: int) -> None:
        """Make this volume, which must not exist, start as ``source`` was at ``version``:
        a few keys, whatever the size (its reads fall back to ``source``: ``base``), and
        a pin in ``source`` so that gc keeps that version there. Idempotent: run again
        after it landed, it finds the clone it made."""
        pin = source.ks.pin(f"clone:{self.name}")

        def fn(tr: Transaction) -> None:
            meta = tr.get(self.ks.meta())
            if meta is not None:
                if unpack(meta)[2:] == (source.name, version) and tr.get(pin) is not None:
                    return  # this call's earlier attempt
                raise VolumeExists(f"volume {self.name!r} exists; name a new one")
            entry = source._log_entry(source.ks.log(version), tr.get(source.ks.log(version)) or b"")
            tr.set(self.ks.meta(), pack((FORMAT, source.block_size, source.name, version)))
            tr.set(self.ks.head(), pack((version,)))
            tr.set(self.ks.log(version), self._log_value(LogEntry(version, f"clone of {source.name}", entry.inodes,
                                                                  entry.dirents)))
            tr.set(self.ks.next_ino(), tr.get(source.ks.next_ino()) or pack((ROOT_INO + 1,)))
            tr.set(pin, pack((version,)))

        self._write(fn, "clone")

    def _format_advice(self, fmt: int) -> str:
        if fmt in UPGRADABLE:
            return (
                f"volume {self.name!r} has format {fmt}, this fusesqlite uses format {FORMAT}: stop every mount "
                f"of it, then run: fusesqlite upgrade --volume {self.name} (with the same --store)"
            )
        return f"volume {self.name!r} has format {fmt}, this fusesqlite reads format {FORMAT}: use the fusesqlite that wrote it"

    #: directory-entry versions read per store transaction by ``upgrade``
    UPGRADE_BATCH = 2000

    def upgrade(self, progress: Callable[[int], None] = lambda read: None) -> int | None:
        """Move a volume of a format in ``UPGRADABLE`` to ``FORMAT``. Format 2 needs the
        new format only. Format 1 first gets its current directory entries ('cd'
        keys), written from the entries' history in batches. Returns how many entries
        it wrote, None if the volume has ``FORMAT`` already; ``progress`` gets the
        number of entry versions read so far.

        Every mount of the volume must be stopped (older ones do not write 'cd' keys,
        and number versions from the head): a commit during the upgrade fails it
        (VolumeFormatError), and a run that stopped half-way starts over.

        Each transaction is idempotent: run again after it landed it clears or
        writes the same keys, and the format it sets last is the one it checks.
        """

        def start(tr: Transaction) -> int | None:
            meta = tr.get(self.ks.meta())
            if meta is None:
                raise VolumeFormatError(f"volume {self.name!r} does not exist in this store; check --store and --volume")
            fmt, block_size = unpack(meta)
            if fmt == FORMAT:
                return None
            if fmt not in UPGRADABLE:
                raise VolumeFormatError(self._format_advice(fmt))
            if fmt == 2:  # its versions stay as they are: every stamped version is greater
                tr.set(self.ks.meta(), pack((FORMAT, block_size)))
                return 0
            tr.clear_range(*self.ks.children("cd"))
            return unpack(tr.get(self.ks.head()))[0]

        head = self._write(start, "upgrade")
        if head is None:
            return None
        if head == 0:
            return 0

        def still(tr: Transaction) -> None:
            if unpack(tr.get(self.ks.head()))[0] != head:
                raise VolumeFormatError(
                    f"a mount committed to volume {self.name!r} during the upgrade; stop every mount of it "
                    "and run fusesqlite upgrade again"
                )

        #: the entry being read: (parent, name) and its latest value so far
        Pending = tuple[tuple[int, bytes], bytes] | None

        def batch(begin: bytes, pending: Pending) -> Callable[[Transaction], tuple[int, bytes, Pending, int]]:
            def fn(tr: Transaction) -> tuple[int, bytes, Pending, int]:
                still(tr)
                rows = tr.get_range(begin, end, limit=self.UPGRADE_BATCH)
                written, current = 0, pending
                for key, value in rows:
                    _, parent, name, _ = self.ks.parts(key)
                    if current is not None and current[0] != (parent, name):
                        written += self._index_entry(tr, current)
                    current = ((parent, name), value)
                if len(rows) < self.UPGRADE_BATCH:  # the last batch: the last entry, and the format
                    if current is not None:
                        written += self._index_entry(tr, current)
                    tr.set(self.ks.meta(), pack((FORMAT, unpack(tr.get(self.ks.meta()))[1])))
                    current = None
                next_begin = rows[-1][0] + b"\x00" if rows else end
                return len(rows), next_begin, current, written

            return fn

        begin, end = self.ks.children("d")
        pending: Pending = None
        read = written = 0
        while True:
            n, begin, pending, w = self._write(batch(begin, pending), "upgrade")
            read += n
            written += w
            progress(read)
            if n < self.UPGRADE_BATCH:
                return written

    def _index_entry(self, tr: Transaction, entry: tuple[tuple[int, bytes], bytes]) -> int:
        """Write the current entry ('cd') of an entry whose latest version is ``entry``."""
        (parent, name), value = entry
        if not value:
            return 0  # removed
        tr.set(self.ks.current_dirent(parent, name), value)
        return 1

    def head(self) -> int:
        return self.store.transact(lambda tr: unpack(tr.get(self.ks.head()))[0])

    def wait_for_head(self, seen: int, timeout: float) -> int:
        """The head version once it differs from ``seen``, or ``seen`` after ``timeout``
        (blocks: a FoundationDB watch, or the embedded store's wake-up)."""
        key = self.ks.head()
        raw = self.store.wait_for_changes({key: pack((seen,))}, timeout)[key]
        return unpack(raw)[0] if raw else seen

    def changes(
        self, since: dict[int, int], log_after: int,
    ) -> tuple[int, dict[bytes, bytes | None], list[LogEntry] | None]:
        """The head version, the ``changed`` keys of the inodes of ``since`` (what to wait
        on: ``wait_for_changes``), and, if a commit after ``since[ino]`` names one of
        them in its log entry, the log entries after ``log_after`` up to the head (else
        None). The marks and the log's first page in one store transaction: with
        nothing changed, a mount's view of those inodes is the store's at that head,
        whatever other inodes it changed."""
        inos = list(since)
        keys = [self.ks.changed(ino) for ino in inos]

        def fn(tr: Transaction) -> tuple[int, dict[bytes, bytes | None], list[tuple[bytes, bytes]] | None]:
            rows = tr.get_ranges([RangeRead.key(self.ks.head()), *(RangeRead.key(key) for key in keys)])
            head = unpack(rows[0][0][1])[0]
            values = {key: found[0][1] if found else None for key, found in zip(keys, rows[1:])}
            if not any(value is not None and unpack(value)[0] > since[ino] for ino, value in zip(inos, values.values())):
                return head, values, None
            return head, values, tr.get_range(self.ks.log(log_after + 1), self.ks.log(head + 1), limit=self.LOG_PAGE)

        head, values, page = self.store.transact(fn)
        if page is None:
            return head, values, None
        entries = [self._log_entry(key, value) for key, value in page]
        if len(page) == self.LOG_PAGE:  # the rest a page per transaction, as ``log_range``
            entries.extend(self.log_range(entries[-1].version, head))
        return head, values, entries

    def allocate_inodes(self, count: int = INO_BATCH) -> range:
        """A batch of unused inode numbers. Run again after its commit landed (result
        unknown), it hands out the next batch: the first is never used, a waste of
        numbers only (63 bits of them)."""

        def fn(tr: Transaction) -> int:
            first = unpack(tr.get(self.ks.next_ino()))[0]
            tr.set(self.ks.next_ino(), pack((first + count,)))
            return first

        first = self._write(fn, "inode numbers")
        return range(first, first + count)

    # -- reads at a version ----------------------------------------------------------
    @staticmethod
    def _latest(tr: Transaction, begin_end: tuple[bytes, bytes]) -> bytes | None:
        rows = tr.get_range(*begin_end, limit=1, reverse=True)
        return rows[0][1] if rows else None

    def _last_row(self, tr: Transaction, version: int, *parts: object) -> tuple[Volume, bytes, bytes] | None:
        """The newest row of versioned key ``parts`` as of ``version`` (a removal included:
        an empty value), here or, in a clone, in its base as of the clone's version; with
        the volume whose keyspace the key is in."""
        rows = tr.get_range(*self.ks.versions_upto(version, *parts), limit=1, reverse=True)
        if rows:
            return self, rows[0][0], rows[0][1]
        if self.base is not None:
            return self.base._last_row(tr, min(version, self.base_version), *parts)
        return None

    def _inode(self, tr: Transaction, ino: int, version: int) -> Inode | None:
        """``ino``'s record as of ``version``."""
        if self.base is None:
            return self._record(tr.get_range(*self.ks.versions_upto(version, "i", ino), limit=1, reverse=True))
        found = self._last_row(tr, version, "i", ino)
        return None if found is None else found[0]._record([(found[1], found[2])])

    def _own_or_base(self, tr: Transaction, rows: list[tuple[bytes, bytes]], *parts: object) -> list[tuple[bytes, bytes]]:
        """``rows``, a read of the latest row of ``parts`` here; in a clone where that found
        nothing, the base's row as of the clone's version (its key rewritten to this
        volume's prefix, so that ``ks.last_version`` and ``_record`` read it alike)."""
        if rows or self.base is None:
            return rows
        found = self.base._last_row(tr, self.base_version, *parts)
        if found is None:
            return rows
        vol, key, value = found
        return [(self.ks.prefix + key[len(vol.ks.prefix):], value)]

    def _record(self, rows: list[tuple[bytes, bytes]]) -> Inode | None:
        """The record of a read of an inode's latest row (None: absent or removed), its
        data version resolved (``THIS_VERSION``)."""
        if not rows or not rows[0][1]:
            return None
        key, value = rows[0]
        rec = Inode.unpack(value)
        return rec._replace(dver=self.ks.last_version(key)) if rec.dver == THIS_VERSION else rec

    def read_inode(self, ino: int, version: int) -> Inode | None:
        return self.store.transact(lambda tr: self._inode(tr, ino, version))

    def lookup(self, parent: int, name: bytes, version: int) -> tuple[int, Inode] | None:
        """The child's inode number and record as of ``version``, in one store transaction."""
        return self.lookup_current(parent, name, version, exact=True)[0]

    def _mark(self, rows: list[tuple[bytes, bytes]]) -> int:
        """The version a read of a ``changed`` key found (0: never changed)."""
        return unpack(rows[0][1])[0] if rows else 0

    def lookup_current(
        self, parent: int, name: bytes, version: int, *, exact: bool = False,
    ) -> tuple[tuple[int, Inode] | None, int]:
        """``lookup`` for a mount's view at ``version``, and the version it read as of:
        ``version``, or the head where a commit after it changed the directory or the
        child (their ``changed`` keys, read in the same round trips). A mount follows
        only the inodes it holds, so its view may be older than the store's for one it
        did not hold until now: read as of the view, it would answer what another mount
        changed a while ago (coherence/follow.py). ``exact``: as of ``version`` only (a
        past version)."""
        marks = [] if exact else [RangeRead.key(self.ks.changed(parent)), RangeRead.key(self.ks.head())]

        def fn(tr: Transaction) -> tuple[tuple[int, Inode] | None, int]:
            entry, *found = tr.get_ranges([RangeRead.last(self.ks.versions_upto(version, "d", parent, name)), *marks])
            at = head = version
            if found:
                head = unpack(found[1][0][1])[0]
                if self._mark(found[0]) > at:
                    at = head
                    entry = tr.get_range(*self.ks.versions_upto(at, "d", parent, name), limit=1, reverse=True)
            while True:
                value = _value(self._own_or_base(tr, entry, "d", parent, name))
                if not value:
                    return None, at
                ino = unpack(value)[0]
                recs, *mark = tr.get_ranges([
                    RangeRead.last(self.ks.versions_upto(at, "i", ino)),
                    *([] if exact else [RangeRead.key(self.ks.changed(ino))]),
                ])
                if mark and self._mark(mark[0]) > at:  # the child changed since: the entry and it as of the head
                    at = head
                    entry = tr.get_range(*self.ks.versions_upto(at, "d", parent, name), limit=1, reverse=True)
                    continue
                rec = self._record(self._own_or_base(tr, recs, "i", ino))
                if rec is None:
                    log.error("event=dangling_entry parent=%d name=%r ino=%d version=%d", parent, name, ino, at)
                    return None, at
                return (ino, rec), at

        return self.store.transact(fn)

    def list_dir_current(
        self, parent: int, version: int, *, exact: bool = False,
    ) -> tuple[list[tuple[bytes, int, Inode]], int]:
        """``list_dir`` for a mount's view at ``version``, and the version it listed as of:
        the head where a commit after ``version`` changed the directory or one of its
        children (``lookup_current`` says why); ``exact``: ``version`` only."""
        listed = self.store.transact(lambda tr: self._entries_at(tr, parent, version))
        if exact:
            return self._listed(listed, version), version
        marks = self._marks([parent, *(ino for _, ino in listed)])
        if max(marks.values(), default=0) <= version:
            return self._listed(listed, version), version
        at = self.head()
        return self.list_dir(parent, at), at

    def _marks(self, inos: list[int]) -> dict[int, int]:
        """The ``changed`` versions of ``inos``, in round trips of ``LIST_BATCH``."""
        out: dict[int, int] = {}
        for i in range(0, len(inos), self.LIST_BATCH):
            batch = inos[i : i + self.LIST_BATCH]
            rows = self.store.transact(lambda tr: tr.get_ranges([RangeRead.key(self.ks.changed(ino)) for ino in batch]))
            out.update((ino, self._mark(r)) for ino, r in zip(batch, rows))
        return out

    #: inode records read per store transaction when listing a directory
    LIST_BATCH = 500

    def list_dir(self, parent: int, version: int) -> list[tuple[bytes, int, Inode]]:
        """(name, ino, record) of every entry visible at ``version``, by name.

        The names come from the directory as it is at the head version ('cd' keys:
        its live entries, however many were created and removed before), corrected
        by the log for a view that lags the head (``_entries_at``). The records are
        read in batches, each its own store transaction: what is visible at one
        version never changes, so the batches agree, and a big directory stays far
        inside FoundationDB's 5 seconds per transaction.
        """
        return self._listed(self.store.transact(lambda tr: self._entries_at(tr, parent, version)), version)

    def _listed(self, listed: list[tuple[bytes, int]], version: int) -> list[tuple[bytes, int, Inode]]:
        """The records of the (name, ino) of a listing as of ``version``, those of names
        no longer there left out."""

        def records(batch: list[tuple[bytes, int]]) -> Callable[[Transaction], list[tuple[bytes, int, Inode]]]:
            def fn(tr: Transaction) -> list[tuple[bytes, int, Inode]]:
                out = []
                for name, ino in batch:
                    rec = self._inode(tr, ino, version)
                    if rec is not None:
                        out.append((name, ino, rec))
                return out

            return fn

        out: list[tuple[bytes, int, Inode]] = []
        for i in range(0, len(listed), self.LIST_BATCH):
            out.extend(self.store.transact(records(listed[i : i + self.LIST_BATCH])))
        return out

    #: a view further behind the head than this many log entries lists from the entries'
    #: history (time travel); nearer, from the current entries and the log between
    LIST_LAG_LIMIT = 1000

    def _entries_at(self, tr: Transaction, parent: int, version: int) -> list[tuple[bytes, int]]:
        """(name, ino) of ``parent``'s entries at ``version``, by name.

        The current entries are the directory at the head; the names any commit after
        ``version`` changed (the log's entries) are read as they were at ``version``.
        A view far behind the head reads every version of every entry instead.
        """
        if self.base is not None:
            return self._clone_entries(tr, parent, version)
        current, later = tr.get_ranges([
            RangeRead(*self.ks.children("cd", parent)),
            RangeRead(self.ks.log(version + 1), self.ks.children("log")[1], self.LIST_LAG_LIMIT + 1),
        ])
        if len(later) > self.LIST_LAG_LIMIT:
            return self._entries_from_history(tr, parent, version)
        entries = {self.ks.parts(key)[-1]: unpack(value)[0] for key, value in current}
        if later:
            changed = {name for _, value in later for p, name in unpack(value)[3] if p == parent}
            for name in changed:
                raw = self._latest(tr, self.ks.versions_upto(version, "d", parent, name))
                ino = unpack(raw)[0] if raw else None
                if ino:
                    entries[name] = ino
                else:
                    entries.pop(name, None)
        return sorted(entries.items())

    def _clone_entries(self, tr: Transaction, parent: int, version: int) -> list[tuple[bytes, int]]:
        """``_entries_at`` in a clone: the base's entries at the clone's version, changed by
        every version of this volume's own entries (its current entries cannot say that
        a name of the base was removed here)."""
        assert self.base is not None
        entries = dict(self.base._entries_at(tr, parent, min(version, self.base_version)))
        latest: dict[bytes, bytes] = {}
        for key, value in tr.get_range(*self.ks.children("d", parent)):
            _, _, name, ver = self.ks.parts(key)
            if ver <= version:
                latest[name] = value
        for name, value in latest.items():
            if value:
                entries[name] = unpack(value)[0]
            else:
                entries.pop(name, None)
        return sorted(entries.items())

    def _entries_from_history(self, tr: Transaction, parent: int, version: int) -> list[tuple[bytes, int]]:
        """``_entries_at`` from every version of every entry (it costs the directory's history)."""
        latest: dict[bytes, tuple[int, bytes]] = {}
        for key, value in tr.get_range(*self.ks.children("d", parent)):
            _, _, name, ver = self.ks.parts(key)
            if ver <= version:
                latest[name] = (ver, value)
        return [(name, unpack(value)[0]) for name, (_, value) in sorted(latest.items()) if value]

    def read_blocks(self, ino: int, block_nos: Iterable[int], version: int) -> dict[int, bytes]:
        """Encoded values of ``block_nos`` as of ``version`` (absent = hole).

        A run of consecutive blocks (the kernel reads ahead up to 32 at once) is
        read with one forward range read over all their versions, limited to a
        few rows per block: a file written once has one version per block, and
        one query instead of one per block (plus its key packing) is most of a
        cold scan's cost. Where the limit cuts the range (hot blocks such as
        page 1 gather a version per commit until retention removes them), the
        blocks it did not cover are read one reverse read each.
        """
        wanted = sorted(set(block_nos))

        def fn(tr: Transaction) -> dict[int, bytes]:
            found: dict[int, bytes] = {}
            if self.base is not None:  # a clone: block by block, here or in the base
                self._read_each(tr, ino, wanted, version, found)
                return found
            i = 0
            while i < len(wanted):
                j = i + 1
                while j < len(wanted) and wanted[j] == wanted[j - 1] + 1:
                    j += 1
                if j - i > 1:
                    i = self._read_run(tr, ino, wanted, i, j, version, found)
                self._read_each(tr, ino, wanted[i:j], version, found)
                i = j
            return found

        return self.store.transact(fn)

    def _read_each(self, tr: Transaction, ino: int, block_nos: Iterable[int], version: int,
                   found: dict[int, bytes]) -> None:
        """Blocks ``block_nos`` as of ``version``, one reverse read each, into ``found`` (absent: holes)."""
        for block_no in block_nos:
            value = self._block_at(tr, ino, block_no, version)
            if value is not None:
                found[block_no] = value

    def _block_at(self, tr: Transaction, ino: int, block_no: int, version: int) -> bytes | None:
        """A block as of data version ``version``; in a clone, where this volume never wrote
        it, the base's as of the file's data version there at the clone's version (a base
        block staged before that version and published after it is not the file's then)."""
        value = self._latest(tr, self.ks.versions_upto(version, "b", ino, block_no))
        if value is not None or self.base is None:
            return value
        cap = self._base_dvers.get(ino)
        if cap is None:
            rec = self.base._inode(tr, ino, self.base_version)
            cap = self._base_dvers[ino] = rec.dver if rec is not None else 0
        return self.base._block_at(tr, ino, block_no, min(version, cap)) if cap else None

    #: rows a range read over a run of blocks may return, per block, before the
    #: rest of the run is read block by block
    RANGE_ROWS_PER_BLOCK = 2

    def _read_run(
        self, tr: Transaction, ino: int, wanted: list[int], i: int, j: int, version: int, found: dict[int, bytes]
    ) -> int:
        """Read blocks ``wanted[i:j]`` (consecutive) in one range read; return the index
        of the first block it did not settle (``j`` when it settled them all)."""
        first, end = wanted[i], wanted[j - 1] + 1
        rows, plen, settled_end = self._range_rows(tr, ino, first, end)
        pick_versions(rows, plen, settled_end, version, found)
        return i + (settled_end - first)

    def _range_rows(self, tr: Transaction, ino: int, first: int, end: int) -> tuple[list[tuple[bytes, bytes]], int, int]:
        """Rows of blocks ``first .. end - 1``, the block prefix's length, and the block
        the rows settle everything below (the limit may cut the last block's versions)."""
        limit = (end - first) * self.RANGE_ROWS_PER_BLOCK
        plen = len(self.ks.key("b", ino))
        rows = tr.get_range(*self.ks.blocks(ino, first, end), limit=limit)
        settled_end = end
        if len(rows) == limit:  # cut: the last block listed may have more versions
            settled_end = self.ks.int_pair(rows[-1][0][plen:])[0]
        return rows, plen, settled_end

    def read_run(self, ino: int, first: int, end: int, version: int) -> BlockRows:
        """Blocks ``first .. end - 1`` as ``read_blocks`` would read them, left as rows:
        read-ahead decodes them in C without building a dict of them in Python
        (``pages.decode_rows``)."""

        def fn(tr: Transaction) -> BlockRows:
            if self.base is not None:  # a clone: block by block, here or in the base
                rest: dict[int, bytes] = {}
                self._read_each(tr, ino, range(first, end), version, rest)
                return BlockRows([], len(self.ks.key("b", ino)), first, rest)
            rows, plen, settled_end = self._range_rows(tr, ino, first, end)
            rest = {}
            self._read_each(tr, ino, range(settled_end, end), version, rest)
            return BlockRows(rows, plen, settled_end, rest)

        return self.store.transact(fn)

    #: block keys read per store transaction by ``blocks_written``
    SCAN_PAGE = 2000

    def blocks_written(self, ino: int, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(block_no, version) of every stored version of blocks ``0 .. end - 1`` (all
        if ``end`` is None) of ``ino``, in key order: a page (``SCAN_PAGE``) per store transaction, as the
        caller goes on. It reads the blocks' values too (the store has no keys-only
        read): it costs the file's history."""
        begin, stop = self.ks.blocks(ino, 0, end)
        plen = len(self.ks.key("b", ino))
        while True:
            rows = self.store.transact(lambda tr: tr.get_range(begin, stop, limit=self.SCAN_PAGE))
            for key, _ in rows:
                yield self.ks.int_pair(key[plen:])
            if len(rows) < self.SCAN_PAGE:
                return
            begin = rows[-1][0] + b"\x00"

    # -- commits ---------------------------------------------------------------------
    def commit(
        self,
        changes: ChangeSet,
        data: dict[int, DataCommit] | None = None,
        release_leases: Iterable[int] = (),
        idle_leases: Iterable[int] = (),
        *,
        nowait: bool = False,
        oldest_read: int = 0,
    ) -> CommitResult:
        """Write ``changes`` as the next version of the volume.

        Files in ``data`` get their data version moved to it, after checking that
        nobody else committed them meanwhile and that no other staging of them exists.
        This mount's write leases on ``release_leases`` end with it. Those on
        ``idle_leases`` (the transaction's own) must still be this mount's, else the
        commit fails with LeaseLost; they become idle, still this mount's.
        ``nowait``: one attempt through the store's ``transact_nowait`` (ConflictError
        where ``transact`` would wait or retry). ``oldest_read``: the changes were made
        from reads as old as this version (a restore): the commit fails with
        HistoryCollected if gc's horizon has passed it, in the same store transaction,
        so gc (which writes the horizon first) either sees the commit or makes it fail.
        """
        data = data or {}
        release_leases = tuple(release_leases)
        idle_leases = tuple(idle_leases)

        wal_keys = self._wal_keys(changes, data)
        attempts: Attempts[CommitResult] = Attempts(self, "commit")

        inos = list(changes.inodes)
        expects = list(changes.expect.items())
        leases = [*idle_leases, *release_leases]
        wal_order = sorted(wal_keys)
        reads = [
            attempts.read(),
            *(RangeRead.last(self.ks.versions_upto(ALL_VERSIONS, "i", ino)) for ino in inos),
            *(RangeRead(*self.ks.children("staging", ino)) for ino in inos if ino in data),
            *(RangeRead.last(self.ks.versions_upto(ALL_VERSIONS, "d", parent, name)) for (parent, name), _ in expects),
            *(RangeRead.key(self.ks.lease(ino)) for ino in leases),
            *(RangeRead.key(self.ks.wal_owner(parent, name)) for parent, name in wal_order),
            *([RangeRead.key(self.ks.horizon())] if oldest_read else []),
        ]

        def fn(tr: Transaction) -> Outcome:
            # everything the commit checks, in one round trip (in this order: ``reads``).
            # It reads no key that every commit writes: commits of other files never
            # conflict with it, and its version is the store's versionstamp
            answers = iter(tr.get_ranges(reads))
            landed = attempts.landed(next(answers))
            if landed is not None:
                return landed
            records = {ino: self._record(self._own_or_base(tr, next(answers), "i", ino)) for ino in inos}
            stagings = {ino: next(answers) for ino in inos if ino in data}
            entries = {key: _value(self._own_or_base(tr, next(answers), "d", *key)) for key, _ in expects}
            held = {ino: _value(next(answers)) for ino in leases}
            if wal_keys:
                self._check_wal(tr, wal_keys, {key: _value(next(answers)) for key in wal_order})
            if oldest_read:
                horizon = _value(next(answers))
                if horizon is not None and unpack(horizon)[0] > oldest_read:
                    raise HistoryCollected(f"gc removed version {oldest_read}, which this commit was made from")
            written: dict[int, Inode | None] = {}
            for ino, rec in changes.inodes.items():
                current = records[ino]
                dc = data.get(ino)
                if dc is not None:
                    if current is not None and current.dver != dc.based_on:
                        raise StaleWrite(f"ino {ino} was committed elsewhere after version {dc.based_on}")
                    staged_here = False
                    for key, value in stagings[ino]:
                        staged = self.ks.parts(key)[-1]
                        if staged != dc.staging:
                            owner, heartbeat = unpack(value)
                            raise StagingConflict(ino, staged, owner, heartbeat)
                        staged_here = True
                    if dc.staging is not None:
                        if not staged_here:
                            raise StaleWrite(f"staging of ino {ino} at version {dc.staging} was reclaimed")
                        tr.clear(self.ks.staging(ino, dc.staging))
                        tr.clear_range(*self.ks.children("stg", ino, dc.staging))  # its blocks are published
                    assert rec is not None
                    rec = rec.with_(dver=THIS_VERSION)
                    if current is not None and not dc.attributes:
                        rec = current.with_(mtime_ns=rec.mtime_ns, ctime_ns=rec.ctime_ns).with_data_of(rec)
                elif rec is not None and current is not None:
                    rec = rec.with_data_of(current)
                written[ino] = rec
                self._set_stamped(tr, self.ks.inode(ino, STAMPED), rec.pack() if rec else b"")
            for (parent, name), expected in expects:
                raw = entries[(parent, name)]
                current = unpack(raw)[0] if raw else None
                if current != expected:
                    raise EntryChanged(parent, name, expected, current)
            for (parent, name), child in changes.dirents.items():
                self._set_stamped(tr, self.ks.dirent(parent, name, STAMPED), pack((child,)) if child else b"")
                if child:
                    tr.set(self.ks.current_dirent(parent, name), pack((child,)))
                else:
                    tr.clear(self.ks.current_dirent(parent, name))
            for (ino, block_no), block in changes.blocks.items():
                self._set_stamped(tr, self.ks.block(ino, block_no, STAMPED), bytes(block))
            released = []
            for ino in idle_leases:
                raw = held[ino]
                lease = Lease.unpack(raw) if raw is not None else None
                if lease is None or lease.owner != self.author:
                    raise LeaseLost(f"ino {ino}: mount {lease.owner if lease else '(none)'} took the write lease")
                if lease.busy:  # an idle lease stays as it is (the read above checked it): one statement fewer
                    tr.set(self.ks.lease(ino), Lease(self.author, lease.expiry, busy=False).pack())
                released.append((ino, "", 0.0))  # other mounts' writers may go: it is theirs for the taking
            for ino in release_leases:
                raw = held[ino]
                if raw is not None and Lease.unpack(raw).owner == self.author:
                    tr.clear(self.ks.lease(ino))
                    released.append((ino, "", 0.0))
            self._log(tr, LogEntry(0, self.author, tuple(changes.touched()), tuple(changes.dirents), tuple(released)))
            return attempts.trying(tr, lambda version: CommitResult(version, {
                ino: rec._replace(dver=version) if rec is not None and rec.dver == THIS_VERSION else rec
                for ino, rec in written.items()
            }))

        return attempts.run(fn, nowait)

    def _wal_keys(self, changes: ChangeSet, data: dict[int, DataCommit]) -> dict[WalKey, bool]:
        """The databases whose WAL ownership a commit must check: every name whose entry
        it changes, and every file whose data or attributes it writes (as this mount
        names it: SQLite, as root, chowns a new -wal), a -wal standing for its
        database; and whether the change only creates the -wal (allowed on a poisoned
        index: SQLite creates it before it opens a new index). Rollback-journal
        databases pay one store read."""
        keys: dict[WalKey, bool] = {}  # key -> whether the commit only creates its -wal
        for (parent, name), ino in changes.dirents.items():
            db = wal_database(name)
            key = (parent, db or name)
            keys[key] = keys.get(key, True) and db is not None and bool(ino)
        for ino in {*data, *(ino for ino, rec in changes.inodes.items() if rec is not None)}:
            known = self.wal_names(ino)  # an unlinked file's record going is nobody's view
            if known is not None:
                keys[(known[0], wal_database(known[1]) or known[1])] = False
        return keys

    def _check_wal(self, tr: Transaction, keys: dict[WalKey, bool], records: dict[WalKey, bytes | None]) -> None:
        """In a commit's store transaction: the WAL records of ``keys`` (read as ``records``) allow it.

        Where this mount has a WAL index of the database, the record must name this
        mount: whoever took it since (only possible once this mount's expired) may
        have changed the files under that index. Elsewhere nobody else alive may hold
        the record; an expired holder's is cleared, so that holder, should it resume,
        finds it gone at its next commit. Checked here, in the transaction that
        writes, no commit lands from a mount that has lost the ownership, whatever
        the timing; and no other mount's change to the database or its -wal lands
        between an owner's grant and its release.
        """
        now = time.time()
        for key, creates_wal in sorted(keys.items()):
            parent, name = key
            if key in self.wal_poisoned and not creates_wal:
                raise WalLost(parent, name, "a commit of it or of its -wal failed on this mount, or its WAL "
                              "ownership was lost, while its WAL index was open here")
            raw = records[key]
            held = Lease.unpack(raw) if raw is not None else None
            if key in self.wal_mine:
                if held is None or held.owner != self.author:
                    raise WalLost(parent, name, f"its WAL ownership was lost to {held.owner if held else 'expiry'}")
            elif held is not None and held.owner != self.author:
                if held.live(now):
                    raise WalHeld(parent, name, held)
                tr.clear(self.ks.wal_owner(parent, name))

    @staticmethod
    def _log_value(entry: LogEntry) -> bytes:
        return pack((time.time(), entry.author, entry.inodes, entry.dirents, entry.leases))

    def _log(self, tr: Transaction, entry: LogEntry) -> None:
        """Write ``entry`` at the transaction's version, and move the head there. Every
        transaction that writes a version writes the head, but none reads it: the
        writes are blind, so they never conflict (on FoundationDB the last commit's
        value stays, which is the newest version)."""
        self._set_stamped(tr, self.ks.log(STAMPED), self._log_value(entry))
        head = pack((STAMPED,))
        offset = len(head) - STAMP_BYTES
        tr.set_versionstamped_value(self.ks.head(), head, offset)
        for ino in entry.named():
            tr.set_versionstamped_value(self.ks.changed(ino), head, offset)

    def _set_stamped(self, tr: Transaction, key: bytes, value: bytes) -> None:
        """Set ``key``, built with version ``STAMPED``, at the transaction's own version."""
        tr.set_versionstamped_key(key, self.ks.stamped(key), value)

    #: log entries read per store transaction (``log_range``)
    LOG_PAGE = 1000

    def log_range(self, after: int, upto: int) -> list[LogEntry]:
        """Log entries of versions ``after`` < v <= ``upto``, oldest first: in pages of
        ``LOG_PAGE``, each its own store transaction (a mount far behind reads a long
        log, and one transaction may last 5 seconds). The log never changes below the
        head, so the pages agree."""

        def page(begin: bytes) -> Callable[[Transaction], list[tuple[bytes, bytes]]]:
            return lambda tr: tr.get_range(begin, end, limit=self.LOG_PAGE)

        begin, end = self.ks.log(after + 1), self.ks.log(upto + 1)
        out: list[LogEntry] = []
        while True:
            rows = self.store.transact(page(begin))
            out.extend(self._log_entry(key, value) for key, value in rows)
            if len(rows) < self.LOG_PAGE:
                return out
            begin = rows[-1][0] + b"\x00"

    def _log_entry(self, key: bytes, value: bytes) -> LogEntry:
        when, author, inodes, dirents, leases, *_ = unpack(value)
        return LogEntry(self.ks.last_version(key), author, inodes, dirents, leases, when)

    def log_newest_first(self, upto: int = ALL_VERSIONS) -> Iterator[LogEntry]:
        """Log entries of versions <= ``upto``, newest first, read a page (``LOG_PAGE``)
        at a time as the caller goes on, each page its own store transaction."""
        begin, end = self.ks.log(0), self.ks.log(upto) + b"\x00"
        while True:
            rows = self.store.transact(lambda tr: tr.get_range(begin, end, limit=self.LOG_PAGE, reverse=True))
            yield from (self._log_entry(key, value) for key, value in rows)
            if len(rows) < self.LOG_PAGE:
                return
            end = rows[-1][0]

    def log_entry(self, version: int) -> LogEntry | None:
        """The log entry of ``version``, None if no commit made that version."""
        key = self.ks.log(version)
        value = self.store.transact(lambda tr: tr.get(key))
        return None if value is None else self._log_entry(key, value)

    # -- write leases: one writing mount per database ------------------------------------
    def acquire_lease(self, ino: int, ttl: float, view_dver: int) -> float:
        """Take (or renew) this mount's write lease on ``ino``; return its expiry.

        Fails if another mount holds it, or if this mount's view of the file is
        older than the store's (it would write on stale reads). A newer version this
        mount committed itself is no stale view: it was based on everything before
        it, and this mount holds what it wrote. The view is older only because the
        caller read the file's record while that commit was still in flight (a
        WAL session's last close publishes the database while SQLite, holding its
        lock, already writes the next transaction's journal).
        """

        attempts: Attempts[float] = Attempts(self, f"lease of ino {ino}")
        reads = [attempts.read(), RangeRead.key(self.ks.lease(ino)),
                 RangeRead.last(self.ks.versions_upto(ALL_VERSIONS, "i", ino))]

        def fn(tr: Transaction) -> Outcome:
            call, lease, record_rows = tr.get_ranges(reads)
            landed = attempts.landed(call)
            if landed is not None:
                return landed
            now = time.time()
            if lease:
                held = Lease.unpack(lease[0][1])
                if held.owner != self.author and held.busy and held.live(now):
                    raise LeaseHeld(f"ino {ino} is being written by mount {held.owner} (lease until {held.expiry:.1f})")
            record = self._record(self._own_or_base(tr, record_rows, "i", ino))
            if record is not None and record.dver != view_dver and not self._written_here(tr, record.dver):
                # following up to the commit that made the view stale brings it up to date
                raise StaleView(f"ino {ino} changed in the store since this mount read it", record.dver)
            expiry = now + ttl
            tr.set(self.ks.lease(ino), Lease(self.author, expiry, busy=True).pack())
            self._log(tr, LogEntry(0, self.author, leases=((ino, self.author, expiry),)))
            return attempts.trying(tr, lambda version: expiry)

        return attempts.run(fn)

    def _written_here(self, tr: Transaction, version: int) -> bool:
        """Whether this mount committed ``version`` (its log entry's author)."""
        raw = tr.get(self.ks.log(version))
        return raw is not None and unpack(raw)[1] == self.author

    def renew_leases(
        self, inos: Iterable[int], ttl: float, wal: Iterable[tuple[int, bytes]] = ()
    ) -> tuple[list[int], list[tuple[int, bytes]]]:
        """Extend this mount's write leases on ``inos`` and its WAL ownerships ``wal``
        (no new version: only their holder's expiry moves); return those lost.

        Idempotent: run again after it landed, it finds the same records its own
        and moves their expiry once more."""
        inos, wal = list(inos), list(wal)

        def fn(tr: Transaction) -> tuple[list[int], list[tuple[int, bytes]]]:
            lost, lost_wal, expiry = [], [], time.time() + ttl
            for ino in inos:
                raw = tr.get(self.ks.lease(ino))
                lease = Lease.unpack(raw) if raw is not None else None
                if lease is None or lease.owner != self.author:
                    lost.append(ino)
                else:
                    tr.set(self.ks.lease(ino), Lease(self.author, expiry, lease.busy).pack())
            for parent, name in wal:
                key = self.ks.wal_owner(parent, name)
                raw = tr.get(key)
                if raw is None or Lease.unpack(raw).owner != self.author:
                    lost_wal.append((parent, name))
                else:
                    tr.set(key, Lease(self.author, expiry, True).pack())
            return lost, lost_wal

        return self._write(fn, "lease renewal")

    def want_lease(self, ino: int, wait: float) -> None:
        """Log that this mount waits for ``ino``'s lease: its holder then holds its own
        writers back once its transaction ends, so the lease changes hands (coherence/)."""

        def write(tr: Transaction) -> Callable[[int], None]:
            event = (ino, WANT + self.author, time.time() + wait)
            self._log(tr, LogEntry(0, self.author, leases=(event,)))
            return lambda version: None

        Attempts[None](self, f"lease wanted of ino {ino}").write_only(write)

    def lease(self, ino: int, idle: bool = False) -> Lease | None:
        """``ino``'s write lease, if a mount is writing it (an idle lease holds nobody
        back), or if a mount keeps it idle too (``idle``)."""
        value = self.store.transact(lambda tr: tr.get(self.ks.lease(ino)))
        lease = Lease.unpack(value) if value else None
        return lease if lease is not None and (lease.busy or idle) else None

    # -- WAL ownership: one mount at a time has a database in WAL mode ------------------
    # A lease record like the write lease's (owner, expiry), kept and renewed by the same
    # code (coherence/), but never taken away from a live owner: a WAL index (-shm) is
    # in one mount's memory, so a second mount's would not see the first one's frames.
    # No log entry and no new version: nobody follows it, a refusal reads it here.
    def acquire_wal(self, parent: int, name: bytes, ttl: float) -> WalGrant:
        """Make this mount the WAL owner of database ``name`` in ``parent``. Fails with
        WalHeld while another live mount owns it. The grant says what the database and
        its -wal are in the store now: the new owner must see exactly that.

        Idempotent: run again after it landed, it finds the record its own, writes
        it with a later expiry and reads the same files (the record keeps others'
        commits of them out)."""

        def fn(tr: Transaction) -> WalGrant:
            now = time.time()
            key = self.ks.wal_owner(parent, name)
            raw = tr.get(key)
            if raw is not None:
                held = Lease.unpack(raw)
                if held.owner != self.author and held.live(now):
                    raise WalHeld(parent, name, held)
            expiry = now + ttl
            tr.set(key, Lease(self.author, expiry, True).pack())
            last, files = 0, []
            for n in (name, name + b"-wal"):
                rows = tr.get_range(*self.ks.versions_upto(ALL_VERSIONS, "d", parent, n), limit=1, reverse=True)
                rows = self._own_or_base(tr, rows, "d", parent, n)
                if not rows:
                    files.append((n, None, 0))
                    continue
                last = max(last, self.ks.parts(rows[0][0])[-1])  # created or removed then
                if not rows[0][1]:
                    files.append((n, None, 0))
                    continue
                ino = unpack(rows[0][1])[0]
                recs = tr.get_range(*self.ks.versions_upto(ALL_VERSIONS, "i", ino), limit=1, reverse=True)
                recs = self._own_or_base(tr, recs, "i", ino)
                rec = self._record(recs)
                dver = rec.dver if rec is not None else 0
                if recs:  # its last change, data or attributes: a move of it still to come
                    last = max(last, self.ks.parts(recs[0][0])[-1])  # would run under the index
                files.append((n, ino, dver))
            return WalGrant(expiry, last, tuple(files))

        return self._write(fn, "WAL ownership")

    def wal_holder(self, parent: int, name: bytes) -> Lease | None:
        """The live mount other than this one that owns database ``name``'s WAL, if any."""
        raw = self.store.transact(lambda tr: tr.get(self.ks.wal_owner(parent, name)))
        held = Lease.unpack(raw) if raw is not None else None
        return held if held is not None and held.owner != self.author and held.live(time.time()) else None

    def release_wal(self, keys: Iterable[tuple[int, bytes]]) -> None:
        """End this mount's WAL ownership of ``keys`` (those still its own). Idempotent:
        run again after it landed, it finds them gone."""
        keys = list(keys)

        def fn(tr: Transaction) -> None:
            for parent, name in keys:
                key = self.ks.wal_owner(parent, name)
                raw = tr.get(key)
                if raw is not None and Lease.unpack(raw).owner == self.author:
                    tr.clear(key)

        self._write(fn, "WAL release")

    # -- staging: transactions bigger than one store transaction ------------------------
    def begin_staging(self, ino: int, mount_id: str) -> int:
        """Reserve a version for a big write of ``ino``; its blocks go there, invisible.

        The version is this transaction's versionstamp: later than every commit so
        far (so the blocks stay unseen at the file's data version), earlier than the
        commit that will publish them (whose data version then covers them).

        Run again after its commit landed (result unknown), it must not reserve a
        second version: the first would block every commit of the file until gc
        (``Attempts`` finds the one it reserved).
        """
        def write(tr: Transaction) -> Callable[[int], int]:
            self._set_stamped(tr, self.ks.staging(ino, STAMPED), pack((mount_id, time.time())))
            return lambda version: version

        return Attempts[int](self, "staging").write_only(write)

    def clear_calls(self, older_than: float, batch: int = 2000) -> int:
        """Remove the call keys (``Attempts``) written before unix time ``older_than``;
        return how many. Idempotent: a batch run again after it landed finds fewer."""
        begin, end = self.ks.children("call")
        removed = 0

        def fn(tr: Transaction) -> tuple[int, int, bytes]:
            rows = tr.get_range(begin, end, limit=batch)
            old = 0
            for key, value in rows:
                if unpack(value)[0] < older_than:
                    tr.clear(key)
                    old += 1
            return len(rows), old, rows[-1][0] + b"\x00" if rows else end

        while True:
            n, old, begin = self._write(fn, "call keys")
            removed += old
            if n < batch:
                return removed

    def stage_blocks(self, ino: int, version: int, blocks: dict[int, bytes], mount_id: str) -> None:
        """One store transaction's worth of staged blocks (the caller keeps it under the
        limits). Idempotent: run again after it landed, it writes the same keys."""

        def fn(tr: Transaction) -> None:
            if tr.get(self.ks.staging(ino, version)) is None:
                raise StaleWrite(f"staging of ino {ino} at version {version} was cleaned up by another mount")
            for block_no, value in blocks.items():
                tr.set(self.ks.block(ino, block_no, version), value)
                tr.set(self.ks.staged(ino, version, block_no), b"")
            tr.set(self.ks.staging(ino, version), pack((mount_id, time.time())))

        self._write(fn, f"staging of ino {ino}")

    def stagings(self) -> list[tuple[int, int, str, float]]:
        """Every staging in the volume: (ino, version, mount id, last heartbeat)."""

        def fn(tr: Transaction) -> list[tuple[int, int, str, float]]:
            out = []
            for key, value in tr.get_range(*self.ks.children("staging")):
                _, ino, version = self.ks.parts(key)
                owner, heartbeat = unpack(value)
                out.append((ino, version, owner, heartbeat))
            return out

        return self.store.transact(fn)

    def cleanup_staging(self, ino: int, version: int, batch: int = 2000) -> int:
        """Remove a staging that will never be published; return how many blocks it had.

        Idempotent: a batch run again after it landed finds its keys gone and goes
        on with the rest (the count then misses that batch: it is for log lines)."""
        removed = 0
        begin, end = self.ks.children("stg", ino, version)

        def fn(tr: Transaction) -> int:
            rows = tr.get_range(begin, end, limit=batch)
            for key, _ in rows:
                tr.clear(self.ks.block(ino, self.ks.parts(key)[-1], version))
                tr.clear(key)
            if len(rows) < batch:
                tr.clear(self.ks.staging(ino, version))
            return len(rows)

        while True:
            n = self._write(fn, f"cleanup of ino {ino}")
            removed += n
            if n < batch:
                return removed
