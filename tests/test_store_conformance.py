"""One conformance suite for every store backend: they must all behave like FoundationDB.

The embedded backend always runs. FoundationDB runs when FDB_CLUSTER_FILE names
a reachable cluster; its tests work under a unique key prefix cleared afterwards.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fusesqlite.store import (
    FDB_LIMITS,
    STAMP_BYTES,
    EmbeddedStore,
    FoundationDBStore,
    LimitExceeded,
    Limits,
    RangeRead,
    Stamp,
    Store,
    StoreError,
    StoreFull,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    open_store,
)
from fusesqlite.store.embedded import _SCHEMA, PAGE_SIZE

pytestmark = pytest.mark.timeout(120)

CLUSTER_FILE = os.environ.get("FDB_CLUSTER_FILE")


@functools.cache
def fdb_skip_reason() -> str | None:
    """Why the FoundationDB backend cannot be tested here, or None when it can."""
    if not CLUSTER_FILE:
        return "FDB_CLUSTER_FILE not set: FoundationDB backend not tested here"
    try:
        store = FoundationDBStore(CLUSTER_FILE, timeout=5.0)
        store.transact(lambda tr: tr.get(b"fusesqlite-test/probe"))
    except StoreError as e:
        return f"FoundationDB cluster {CLUSTER_FILE} not reachable: {e}"
    return None


def libfdb_c_present() -> bool:
    if ctypes.util.find_library("fdb_c"):
        return True
    try:
        ctypes.CDLL("libfdb_c.so")
    except OSError:
        return False
    return True


class Backend:
    """A backend under test: opens stores on one data set, with this test's keys under ``prefix``."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.directory = tmp_path / "store"
        self.prefix = b"fusesqlite-test/" + uuid.uuid4().hex.encode() + b"/"
        self._stores: list[Store] = []
        #: limits whose transaction_seconds a test can outlive by sleeping
        self.slow_limits = Limits(transaction_seconds=0.2) if name == "embedded" else FDB_LIMITS

    def open(self, limits: Limits = FDB_LIMITS, **options: object) -> Store:
        store: Store
        if self.name == "embedded":
            store = EmbeddedStore(self.directory, limits, **options)  # type: ignore[arg-type]
        else:
            store = FoundationDBStore(CLUSTER_FILE, limits, **options)  # type: ignore[arg-type]
        self._stores.append(store)
        return store

    def key(self, name: bytes) -> bytes:
        return self.prefix + name

    def get(self, store: Store, name: bytes) -> bytes | None:
        return store.transact(lambda tr: tr.get(self.key(name)))

    def all_pairs(self, store: Store) -> list[tuple[bytes, bytes]]:
        return store.transact(lambda tr: tr.get_range(self.prefix, self.prefix + b"\xff"))

    def cleanup(self) -> None:
        try:
            if self.name == "foundationdb":
                self.open().transact(lambda tr: tr.clear_range(self.prefix, self.prefix + b"\xff"))
        finally:
            for store in self._stores:
                store.close()


