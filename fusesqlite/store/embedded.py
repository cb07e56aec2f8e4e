"""Embedded store: one SQLite database held to FoundationDB's transaction rules.

It exists so fusesqlite runs without a cluster, yet code tested against it
behaves the same on FoundationDB: the same limits fail the same way, conflicts
surface as ``ConflictError`` (which ``transact`` retries), and a transaction may
not outlive ``limits.transaction_seconds``.

Concurrency comes from SQLite itself: WAL mode lets readers run beside one
writer, across threads (one connection each) and processes (two daemons on one
directory). Transactions start with a deferred ``BEGIN`` so a read-only one is a
snapshot read; the first write takes the write lock, and SQLite refuses it
(``SQLITE_BUSY_SNAPSHOT``) when another writer committed since our snapshot --
FoundationDB's optimistic conflict, detected per database instead of per key.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from . import wakeups
from .base import (
    FDB_LIMITS,
    STAMP_BYTES,
    ConflictError,
    Limits,
    RangeRead,
    ReadView,
    Stamp,
    StoreError,
    StoreFull,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    get_ranges_one_by_one,
    limit_exceeded,
    log,
    run_with_retries,
)

T = TypeVar("T")

FILE_NAME = "store.sqlite"
#: how often ``wait_for_changes`` looks again where wake-ups cannot work (wakeups.py)
POLL_SECONDS = 0.01

#: a store is its owner's alone: whoever reads its files reads every file of every
#: volume, whatever the mounts' permissions say (README, Security). SQLite gives a
#: database's -wal, -shm and -journal the database file's own mode, so a private
#: store.sqlite keeps them private too, whatever the umask.
DIR_MODE = 0o700
FILE_MODE = 0o600
#: the option that lets a store others can read or write be opened all the same
ALLOW_SHARED_OPTION = "--allow-shared-store"

#: SQLite page size of a new store (an existing one keeps its own). In a WITHOUT ROWID
#: table a row keeps at most about a quarter of a page in its leaf and spills the rest
#: into overflow pages, so with 4 KiB pages every encoded 4 KiB block cost two page
#: reads (leaf and overflow) and two preads. From 32 KiB on a block fits in its leaf:
#: a cold scan reads the store ~40% faster and big transactions write less, at the
#: price of bigger WAL frames for small commits (docs/decisions/2026-11-24-store-pages-32k.md).
PAGE_SIZE = 32768

#: commits by ``transact_nowait`` between two checkpoints of the WAL. Its connection
#: never checkpoints (that is I/O its caller, an event loop, must not wait for): it
#: refuses the next attempt instead, and ``transact`` checkpoints after that commit,
#: so the WAL stays about as short as SQLite's 1,000-page auto-checkpoint keeps it
#: (a small commit writes 2-7 pages) and is overwritten rather than appended to.
CHECKPOINT_EVERY = 250

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"
#: the last versionstamp reserved (one row; ``EmbeddedStore._next_stamp``)
_STAMP_SCHEMA = "CREATE TABLE IF NOT EXISTS stamp(one INTEGER PRIMARY KEY CHECK (one = 0), last INTEGER NOT NULL)"
_STAMP_GET = "SELECT last FROM stamp WHERE one = 0"
_STAMP_SET = "INSERT OR REPLACE INTO stamp(one, last) VALUES (0, ?)"
#: versionstamps a store reserves at once: written to the stamp row once per this many
#: commits, not at every one (a 32 KiB page more in the WAL of each small commit:
#: measured 55 us of a 520 us commit)
STAMP_BLOCK = 1024
_GET = "SELECT v FROM kv WHERE k = ?"
_RANGE = "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k LIMIT ?"
_RANGE_REVERSE = "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k DESC LIMIT ?"
_SET = "INSERT OR REPLACE INTO kv(k, v) VALUES (?, ?)"
_CLEAR = "DELETE FROM kv WHERE k = ?"
_CLEAR_RANGE = "DELETE FROM kv WHERE k >= ? AND k < ?"

#: SQLite result codes meaning the store cannot be used at all (permissions, I/O, not a database)
_UNAVAILABLE = (
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_PERM",
    "SQLITE_AUTH",
    "SQLITE_NOTADB",
    "SQLITE_CORRUPT",
)
#: below this much free space an I/O error is taken for a full disk (SQLite reports some ENOSPC as IOERR)
_NEARLY_FULL_BYTES = 64 * 1024

_monotonic = time.monotonic


class StoreNotPrivate(StoreUnavailable):
    """An existing store that users other than its owner can read or write."""


def _conflict_range(key: bytes) -> int:
    """Bytes FoundationDB adds to a transaction's size for the write conflict range of a
    write to ``key`` (``key`` .. ``key + b"\\x00"``): its size counts mutations and conflict
    ranges alike. Read conflict ranges are not counted here (a snapshot read has none,
    and this store cannot tell them apart)."""
    return 2 * len(key) + 1


def _as_bytes(data: object) -> bytes:
    """Keys and values must be bytes: a ``str`` would be stored as TEXT and sort apart from BLOBs."""
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"store keys and values are bytes, not {type(data).__name__}")


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error as e:
        log.warning("event=store_close_failed error=%s", e)


class _Transaction:
    """One attempt of ``EmbeddedStore.transact``: checks FoundationDB's limits before SQLite sees anything."""

    __slots__ = ("_store", "_conn", "_limits", "_started", "_deadline", "_size", "_failure", "_stamped", "_stamp",
                 "_reservation")

    def __init__(self, store: EmbeddedStore, conn: sqlite3.Connection, started: float) -> None:
        self._store = store
        self._conn = conn
        self._limits = store.limits
        self._started = started
        self._deadline = started + store.limits.transaction_seconds
        self._size = 0
        #: a failed mutation fails the commit too, as FoundationDB defers such errors to commit
        self._failure: StoreError | None = None
        #: versionstamped sets, applied at commit once the stamp is known: (key, key
        #: offset or -1, value, value offset or -1), in the order made
        self._stamped: list[tuple[bytes, int, bytes, int]] = []
        #: the block of stamps this attempt reserves, if any (EmbeddedStore._next_stamp)
        self._reservation: tuple[int, int] | None = None
        self._stamp: Stamp | None = None

    @property
    def snapshot(self) -> ReadView:
        """The same reads: SQLite detects conflicts per database, so no read can be made conflict-free."""
        return self

    # reads

    def get(self, key: bytes) -> bytes | None:
        if len(key) > self._limits.key_bytes:
            raise limit_exceeded(self._limits, "key_bytes", len(key))
        if self._stamped:
            self._check_readable(key, key + b"\x00")
        if _monotonic() > self._deadline:
            raise self._too_old()
        try:
            row = self._conn.execute(_GET, (key,)).fetchone()
        except sqlite3.Error as e:
            raise self._store._error(e) from e
        return None if row is None else row[0]

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        if self._stamped:
            self._check_readable(begin, end)
        if _monotonic() > self._deadline:
            raise self._too_old()
        try:
            return self._conn.execute(
                _RANGE_REVERSE if reverse else _RANGE, (begin, end, limit if limit > 0 else -1)
            ).fetchall()
        except sqlite3.Error as e:
            raise self._store._error(e) from e

    def get_ranges(self, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
        return get_ranges_one_by_one(self, reads)

    # writes

    def set(self, key: bytes, value: bytes) -> None:
        key, value = self._checked(key, value)
        self._write(len(key) + len(value) + _conflict_range(key), _SET, (key, value))

    def _checked(self, key: bytes, value: bytes) -> tuple[bytes, bytes]:
        """``key`` and ``value`` as bytes, within the key and value limits."""
        if type(key) is not bytes:
            key = _as_bytes(key)
        if type(value) is not bytes:
            value = _as_bytes(value)
        limits = self._limits
        if len(key) > limits.key_bytes:
            self._fail(limit_exceeded(limits, "key_bytes", len(key)))
        if len(value) > limits.value_bytes:
            self._fail(limit_exceeded(limits, "value_bytes", len(value)))
        return key, value

    def clear(self, key: bytes) -> None:
        if len(key) > self._limits.key_bytes:
            self._fail(limit_exceeded(self._limits, "key_bytes", len(key)))
        self._write(len(key) + _conflict_range(key), _CLEAR, (key,))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        if begin > end:
            self._fail(StoreError(f"clear_range: begin {begin!r} is after end {end!r} (inverted range)"))
        self._write(2 * (len(begin) + len(end)), _CLEAR_RANGE, (begin, end))

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self._stamped_set(key, offset, value, -1)

    def set_versionstamped_value(self, key: bytes, value: bytes, offset: int) -> None:
        self._stamped_set(key, -1, value, offset)

    def _stamped_set(self, key: bytes, key_offset: int, value: bytes, value_offset: int) -> None:
        """Checked and counted now, written at commit (``_apply_stamped``)."""
        key, value = self._checked(key, value)
        self._check_stamp_offset(key if key_offset >= 0 else value, max(key_offset, value_offset))
        self._count(len(key) + len(value) + _conflict_range(key))
        self._stamped.append((key, key_offset, value, value_offset))

    def versionstamp(self) -> Stamp:
        if self._stamp is None:
            self._stamp = Stamp()
        return self._stamp

    def _check_stamp_offset(self, data: bytes, offset: int) -> None:
        if not 0 <= offset <= len(data) - STAMP_BYTES:
            self._fail(StoreError(f"versionstamp offset {offset} outside the {len(data)} bytes it goes into"))

    def _check_readable(self, begin: bytes, end: bytes) -> None:
        """FoundationDB refuses to read what a versionstamped set of the same transaction
        may have written (its key or value is not known before the commit): so does this
        store. A stamped key stands for every key with its bytes before the stamp."""
        for key, key_offset, _, _ in self._stamped:
            low, high = (key, key + b"\x00") if key_offset < 0 else (key[:key_offset], key[:key_offset] + b"\xff" * 11)
            if low < end and begin < high:
                raise StoreError(
                    f"read of {begin!r}..{end!r} covers a versionstamped key written in the same transaction "
                    "(FoundationDB: accessed_unreadable)"
                )

    def _apply_stamped(self) -> None:
        """At commit: take the next versionstamp, and put it into the stamped sets."""
        if not self._stamped and (self._stamp is None or not self._size):
            return  # nothing stamped, and no stamp asked for or nothing written (no commit: no stamp)
        try:
            number, self._reservation = self._store._next_stamp(self._conn)
            stamp = number.to_bytes(STAMP_BYTES, "big")
            self._conn.executemany(_SET, [
                (key if k < 0 else key[:k] + stamp + key[k + STAMP_BYTES :],
                 value if v < 0 else value[:v] + stamp + value[v + STAMP_BYTES :])
                for key, k, value, v in self._stamped
            ])
        except sqlite3.Error as e:
            raise self._store._error(e) from e
        if self._stamp is not None:
            self._stamp.value = stamp

    def _count(self, size: int) -> None:
        """Add ``size`` bytes to the transaction, within its size and age limits."""
        self._size += size
        if self._size > self._limits.transaction_bytes:
            self._fail(limit_exceeded(self._limits, "transaction_bytes", self._size))
        if _monotonic() > self._deadline:
            raise self._too_old()

    def _write(self, size: int, sql: str, args: tuple[bytes, ...]) -> None:
        self._count(size)
        try:
            self._conn.execute(sql, args)
        except sqlite3.Error as e:
            self._fail(self._store._error(e))

    # commit

    def _check_commit(self) -> None:
        """Refuse to commit what FoundationDB would refuse: a failed mutation or an expired transaction."""
        if self._failure is not None:
            raise self._failure
        if _monotonic() > self._deadline:
            raise self._too_old()

    def _fail(self, error: StoreError) -> NoReturn:
        self._failure = error
        raise error

    def _too_old(self) -> TransactionTooOld:
        return TransactionTooOld(
            f"transaction is {_monotonic() - self._started:.2f} s old, over "
            f"limits.transaction_seconds = {self._limits.transaction_seconds} s (FoundationDB's limit)"
        )


class EmbeddedStore:
    """The store in directory ``path`` (created on first use) as ``path/store.sqlite``.

    ``retry_limit`` counts retries after the first attempt, like FoundationDB's option.
    A new store is private to its owner (``DIR_MODE``, ``FILE_MODE``); an existing
    one that other users can read or write is refused (``StoreNotPrivate``) unless
    ``allow_shared`` says its owner means it.
    """

    def __init__(
        self, path: str | Path, limits: Limits = FDB_LIMITS, *, retry_limit: int = 50, allow_shared: bool = False
    ) -> None:
        self.path = Path(path).expanduser()
        self.file = self.path / FILE_NAME
        self.limits = limits
        self.description = f"embedded store {self.path}"
        self._attempts = retry_limit + 1
        # a blind write waits this long for the write lock; longer would outlive the transaction anyway
        self._busy_timeout = limits.transaction_seconds
        self._lock = threading.Lock()
        #: this store's block of versionstamps: the next to give, the last reserved
        #: (``_next_stamp``); -1: none yet, so the first commit reserves one (stamps start at 1)
        self._stamp_next, self._stamp_reserved = 0, -1
        self._local = threading.local()
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._busy: set[sqlite3.Connection] = set()  # inside a transaction attempt right now
        self._nowait: sqlite3.Connection | None = None  # transact_nowait's: busy timeout 0
        self._nowait_commits = 0
        #: transact_nowait refused an attempt for it: transact checkpoints after its commit
        self._checkpoint_due = False
        #: ``wake`` was called: the wait under way, or the next, returns at once
        self._woken = threading.Event()
        self._closed = False
        self._make_directory()
        self._check_private(allow_shared)
        self._make_file()
        # connect now so a bad store fails at startup, not at the first file system request
        run_with_retries(self._connection, retry_limit=self._attempts, what=f"opening {self.description}")
        _open_stores.add(self)
        page_size = self._connection().execute("PRAGMA page_size").fetchone()[0]
        self._wakeups = wakeups.Wakeups(self.path, self.file)
        log.info("event=store_open backend=embedded path=%s page_size=%d", self.path, page_size)

    # Store protocol

    def transact(self, fn: Callable[[Transaction], T]) -> T:
        result = run_with_retries(
            lambda: self._attempt(fn), retry_limit=self._attempts, what=self.description
        )
        if self._checkpoint_due:
            self._checkpoint_due = False
            self._checkpoint(self._connection())
        return result

    def transact_nowait(self, fn: Callable[[Transaction], T]) -> T:
        """One attempt of ``transact`` that never waits: no busy wait, no retry, no checkpoint.

        Raises ``ConflictError`` when another writer holds the store or committed
        since this attempt's snapshot, and once every ``CHECKPOINT_EVERY`` commits
        (the WAL is due for a checkpoint); the caller then uses ``transact``. For a
        caller that must not block (an event loop committing small transactions
        itself, where handing them to a thread costs more:
        docs/decisions/2026-11-24-commit-on-a-worker-thread.md).
        Call it from one thread at a time.

        Why not a checkpoint on a thread of its own: it never catches up with an
        event loop committing without pause. Its passive checkpoint leaves the latest
        frames, so SQLite never starts the WAL over, and the WAL grows by every
        commit (208 KB for a small one) without end, each append's fdatasync also
        writing the new file size (measured: 700 µs a commit against 470;
        docs/decisions/2026-11-24-commit-on-a-worker-thread.md).
        """
        if self._closed:
            raise StoreUnavailable(f"{self.description} is closed")
        if self._nowait_commits >= CHECKPOINT_EVERY:
            self._nowait_commits = 0
            self._checkpoint_due = True
            raise ConflictError(f"{self.description}: the WAL is due for a checkpoint")
        conn = self._nowait
        if conn is None:
            conn = self._nowait = self._connect(busy_timeout=0.0)
            try:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            except sqlite3.Error as e:
                self._nowait = None
                _close_quietly(conn)
                raise self._error(e) from e
        result = self._attempt(fn, conn)
        self._nowait_commits += 1
        return result

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """A passive checkpoint right after a commit: with no other writer in between it
        copies every frame, and the next commit starts the WAL over."""
        try:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            log.debug("event=store_checkpoint path=%s frames=%d checkpointed=%d", self.path, frames, done)
        except sqlite3.Error as e:
            log.warning("event=store_checkpoint_failed path=%s error=%s", self.path, e)

    def wait_for_changes(self, olds: Mapping[bytes, bytes | None], timeout: float) -> dict[bytes, bytes | None]:
        """Woken by other processes' commits (wakeups.py), else polling: SQLite tells no one.

        Not by this store's own commits: its caller made them. Each wake-up reads
        every key, in one transaction. Listening already when called (an earlier
        wait), it waits before its first read: every commit since the caller read
        ``olds`` has sent a wake-up that is still queued."""
        deadline = _monotonic() + timeout
        w = self._wakeups
        keys = list(olds)
        read_first = not w.listening()
        read_at = _monotonic()
        while True:
            sock = w.listen()
            if read_first or sock is None:
                if sock is not None:
                    w.drain(sock)  # before the read: a commit after it still wakes us
                woken = self._woken.is_set()
                self._woken.clear()
                read_at = _monotonic()
                values = self.transact(lambda tr: {key: tr.get(key) for key in keys})
                remaining = deadline - _monotonic()
                if values != olds or remaining <= 0 or woken:
                    return values
            else:
                remaining = deadline - _monotonic()
            read_first = True
            if sock is None:
                self._woken.wait(min(POLL_SECONDS, remaining))
            else:
                w.wait(sock, min(wakeups.FALLBACK_SECONDS, remaining))
                # a burst of commits (another mount writing flat out) is read in batches
                pause = read_at + wakeups.COALESCE_SECONDS - _monotonic()
                if pause > 0:
                    time.sleep(min(pause, max(0.0, deadline - _monotonic())))

    def wake(self) -> None:
        self._woken.set()
        self._wakeups.wake_self()

    #: free pages given back per transaction by ``compact`` (32 KiB each: 64 MiB)
    COMPACT_STEP = 2048
    #: times ``compact`` tries to truncate the WAL, 0.2 s apart
    TRUNCATE_TRIES = 25

    def disk_space(self) -> tuple[int, int] | None:
        usage = shutil.disk_usage(self.path)
        return usage.total, usage.free

    def compact(self, full: bool) -> str | None:
        """Give the pages gc freed back to the file system: in steps of COMPACT_STEP pages
        (``PRAGMA incremental_vacuum``, each step a short write transaction, so mounts
        go on), then truncate the WAL. That leaves the pages that held old versions
        among kept ones partly empty (new versions of those keys fill them again);
        ``full`` rewrites the store instead (one VACUUM: every other process's commits
        wait meanwhile), which packs them. A store made without auto_vacuum (before it
        was set at creation) keeps its free pages for new data unless ``full``."""
        conn = self._connection()

        def size() -> int:
            return sum(os.path.getsize(p) for p in (self.file, Path(f"{self.file}-wal")) if os.path.exists(p))

        try:
            before = size()
            freed = conn.execute("PRAGMA freelist_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
            if full:
                conn.execute("VACUUM")
            elif conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
                while conn.execute("PRAGMA freelist_count").fetchone()[0] > 0:
                    conn.execute(f"PRAGMA incremental_vacuum({self.COMPACT_STEP})").fetchall()
            elif freed:
                return (f"{self.path}: {freed >> 20} MiB free inside the store, reused by new data; "
                        "give it back with gc --vacuum while nothing else uses the store")
            # a mount's read transaction keeps the WAL's frames in use: try again a few
            # times (after a VACUUM the WAL holds a copy of the whole store)
            for _ in range(self.TRUNCATE_TRIES):
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    break
                time.sleep(0.2)
        except sqlite3.Error as e:
            raise self._error(e) from e
        after = size()
        log.info("event=store_compacted path=%s bytes_before=%d bytes_after=%d", self.path, before, after)
        return f"{self.path}: {before >> 20} MiB on disk before, {after >> 20} MiB after"

    def close(self) -> None:
        """Close every thread's connection. One a thread is using right now (a poll the
        mount abandoned when it stopped) is closed by that thread when its transaction
        ends: closing a sqlite3 connection under a running statement can crash the process."""
        with self._lock:
            self._closed = True
            conns = [c for c in self._conns.values() if c not in self._busy]
            if self._nowait is not None and self._nowait not in self._busy:
                conns.append(self._nowait)
            self._nowait = None
            self._conns.clear()
            self._local = threading.local()
        for conn in conns:
            _close_quietly(conn)
        self._wakeups.close()
        _open_stores.discard(self)

    # versionstamps

    def _next_stamp(self, conn: sqlite3.Connection) -> tuple[int, tuple[int, int] | None]:
        """The versionstamp of the transaction on ``conn``, which is about to commit, and
        the block of stamps it reserves, if it reserves one: ``(next stamp, last stamp)``,
        this store's to hand out once the transaction has committed (``_reserved``).

        Stamps are handed out from a block this store reserved in the stamp row, as long
        as that row still holds this store's reservation: then no other process has
        committed a stamp since the block began, so every stamp of the block is greater
        than every stamp committed before. Otherwise (another process reserved a block,
        or this one's is used up) the transaction reserves the next block, writing the
        row. The row is read here, so the transaction's snapshot is older than the
        stamp it takes: a transaction that commits before it (with a smaller stamp from
        this block, or any from another) makes SQLite refuse its write
        (SQLITE_BUSY_SNAPSHOT), and its retry takes a greater one.

        A reservation counts only once committed: two processes reading the same row
        both write the same next value, and the one refused must not take the row,
        written by the other, for its own (both would hand out one block's stamps).
        """
        row = conn.execute(_STAMP_GET).fetchone()
        persisted = row[0] if row else 0
        with self._lock:
            if persisted == self._stamp_reserved and self._stamp_next <= persisted:
                stamp, self._stamp_next = self._stamp_next, self._stamp_next + 1
                return stamp, None
        stamp = persisted + 1
        conn.execute(_STAMP_SET, (persisted + STAMP_BLOCK,))
        return stamp, (stamp + 1, persisted + STAMP_BLOCK)

    def _reserved(self, block: tuple[int, int]) -> None:
        """A transaction that reserved ``block`` of stamps committed: hand them out from now
        on, unless a later reservation of this store committed meanwhile (another thread)."""
        with self._lock:
            if block[1] > self._stamp_reserved:
                self._stamp_next, self._stamp_reserved = block

    # transactions

    def _attempt(self, fn: Callable[[Transaction], T], conn: sqlite3.Connection | None = None) -> T:
        if conn is None:
            conn = self._connection()
        with self._lock:
            self._busy.add(conn)
        try:
            return self._attempt_on(conn, fn)
        finally:
            with self._lock:
                self._busy.discard(conn)
                closed = self._closed
            if closed:  # close() left it to this thread
                _close_quietly(conn)

    def _attempt_on(self, conn: sqlite3.Connection, fn: Callable[[Transaction], T]) -> T:
        tr = _Transaction(self, conn, _monotonic())
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            result = fn(tr)
            tr._check_commit()
            tr._apply_stamped()
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._error(e) from e
        except BaseException:
            self._rollback(conn)
            raise
        if tr._reservation is not None:
            self._reserved(tr._reservation)
        if tr._size:
            self._wakeups.notify()
        return result

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:  # SQLite already rolled back (e.g. after SQLITE_FULL)
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            # the connection's state is unknown: drop it so this thread gets a fresh one
            log.warning("event=store_rollback_failed path=%s error=%s", self.path, e)
            self._forget(conn)

    def _error(self, e: sqlite3.Error) -> StoreError:
        """Translate a SQLite error into the store's errors (their messages name the store)."""
        if self._closed:
            return StoreUnavailable(f"{self.description} is closed")
        name = getattr(e, "sqlite_errorname", None) or type(e).__name__
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return ConflictError(f"{self.description}: another writer got in first ({name}: {e})")
        if name == "SQLITE_FULL" or (name.startswith("SQLITE_IOERR") and self._nearly_full()):
            return StoreFull(f"{self.description}: no space left on the disk holding {self.file} ({name}: {e})")
        if name.startswith(_UNAVAILABLE):
            return StoreUnavailable(f"{self.description}: cannot use {self.file} ({name}: {e})")
        return StoreError(f"{self.description}: {name}: {e}")

    def _nearly_full(self) -> bool:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES

    # connections: one per thread, since a sqlite3 connection holds one transaction at a time

    def _connection(self) -> sqlite3.Connection:
        try:
            return self._local.conn
        except AttributeError:
            return self._open_connection()

    def _open_connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable(f"{self.description} is closed")
        conn = self._connect()  # outside the lock: it may wait for another process's lock
        with self._lock:
            if self._closed:
                _close_quietly(conn)
                raise StoreUnavailable(f"{self.description} is closed")
            for thread in [t for t in self._conns if not t.is_alive()]:
                _close_quietly(self._conns.pop(thread))  # threads that ended keep no connection open
            self._conns[threading.current_thread()] = conn
            self._local.conn = conn
        return conn

    def _connect(self, busy_timeout: float | None = None) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.file,
                timeout=self._busy_timeout if busy_timeout is None else busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # close() runs on another thread
            )
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before WAL mode: a no-op on an existing store
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                # a new store: pages gc frees can be given back (``compact``). Only then:
                # on an existing store the pragma waits for the write lock, and a thread's
                # first transaction would wait behind another process's commit
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreUnavailable(
                    f"{self.description}: SQLite cannot use WAL mode for {self.file} (got {mode!r});"
                    " the file system must support shared memory (mmap)"
                )
            conn.execute("PRAGMA synchronous=FULL")  # a committed transaction survives a host crash
            conn.execute(_SCHEMA)
            conn.execute(_STAMP_SCHEMA)
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from e
            raise
        return conn

    def _forget(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            for thread, c in list(self._conns.items()):
                if c is conn:
                    del self._conns[thread]
            if getattr(self._local, "conn", None) is conn:
                del self._local.conn
            if self._nowait is conn:
                self._nowait = None
        _close_quietly(conn)

    def _make_directory(self) -> None:
        """Create the store directory, 0700 whatever the umask. Its parents (say
        ~/.local/share) are the umask's business. An existing empty directory is
        becoming a store (``mkdir`` then ``--store``): it is made private too."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.path.mkdir(mode=DIR_MODE)  # the umask can only take bits away: never wider than 0700
                created = True
            except FileExistsError:
                if not self.path.is_dir():
                    raise
                with os.scandir(self.path) as entries:
                    created = next(entries, None) is None
            if created:
                os.chmod(self.path, DIR_MODE)
        except OSError as e:
            if isinstance(e, PermissionError) and self.path.is_dir():
                pass  # someone else's empty directory: _check_private judges its mode
            else:
                raise StoreUnavailable(
                    f"cannot create store directory {self.path}: {e.strerror or e}"
                ) from e
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreUnavailable(
                f"store directory {self.path} is not writable (read-only file system or permissions)"
            )

    def _make_file(self) -> None:
        """Create ``store.sqlite`` 0600 before SQLite does (SQLite's own default is 0644
        less the umask); SQLite then creates -wal and -shm with the same mode."""
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        except FileExistsError:
            return
        except OSError as e:
            raise StoreUnavailable(f"cannot create {self.file}: {e.strerror or e}") from e
        try:
            os.fchmod(fd, FILE_MODE)  # exactly 0600: a umask such as 0277 would leave the owner unable to write
        finally:
            os.close(fd)

    def exposed(self) -> list[tuple[Path, int]]:
        """The store's own paths that users other than its owner can read, write or
        enter, with their permission bits: the directory, the database and its SQLite
        companions, the wake-up directory (whose entries are empty files, names only)."""
        found = []
        for p in (
            self.path,
            self.file,
            self.file.with_name(FILE_NAME + "-wal"),
            self.file.with_name(FILE_NAME + "-shm"),
            self.file.with_name(FILE_NAME + "-journal"),
            self.path / wakeups.DIR_NAME,
        ):
            try:
                mode = stat.S_IMODE(os.stat(p).st_mode)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreUnavailable(f"cannot check the permissions of {p}: {e.strerror or e}") from e
            if mode & 0o077:
                found.append((p, mode))
        return found

    def _check_private(self, allow_shared: bool) -> None:
        exposed = self.exposed()
        if not exposed:
            return
        p, mode = exposed[0]
        if allow_shared:
            log.warning(
                "event=store_shared path=%s mode=%04o paths_open_to_others=%d allowed_by=%s",
                p, mode, len(exposed), ALLOW_SHARED_OPTION,
            )
            return
        raise StoreNotPrivate(
            f"store {self.path} is open to other users ({p} has mode {mode:04o}), and whoever reads the store"
            f" reads every file of every volume; make it private with: chmod -R go-rwx {shlex.quote(str(self.path))}"
            f" (or pass {ALLOW_SHARED_OPTION} if it is shared on purpose)"
        )

    def _after_fork(self) -> None:
        """A child must not use its parent's SQLite connections (SQLite forbids it): start afresh."""
        self._lock = threading.Lock()
        self._stamp_next, self._stamp_reserved = 0, -1  # the parent's block is the parent's
        self._local = threading.local()
        self._conns = {}
        self._busy = set()
        self._nowait = None
        self._checkpoint_due = False
        self._wakeups = wakeups.Wakeups(self.path, self.file)  # the parent's socket and name stay the parent's


_open_stores: weakref.WeakSet[EmbeddedStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