@pytest.fixture(params=["embedded", "foundationdb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "foundationdb" and (reason := fdb_skip_reason()):
        pytest.skip(reason)
    b = Backend(request.param, tmp_path)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def increment(tr: Transaction, key: bytes) -> None:
    """The read-modify-write every concurrency test repeats; lost updates show in the total."""
    tr.set(key, str(int(tr.get(key) or b"0") + 1).encode())


# basic operations


def test_set_get_clear(store: Store, backend: Backend) -> None:
    k = backend.key(b"k")
    store.transact(lambda tr: tr.set(k, b"v1"))
    assert backend.get(store, b"k") == b"v1"
    store.transact(lambda tr: tr.set(k, b"v2"))
    assert backend.get(store, b"k") == b"v2"
    store.transact(lambda tr: tr.clear(k))
    assert backend.get(store, b"k") is None
    store.transact(lambda tr: tr.set(k, b""))  # an empty value is a value, not absence
    assert backend.get(store, b"k") == b""


def test_missing_key_is_none(store: Store, backend: Backend) -> None:
    assert backend.get(store, b"never-written") is None
    store.transact(lambda tr: tr.clear(backend.key(b"never-written")))  # clearing nothing is fine


def test_committed_data_seen_by_a_new_store(store: Store, backend: Backend) -> None:
    store.transact(lambda tr: tr.set(backend.key(b"k"), b"kept"))
    store.close()
    assert backend.get(backend.open(), b"k") == b"kept"


# ranges

NAMES = [b"\x00", b"a", b"a\x00", b"ab", b"b", b"\xfe\xff"]  # memcmp order, not length or text order


def test_get_range_order_bounds_limit_reverse(store: Store, backend: Backend) -> None:
    def fill(tr: Transaction) -> None:
        for name in reversed(NAMES):
            tr.set(backend.key(name), name + b"!")

    store.transact(fill)
    pairs = [(backend.key(n), n + b"!") for n in NAMES]
    k = backend.key

    def ranges(tr: Transaction) -> dict[str, list[tuple[bytes, bytes]]]:
        return {
            "all": tr.get_range(k(b""), k(b"\xff")),
            "a..b": tr.get_range(k(b"a"), k(b"b")),  # begin inclusive, end exclusive
            "limit": tr.get_range(k(b""), k(b"\xff"), limit=2),
            "reverse": tr.get_range(k(b""), k(b"\xff"), reverse=True),
            "reverse limit": tr.get_range(k(b"a"), k(b"b"), limit=2, reverse=True),
            "empty": tr.get_range(k(b"a"), k(b"a")),
            "snapshot": tr.snapshot.get_range(k(b"a"), k(b"b")),
        }

    got = store.transact(ranges)
    assert got["all"] == pairs
    assert got["a..b"] == pairs[1:4]
    assert got["limit"] == pairs[:2]
    assert got["reverse"] == pairs[::-1]
    assert got["reverse limit"] == [pairs[3], pairs[2]]
    assert got["empty"] == []
    assert got["snapshot"] == pairs[1:4]


def test_get_ranges_answers_each_read_as_get_range(store: Store, backend: Backend) -> None:
    """``get_ranges`` (several reads in one round trip) answers each read as ``get_range``
    would, in the order asked, in the transaction and through its snapshot."""
    k = backend.key
    store.transact(lambda tr: [tr.set(k(name), name + b"!") for name in NAMES])
    reads = [
        RangeRead(k(b""), k(b"\xff")),
        RangeRead(k(b"a"), k(b"b"), 2, True),
        RangeRead.key(k(b"ab")),
        RangeRead.key(k(b"never-written")),
        RangeRead.last((k(b"a"), k(b"b"))),
        RangeRead(k(b"a"), k(b"a")),
    ]

    def both(tr: Transaction) -> tuple[list, list, list]:
        one_by_one = [tr.get_range(r.begin, r.end, limit=r.limit, reverse=r.reverse) for r in reads]
        return tr.get_ranges(reads), tr.snapshot.get_ranges(reads), one_by_one

    at_once, snapshot, one_by_one = store.transact(both)
    assert at_once == snapshot == one_by_one
    assert at_once[2] == [(k(b"ab"), b"ab!")] and at_once[3] == [] and at_once[4] == [(k(b"ab"), b"ab!")]
    assert store.transact(lambda tr: tr.get_ranges([])) == []


# versionstamps


def _stamped(tr: Transaction, k: Callable[[bytes], bytes], name: bytes) -> Stamp:
    """A key ``name`` + stamp + b"/end", and a value with the stamp inside, in one transaction."""
    placeholder = bytes(STAMP_BYTES)
    key = k(name) + placeholder + b"/end"
    tr.set_versionstamped_key(key, len(k(name)), b"v")
    tr.set_versionstamped_value(k(name + b"-value"), b"<" + placeholder + b">", 1)
    return tr.versionstamp()


def test_versionstamps_fill_keys_and_values_and_grow_with_each_commit(store: Store, backend: Backend) -> None:
    k = backend.key
    stamps = [store.transact(lambda tr: _stamped(tr, k, b"s")).known() for _ in range(3)]
    assert all(len(s) == STAMP_BYTES for s in stamps) and stamps[0] != bytes(STAMP_BYTES)
    assert stamps == sorted(stamps) and len(set(stamps)) == 3  # later commits, greater stamps
    other = backend.open()  # another client of the same data orders after them too
    assert store.transact(lambda tr: _stamped(tr, k, b"t")).known() > stamps[-1]
    rows = other.transact(lambda tr: tr.get_range(k(b"s"), k(b"s") + b"\xff"))
    assert rows == [(k(b"s") + s + b"/end", b"v") for s in stamps] + [(k(b"s-value"), b"<" + stamps[-1] + b">")]


def test_a_versionstamped_key_cannot_be_read_in_its_own_transaction(store: Store, backend: Backend) -> None:
    k = backend.key

    def read_back(tr: Transaction) -> None:
        _stamped(tr, k, b"r")
        tr.get_range(k(b"r"), k(b"r") + b"\xff")

    with pytest.raises(StoreError):
        store.transact(read_back)
    assert backend.all_pairs(store) == []


def test_a_transaction_that_writes_nothing_has_no_versionstamp(store: Store, backend: Backend) -> None:
    stamp = store.transact(lambda tr: (tr.get(backend.key(b"x")), tr.versionstamp())[1])
    assert stamp.value is None
    with pytest.raises(StoreError):
        stamp.known()


def test_clear_range(store: Store, backend: Backend) -> None:
    store.transact(lambda tr: [tr.set(backend.key(n), b"x") for n in NAMES])
    store.transact(lambda tr: tr.clear_range(backend.key(b"a"), backend.key(b"b")))
    assert [k for k, _ in backend.all_pairs(store)] == [backend.key(b"\x00"), backend.key(b"b"), backend.key(b"\xfe\xff")]


def test_inverted_clear_range_fails(store: Store, backend: Backend) -> None:
    store.transact(lambda tr: tr.set(backend.key(b"a"), b"x"))
    with pytest.raises(StoreError):
        store.transact(lambda tr: tr.clear_range(backend.key(b"b"), backend.key(b"a")))
    assert backend.get(store, b"a") == b"x"


# transactions


def test_read_your_writes(store: Store, backend: Backend) -> None:
    k = backend.key(b"k")
    store.transact(lambda tr: tr.set(k, b"before"))

    def fn(tr: Transaction) -> list[object]:
        seen: list[object] = [tr.get(k)]
        tr.set(k, b"mine")
        seen += [tr.get(k), tr.snapshot.get(k), tr.get_range(k, k + b"\x00")]
        tr.clear(k)
        seen.append(tr.get(k))
        tr.set(k, b"final")
        return seen

    assert store.transact(fn) == [b"before", b"mine", b"mine", [(k, b"mine")], None]
    assert backend.get(store, b"k") == b"final"


def test_exception_in_fn_commits_nothing(store: Store, backend: Backend) -> None:
    def fn(tr: Transaction) -> None:
        tr.set(backend.key(b"a"), b"1")
        tr.clear_range(backend.prefix, backend.prefix + b"\xff")
        tr.set(backend.key(b"b"), b"2")
        raise RuntimeError("boom")

    store.transact(lambda tr: tr.set(backend.key(b"kept"), b"yes"))
    with pytest.raises(RuntimeError, match="boom"):
        store.transact(fn)
    assert backend.all_pairs(store) == [(backend.key(b"kept"), b"yes")]


def test_conflicting_write_is_retried(store: Store, backend: Backend) -> None:
    """A write committed after this transaction read must make it run again (serializability)."""
    k = backend.key(b"counter")
    store.transact(lambda tr: tr.set(k, b"0"))
    seen: list[bytes | None] = []

    def fn(tr: Transaction) -> None:
        seen.append(tr.get(k))
        if len(seen) == 1:  # another writer commits between our read and our write
            other = threading.Thread(target=store.transact, args=(lambda t: t.set(k, b"10"),))
            other.start()
            other.join()
        increment(tr, k)

    store.transact(fn)
    assert seen == [b"0", b"10"]
    assert backend.get(store, b"counter") == b"11"


# limits


def test_key_limit(store: Store, backend: Backend) -> None:
    limit = store.limits.key_bytes
    at_limit = backend.key(b"k").ljust(limit, b"k")
    too_long = at_limit + b"k"
    store.transact(lambda tr: tr.set(at_limit, b"ok"))
    assert store.transact(lambda tr: tr.get(at_limit)) == b"ok"
    for op in (
        lambda tr: tr.set(too_long, b"x"),
        lambda tr: tr.get(too_long),
        lambda tr: tr.clear(too_long),
    ):
        with pytest.raises(LimitExceeded, match="key_bytes") as info:
            store.transact(lambda tr: (tr.set(backend.key(b"other"), b"x"), op(tr)))
        assert f"{limit + 1:,}" in str(info.value)
    assert backend.all_pairs(store) == [(at_limit, b"ok")]


def test_value_limit(store: Store, backend: Backend) -> None:
    limit = store.limits.value_bytes
    store.transact(lambda tr: tr.set(backend.key(b"max"), b"v" * limit))
    assert backend.get(store, b"max") == b"v" * limit
    with pytest.raises(LimitExceeded, match="value_bytes") as info:
        store.transact(lambda tr: tr.set(backend.key(b"big"), b"v" * (limit + 1)))
    assert f"{limit + 1:,}" in str(info.value)
    assert backend.get(store, b"big") is None


def test_swallowed_limit_error_still_fails_the_commit(store: Store, backend: Backend) -> None:
    """As in FoundationDB, a mutation that broke a limit fails the commit even if fn ignored it."""

    def fn(tr: Transaction) -> str:
        tr.set(backend.key(b"ok"), b"x")
        try:
            tr.set(backend.key(b"big"), b"v" * (store.limits.value_bytes + 1))
        except LimitExceeded:
            return "ignored"
        return "not raised"

    with pytest.raises(LimitExceeded, match="value_bytes"):
        store.transact(fn)
    assert backend.all_pairs(store) == []


def test_transaction_size_limit(store: Store, backend: Backend) -> None:
    limits = store.limits
    value = b"v" * limits.value_bytes
    fitting = limits.transaction_bytes // (limits.value_bytes + 1_000)  # room for keys and overhead

    def write(count: int) -> Callable[[Transaction], None]:
        def fn(tr: Transaction) -> None:
            tr.clear_range(backend.prefix, backend.prefix + b"\xff")
            for i in range(count):
                tr.set(backend.key(b"%04d" % i), value)

        return fn

    store.transact(write(fitting))
    assert len(backend.all_pairs(store)) == fitting
    with pytest.raises(LimitExceeded, match="transaction_bytes"):
        store.transact(write(fitting + 2))
    assert len(backend.all_pairs(store)) == fitting  # nothing of the failed transaction


def test_transaction_age_limit(backend: Backend) -> None:
    """A transaction older than transaction_seconds is retried, and fails when it always is."""
    limits = backend.slow_limits
    # FoundationDB's store bounds a whole call with its timeout: long enough for three slow attempts
    store = backend.open(limits, retry_limit=2, **({"timeout": 40.0} if backend.name == "foundationdb" else {}))
    k = backend.key(b"k")
    too_long = limits.transaction_seconds * 1.3 + 0.05
    attempts: list[int] = []

    def slow_once(tr: Transaction) -> None:
        attempts.append(1)
        tr.get(k)
        if len(attempts) == 1:
            time.sleep(too_long)
        tr.set(k, b"done")

    store.transact(slow_once)
    assert len(attempts) == 2
    assert backend.get(store, b"k") == b"done"

    attempts.clear()

    def always_slow(tr: Transaction) -> None:
        attempts.append(1)
        tr.get(k)
        time.sleep(too_long)
        tr.set(k, b"late")

    with pytest.raises(TransactionTooOld, match="transaction_seconds"):
        store.transact(always_slow)
    assert len(attempts) == 3  # the first attempt and retry_limit=2 retries
    assert backend.get(store, b"k") == b"done"


def test_a_timeout_that_cuts_short_the_retries_of_a_too_old_transaction_says_too_old(backend: Backend) -> None:
    """FoundationDB's store bounds a call with a timeout (10 s) that the 5 s transaction
    limit runs into: an always-too-slow transaction must be reported as too old, not as
    a cluster out of reach (error 1031), nor as a commit whose result is unknown."""
    if backend.name != "foundationdb":
        pytest.skip("the embedded store has no timeout beyond transaction_seconds")
    store = backend.open(FDB_LIMITS, timeout=8.0)
    k = backend.key(b"k")

    def always_slow(tr: Transaction) -> None:
        tr.get(k)
        time.sleep(FDB_LIMITS.transaction_seconds + 1.5)
        tr.set(k, b"late")

    with pytest.raises(TransactionTooOld, match="transaction_seconds"):
        store.transact(always_slow)
    assert backend.get(store, b"k") is None


# concurrency


def test_threads_incrementing_one_counter(store: Store, backend: Backend) -> None:
    k = backend.key(b"counter")
    threads_n, increments = 4, 50
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(increments):
                store.transact(lambda tr: increment(tr, k))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert backend.get(store, b"counter") == str(threads_n * increments).encode()


def _race_in_two_processes(target: Callable[..., None], *args: object) -> None:
    """``target(*args, start)`` in two processes at once (``start``: a barrier both wait
    at), which must both exit 0. Spawned: never fork a process holding SQLite connections."""
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    workers = [spawn.Process(target=target, args=(*args, start)) for _ in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0, 0]


def _increment_in_process(directory: str, key: bytes, count: int, start: multiprocessing.synchronize.Barrier) -> None:
    store = EmbeddedStore(directory)
    start.wait(30)  # both processes increment at the same time, not one after the other
    for _ in range(count):
        store.transact(lambda tr: increment(tr, key))
    store.close()


def test_processes_incrementing_one_counter(tmp_path: Path) -> None:
    """Two daemons may mount one embedded store: their transactions must serialize too."""
    directory, key, count = str(tmp_path / "store"), b"counter", 100
    EmbeddedStore(directory).close()  # created before the race, as a mounted store would be
    _race_in_two_processes(_increment_in_process, directory, key, count)
    store = EmbeddedStore(directory)
    try:
        assert store.transact(lambda tr: tr.get(key)) == str(2 * count).encode()
    finally:
        store.close()


def _stamped_increment(tr: Transaction, key: bytes) -> None:
    """Increment ``key`` and log its new value under a key ending in the commit's stamp."""
    n = int(tr.get(key) or b"0") + 1
    tr.set(key, str(n).encode())
    tr.set_versionstamped_key(b"log/" + bytes(STAMP_BYTES), 4, str(n).encode())


def _stamp_in_process(directory: str, count: int, threads: int, start: multiprocessing.synchronize.Barrier) -> None:
    store = EmbeddedStore(directory)
    start.wait(30)

    def run() -> None:
        for _ in range(count):
            store.transact(lambda tr: _stamped_increment(tr, b"counter"))

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    store.close()


def test_versionstamps_follow_commit_order_across_processes_and_threads(tmp_path: Path) -> None:
    """Each transaction increments one counter (so commits are serial) and logs the value
    at its stamp: in stamp order the values must be 1, 2, 3... The embedded store hands
    stamps out from blocks it reserves; two processes with two threads each, one of
    them restarted (a fresh block), must not break the order."""
    directory, count = str(tmp_path / "store"), 60
    EmbeddedStore(directory).close()
    for _ in range(2):
        _race_in_two_processes(_stamp_in_process, directory, count, 2)
    store = EmbeddedStore(directory)
    try:
        rows = store.transact(lambda tr: tr.get_range(b"log/", b"log0"))
    finally:
        store.close()
    assert [int(v) for _, v in rows] == list(range(1, 2 * 2 * 2 * count + 1))


def test_a_stamp_block_reserved_by_a_refused_commit_is_not_used(tmp_path: Path) -> None:
    """Two stores on one file (two processes) both reserve the next block of stamps; the
    one whose snapshot is older is refused (SQLITE_BUSY_SNAPSHOT) and retries. The row
    then holds the same value its own refused reservation wrote: had it kept that
    reservation, both would hand out stamps from one block, equal or out of commit
    order (seen: two mounts' commits of one file at one version, an update lost)."""
    directory = str(tmp_path / "store")
    first, second = EmbeddedStore(directory), EmbeddedStore(directory)
    stamps: list[bytes] = []

    def stamped(tr: Transaction, value: bytes) -> Stamp:
        # only stamped writes: the stamp row is the transaction's first write
        tr.set_versionstamped_key(b"log/" + bytes(STAMP_BYTES), 4, value)
        return tr.versionstamp()

    def commit(store: EmbeddedStore, value: bytes) -> None:
        stamps.append(store.transact(lambda tr: stamped(tr, value)).known())

    raced = []

    def second_txn(tr: Transaction) -> Stamp:
        tr.get(b"anything")  # the snapshot, older than the first store's commit below
        if not raced:
            raced.append(1)
            thread = threading.Thread(target=commit, args=(first, b"first-1"))
            thread.start()
            thread.join()
        return stamped(tr, b"second-1")

    try:
        stamps.append(second.transact(second_txn).known())
        for i in range(2, 5):
            commit(first, b"first-%d" % i)
            commit(second, b"second-%d" % i)
        rows = first.transact(lambda tr: tr.get_range(b"log/", b"log0"))
    finally:
        first.close()
        second.close()
    assert len(set(stamps)) == len(stamps), f"a stamp given twice: {stamps}"
    assert stamps == sorted(stamps), f"stamps out of commit order: {stamps}"
    assert [v for _, v in rows] == [b"first-1", b"second-1"] + [
        b"%s-%d" % (who, i) for i in range(2, 5) for who in (b"first", b"second")]


def _waited_for(store: Store, olds: dict[bytes, bytes | None], key: bytes, value: bytes) -> dict[bytes, bytes | None]:
    """``wait_for_changes(olds)`` while another thread sets ``key`` to ``value`` 0.2 s in;
    it must end within seconds."""

    def writer() -> None:
        time.sleep(0.2)
        store.transact(lambda tr: tr.set(key, value))

    thread = threading.Thread(target=writer)
    start = time.monotonic()
    thread.start()
    try:
        got = store.wait_for_changes(olds, timeout=10)
    finally:
        thread.join()
    assert time.monotonic() - start < 5
    return got


def test_wait_for_changes(store: Store, backend: Backend) -> None:
    k = backend.key(b"watched")
    store.transact(lambda tr: tr.set(k, b"old"))
    assert _waited_for(store, {k: b"old"}, k, b"new") == {k: b"new"}

    start = time.monotonic()
    assert store.wait_for_changes({k: b"new"}, timeout=0.3) == {k: b"new"}  # no change: the value at timeout
    assert 0.3 <= time.monotonic() - start < 3

    start = time.monotonic()
    assert store.wait_for_changes({k: None}, timeout=10) == {k: b"new"}  # already different: at once
    assert time.monotonic() - start < 1


def test_wait_for_changes_of_several_keys_ends_at_the_first(store: Store, backend: Backend) -> None:
    """Any one of the keys changing ends the wait, with every key's value then; a key
    nobody wrote waits as absent (None)."""
    a, b, c = (backend.key(x) for x in (b"a", b"b", b"c"))
    store.transact(lambda tr: (tr.set(a, b"1"), tr.set(b, b"1")))
    olds = {a: b"1", b: b"1", c: None}
    assert _waited_for(store, olds, c, b"made") == {a: b"1", b: b"1", c: b"made"}


def test_wake_ends_a_wait_at_once(store: Store, backend: Backend) -> None:
    """``wake`` ends the wait under way (its caller has other keys to wait for), and a
    wake with no wait under way ends the next one: none is lost between the two."""
    k = backend.key(b"quiet")
    waited: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        assert store.wait_for_changes({k: None}, timeout=20) == {k: None}
        waited.append(time.monotonic() - start)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    store.wake()
    thread.join(15)
    assert waited and waited[0] < 5, f"the wait did not end at wake: {waited}"

    store.wake()
    start = time.monotonic()
    assert store.wait_for_changes({k: None}, timeout=20) == {k: None}
    assert time.monotonic() - start < 5


WAKE_WRITER = r"""
import sys, time
from fusesqlite.store import EmbeddedStore
store = EmbeddedStore(sys.argv[1])
time.sleep(0.3)
store.transact(lambda tr: tr.set(sys.argv[2].encode(), b"new"))
store.close()
"""

WAITER = r"""
import sys
from fusesqlite.store import EmbeddedStore
store = EmbeddedStore(sys.argv[1])
store.wait_for_changes({b"nothing-writes-this": None}, timeout=600)
"""


def test_embedded_waiter_is_woken_by_another_process_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's commit wakes a waiting embedded store (wakeups.py); before, it
    was seen at the next 10 ms poll. With the fallback poll pushed out of reach, only
    the wake-up can end the wait before its timeout."""
    monkeypatch.setattr("fusesqlite.store.wakeups.FALLBACK_SECONDS", 60.0)
    store = EmbeddedStore(tmp_path / "store")
    try:
        store.transact(lambda tr: tr.set(b"watched", b"old"))
        writer = subprocess.Popen([sys.executable, "-c", WAKE_WRITER, str(tmp_path / "store"), "watched"])
        try:
            start = time.monotonic()
            assert store.wait_for_changes({b"watched": b"old"}, timeout=30) == {b"watched": b"new"}
            assert time.monotonic() - start < 15, "not woken: the wait ran to its timeout"
        finally:
            assert writer.wait(30) == 0
    finally:
        store.close()
    assert not list((tmp_path / "store" / "watchers").iterdir()), "a closed store left its name listed"


def test_embedded_store_forgets_a_killed_waiter(tmp_path: Path) -> None:
    """A waiter killed with -9 leaves its name listed; the next commit that tries to wake
    it finds its socket gone and removes the name."""
    directory = tmp_path / "store"
    EmbeddedStore(directory).close()
    waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(directory)])
    try:
        deadline = time.monotonic() + 30
        while not (directory / "watchers").exists() or not list((directory / "watchers").iterdir()):
            assert time.monotonic() < deadline, "the waiter never listed itself"
            assert waiter.poll() is None, "the waiter died"
            time.sleep(0.05)
    finally:
        waiter.kill()
        waiter.wait()
    store = EmbeddedStore(directory)
    try:
        store.transact(lambda tr: tr.set(b"k", b"v"))
        assert not list((directory / "watchers").iterdir())
    finally:
        store.close()


def test_embedded_waiter_lists_itself_again_if_its_name_went(tmp_path: Path) -> None:
    """A sender that cannot reach a waiter's socket (another network namespace: abstract
    sockets are per namespace) removes its name as a dead one's; the waiter, alive, lists
    itself again within a second or so, and is woken again from then on."""
    store = EmbeddedStore(tmp_path / "store")
    watchers = tmp_path / "store" / "watchers"
    waiter = threading.Thread(target=store.wait_for_changes, args=({b"unchanged": None}, 4.0))
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        while not watchers.exists() or not list(watchers.iterdir()):
            assert time.monotonic() < deadline, "the waiter never listed itself"
            time.sleep(0.05)
        (name,) = list(watchers.iterdir())
        name.unlink()
        deadline = time.monotonic() + 3
        while not name.exists():
            assert time.monotonic() < deadline, "the waiter did not list itself again"
            time.sleep(0.05)
    finally:
        waiter.join()
        store.close()


# failures of the embedded store's disk


@contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at ``mountpoint``: a real disk that fills up or refuses writes."""
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_store_full_then_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=1m") as mnt:
        ballast = mnt / "ballast"
        ballast.write_bytes(os.urandom(256 * 1024))
        store = EmbeddedStore(mnt / "store")
        try:
            value = os.urandom(50_000)
            written: list[bytes] = []
            with pytest.raises(StoreFull) as info:
                for i in range(100):  # 5 MB: more than the disk holds
                    key = b"fill/%03d" % i
                    store.transact(lambda tr: tr.set(key, value))
                    written.append(key)
            assert str(mnt / "store") in str(info.value)
            assert written, "the disk filled before the first write"
            # what was committed is still there and readable
            assert store.transact(lambda tr: [tr.get(k) for k in written]) == [value] * len(written)
            ballast.unlink()  # the administrator frees space
            store.transact(lambda tr: tr.set(b"small", b"s" * 1000))
            assert store.transact(lambda tr: tr.get(b"small")) == b"s" * 1000
            assert store.transact(lambda tr: tr.get(written[-1])) == value
        finally:
            store.close()


def test_unavailable_under_a_regular_file(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_bytes(b"not a directory")
    with pytest.raises(StoreUnavailable, match=str(regular / "store")):
        EmbeddedStore(regular / "store")


def test_unavailable_on_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        with pytest.raises(StoreUnavailable, match=str(mnt / "store")):
            EmbeddedStore(mnt / "store")
    with tmpfs(tmp_path / "rw", "size=1m") as mnt:
        store = EmbeddedStore(mnt / "store")
        store.transact(lambda tr: tr.set(b"k", b"v"))
        store.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StoreUnavailable, match="not writable"):
            EmbeddedStore(mnt / "store")


def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "store")
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.transact(lambda tr: tr.get(b"k"))


def _sqlite_pages(store_dir: Path) -> tuple[int, int]:
    """(page size, pages in use) of an embedded store's file, checkpointed."""
    con = sqlite3.connect(store_dir / "store.sqlite")
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        used = con.execute("PRAGMA page_count").fetchone()[0] - con.execute("PRAGMA freelist_count").fetchone()[0]
        return page_size, used
    finally:
        con.close()


def test_a_new_store_keeps_block_sized_values_in_their_leaf_pages(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "store")
    try:
        value = os.urandom(4096 + 24)  # an encoded, incompressible 4 KiB block
        store.transact(lambda tr: [tr.set(b"b/%04d" % i, value) for i in range(200)])
    finally:
        store.close()
    page_size, used = _sqlite_pages(tmp_path / "store")
    assert page_size == PAGE_SIZE
    # in leaf pages the 200 values need 200 * 4120 / 32768 = 25 pages plus slack;
    # spilled into overflow pages they would need at least one page each
    assert used < 60, f"{used} pages of {page_size} bytes for 200 values of {len(value)} bytes"


def test_an_existing_store_keeps_its_page_size(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir(mode=0o700)
    (tmp_path / "store" / "store.sqlite").touch(mode=0o600)  # private, as a store it made
    con = sqlite3.connect(tmp_path / "store" / "store.sqlite")
    con.execute("PRAGMA page_size=4096")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(_SCHEMA)
    con.execute("INSERT INTO kv VALUES (?, ?)", (b"old", b"value"))
    con.commit()
    con.close()
    store = EmbeddedStore(tmp_path / "store")
    try:
        assert store.transact(lambda tr: tr.get(b"old")) == b"value"
        store.transact(lambda tr: tr.set(b"new", os.urandom(5000)))
    finally:
        store.close()
    assert _sqlite_pages(tmp_path / "store")[0] == 4096


# open_store


def test_open_store_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(tmp_path / "a" / "b"))
    try:
        assert isinstance(store, EmbeddedStore)
        assert store.description == f"embedded store {tmp_path / 'a' / 'b'}"
        assert (tmp_path / "a" / "b" / "store.sqlite").is_file()
    finally:
        store.close()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store = open_store("~/data")
    try:
        assert store.description == f"embedded store {tmp_path / 'home' / 'data'}"
    finally:
        store.close()
    with pytest.raises(StoreUnavailable):
        open_store("")


def test_open_store_missing_cluster_file(tmp_path: Path) -> None:
    missing = tmp_path / "fdb.cluster"
    with pytest.raises(StoreUnavailable, match=f"{missing} does not exist"):
        open_store(f"fdb:{missing}")


def test_open_store_fdb_without_client_library(tmp_path: Path) -> None:
    if libfdb_c_present():
        pytest.skip("libfdb_c is installed: the missing-library message cannot be tested")
    cluster = tmp_path / "fdb.cluster"
    cluster.write_text("test:test@127.0.0.1:4500\n")
    for spec in ("fdb:", f"fdb:{cluster}"):
        with pytest.raises(StoreUnavailable, match="libfdb_c") as info:
            open_store(spec)
        assert "foundationdb-clients 7.3" in str(info.value)
