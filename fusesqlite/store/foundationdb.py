"""FoundationDB backend: a thin adapter from the store protocol to the official bindings.

FoundationDB already has the protocol's shape, so this module only converts:
its retry loop (``on_error``) instead of ``run_with_retries``, its error codes
into the store's errors, and its futures into plain values. Everything else
-- conflicts, limits, durability -- is the cluster's own behaviour.
"""
from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, NoReturn, TypeVar

from .base import (
    FDB_LIMITS,
    STAMP_BYTES,
    CommitUnknownResult,
    ConflictError,
    LimitExceeded,
    Limits,
    RangeRead,
    RetryableError,
    Stamp,
    StoreError,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    limit_exceeded,
    log,
)

T = TypeVar("T")

#: the client API the bindings (foundationdb 7.3.x) and libfdb_c 7.3 both speak
API_VERSION = 730
LIBFDB_MISSING = (
    "FoundationDB client library (libfdb_c) not found: install the foundationdb-clients 7.3 "
    "package from FoundationDB's releases (see README, 'FoundationDB')"
)

# FoundationDB error codes (https://apple.github.io/foundationdb/api-error-codes.html)
TRANSACTION_TOO_OLD = 1007
NOT_COMMITTED = 1020
COMMIT_UNKNOWN_RESULT = 1021
TRANSACTION_TIMED_OUT = 1031
#: an attempt older than limits.transaction_seconds by this much had a read version too
#: old to commit (FoundationDB counts the limit in versions, about a million a second)
TOO_OLD_MARGIN = 1.0
_LIMIT_CODES = {2101: "transaction_bytes", 2102: "key_bytes", 2103: "value_bytes"}
#: timed out, client-side I/O, cluster file missing/unreadable/unwritable, bad connection string
_UNAVAILABLE_CODES = {TRANSACTION_TIMED_OUT, 1510, 1511, 1513, 1514, 1515, 2104}

_api_lock = threading.Lock()


def load_fdb() -> ModuleType:
    """The ``fdb`` module with API_VERSION selected.

    ``fdb.api_version`` may be called again with the same version (it returns
    at once), never with another; it loads libfdb_c, whose absence is the usual
    first-run problem, so that gets one clear sentence.
    """
    try:
        import fdb
    except ImportError as e:
        raise StoreUnavailable(
            "FoundationDB Python bindings not installed: pip install 'foundationdb>=7.3,<7.4'"
        ) from e
    with _api_lock:
        try:
            fdb.api_version(API_VERSION)
        except RuntimeError as e:  # another version already selected, or libfdb_c too old
            raise StoreUnavailable(f"FoundationDB client library unusable: {e}") from e
        except Exception as e:  # the bindings raise a bare Exception when libfdb_c is missing
            if "Unable to locate" in str(e):
                raise StoreUnavailable(LIBFDB_MISSING) from e
            raise StoreUnavailable(f"FoundationDB client library (libfdb_c) failed to load: {e}") from e
    return fdb


class _ReadView:
    """Reads through an ``fdb`` transaction (or its ``snapshot``), futures resolved to plain values."""

    __slots__ = ("_tr", "_limits")

    def __init__(self, tr: Any, limits: Limits) -> None:
        self._tr = tr
        self._limits = limits

    def get(self, key: bytes) -> bytes | None:
        # FoundationDB would answer "absent" for an over-long key; we fail like the embedded store
        if len(key) > self._limits.key_bytes:
            raise limit_exceeded(self._limits, "key_bytes", len(key))
        return _get(self._tr, key)

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        result = self._tr.get_range(begin, end, limit=limit, reverse=reverse)
        return [(kv.key, kv.value) for kv in result.to_list()]

    def get_ranges(self, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
        # each range object sends its first request when made: all go out before any is waited for
        pending = [self._tr.get_range(r.begin, r.end, limit=r.limit, reverse=r.reverse) for r in reads]
        return [[(kv.key, kv.value) for kv in result.to_list()] for result in pending]


class _Transaction(_ReadView):
    """The protocol's Transaction over one ``fdb.Transaction``.

    Sizes are checked here too so both backends fail at the same call with the
    same message (FoundationDB itself would fail only the commit, and ignore an
    over-long key in get and clear). A failed mutation fails the commit even if
    ``fn`` swallowed the error. FoundationDB still enforces the transaction
    size, which it counts in its own way.
    """

    __slots__ = ("snapshot", "failure", "stamp")

    def __init__(self, tr: Any, limits: Limits) -> None:
        super().__init__(tr, limits)
        self.snapshot = _ReadView(tr.snapshot, limits)
        self.failure: StoreError | None = None
        #: our Stamp and the bindings' future of it (ready once the commit is)
        self.stamp: tuple[Stamp, Any] | None = None

    def set(self, key: bytes, value: bytes) -> None:
        limits = self._limits
        if len(key) > limits.key_bytes:
            self._fail(limit_exceeded(limits, "key_bytes", len(key)))
        if len(value) > limits.value_bytes:
            self._fail(limit_exceeded(limits, "value_bytes", len(value)))
        self._tr.set(key, value)

    def clear(self, key: bytes) -> None:
        if len(key) > self._limits.key_bytes:
            self._fail(limit_exceeded(self._limits, "key_bytes", len(key)))
        self._tr.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._tr.clear_range(begin, end)

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self._check_sizes(key, value, offset, len(key))
        # API >= 520: the stamp's offset follows the key, 4 bytes little-endian
        self._tr.set_versionstamped_key(key + struct.pack("<I", offset), value)

    def set_versionstamped_value(self, key: bytes, value: bytes, offset: int) -> None:
        self._check_sizes(key, value, offset, len(value))
        self._tr.set_versionstamped_value(key, value + struct.pack("<I", offset))

    def versionstamp(self) -> Stamp:
        if self.stamp is None:
            self.stamp = (Stamp(), self._tr.get_versionstamp())
        return self.stamp[0]

    def _check_sizes(self, key: bytes, value: bytes, offset: int, stamped_len: int) -> None:
        limits = self._limits
        if len(key) > limits.key_bytes:
            self._fail(limit_exceeded(limits, "key_bytes", len(key)))
        if len(value) > limits.value_bytes:
            self._fail(limit_exceeded(limits, "value_bytes", len(value)))
        if not 0 <= offset <= stamped_len - STAMP_BYTES:
            self._fail(StoreError(f"versionstamp offset {offset} outside the {stamped_len} bytes it goes into"))

    def _fail(self, error: StoreError) -> NoReturn:
        self.failure = error
        raise error


class FoundationDBStore:
    """The store in a FoundationDB cluster; ``cluster_file`` None means FoundationDB's default one.

    ``retry_limit`` is FoundationDB's option (retries after the first attempt).
    ``timeout`` bounds a whole ``transact`` call, retries included, so a dead
    cluster gives ``StoreUnavailable`` instead of a hung file system request.
    """

    def __init__(
        self,
        cluster_file: str | None,
        limits: Limits = FDB_LIMITS,
        *,
        retry_limit: int = 100,
        timeout: float = 10.0,
    ) -> None:
        self._fdb = load_fdb()
        self.cluster_file = cluster_file
        self.limits = limits
        self.description = f"FoundationDB cluster file {cluster_file or '(default)'}"
        self._retry_limit = retry_limit
        self._timeout = timeout
        #: ``wake`` was called: the wait under way (``_waiting`` set too), or the next, returns
        self._wake = threading.Event()
        self._waiting = threading.Event()
        try:
            self._db = self._fdb.open(cluster_file)
        except self._fdb.FDBError as e:
            raise StoreUnavailable(f"cannot open {self.description}: {e}") from e
        log.info("event=store_open backend=foundationdb cluster_file=%s", cluster_file or "(default)")

    # Store protocol

    def transact(self, fn: Callable[[Transaction], T]) -> T:
        limits = self.limits

        def attempt(tr: Any) -> tuple[T, _Transaction]:
            wrapper = _Transaction(tr, limits)
            result = fn(wrapper)
            if wrapper.failure is not None:
                raise wrapper.failure
            return result, wrapper

        result, wrapper = self._run(attempt)
        if wrapper.stamp is not None:
            stamp, future = wrapper.stamp
            try:
                stamp.value = bytes(future.wait())  # ready: the commit is done
            except self._fdb.FDBError as e:  # a transaction that wrote nothing has no stamp
                log.debug("event=store_no_versionstamp error=%s", e)
        return result

    def wait_for_changes(self, olds: Mapping[bytes, bytes | None], timeout: float) -> dict[bytes, bytes | None]:
        """Read the keys and watch them in the same transaction, so no change can slip in
        between; then wait for the first watch to fire (or ``timeout``, or ``wake``)."""
        deadline = time.monotonic() + timeout
        keys = list(olds)

        def read(tr: Any) -> dict[bytes, bytes | None]:
            pending = [tr.get(key) for key in keys]  # all requests out before any is waited for
            return {key: (v.value if v.present() else None) for key, v in zip(keys, (f.wait() for f in pending))}

        def read_and_watch(tr: Any) -> tuple[dict[bytes, bytes | None], list[Any]]:
            current = read(tr)
            return current, ([tr.watch(key) for key in keys] if current == olds else [])

        while True:
            current, watches = self._run(read_and_watch)
            remaining = deadline - time.monotonic()
            if not watches or remaining <= 0 or self._wake.is_set():
                self._wake.clear()
                for w in watches:
                    w.cancel()  # a watch left waiting would count against the cluster's limit
                return current
            fired = self._waiting = threading.Event()  # set by the first watch to fire, or by ``wake``
            if self._wake.is_set():
                fired.set()
            for w in watches:
                w.on_ready(lambda _future: fired.set())
            fired.wait(remaining)
            ready = [w for w in watches if w.is_ready()]
            for w in watches:
                if not w.is_ready():
                    w.cancel()
            if not ready:  # our own timeout, or ``wake``
                self._wake.clear()
                return self._run(read)
            try:
                ready[0].wait()
            except self._fdb.FDBError as e:  # e.g. too_many_watches: fall back to polling this round
                log.debug("event=store_watch_failed keys=%d error=%s", len(keys), e)
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def wake(self) -> None:
        self._wake.set()
        self._waiting.set()

    def disk_space(self) -> tuple[int, int] | None:
        """None: the cluster's disks are its storage servers' (``status`` in fdbcli)."""
        return None

    def compact(self, full: bool) -> str | None:
        """Nothing to do: FoundationDB's storage servers reclaim cleared ranges themselves."""
        return None

    def close(self) -> None:
        """Nothing to release: the bindings keep one network thread and database per process."""

    # FoundationDB's retry loop

    def _run(self, fn: Callable[[Any], T]) -> T:
        fdb = self._fdb
        tr = self._db.create_transaction()
        # both options survive on_error (API >= 610): the timeout covers all attempts together
        tr.options.set_timeout(int(self._timeout * 1000))
        tr.options.set_retry_limit(self._retry_limit)
        # the cluster refuses a transaction over limits.transaction_bytes as the embedded
        # store does (FoundationDB's default is its 10 MB maximum)
        tr.options.set_size_limit(self.limits.transaction_bytes)
        attempts = 0
        #: a commit of an earlier attempt (or of this one) may have been applied: 1021,
        #: or the timeout, out of the commit itself
        maybe_landed = False
        #: the error that made the last attempt retry (what the timeout cut short)
        retried: int | None = None
        try:
            while True:
                attempts += 1
                committing = False
                started = time.monotonic()
                try:
                    result = fn(tr)
                    committing = True
                    tr.commit().wait()
                    return result
                except fdb.FDBError as e:
                    too_old = time.monotonic() - started > self.limits.transaction_seconds + TOO_OLD_MARGIN
                    if committing and e.code == COMMIT_UNKNOWN_RESULT:
                        maybe_landed = True
                    elif committing and e.code == TRANSACTION_TIMED_OUT:
                        if too_old:  # its read version was too old to commit: it cannot have landed
                            e = fdb.FDBError(TRANSACTION_TOO_OLD)
                        else:
                            maybe_landed = True
                    try:
                        tr.on_error(e).wait()  # waits out retryable errors, re-raises the others
                        retried = e.code
                    except fdb.FDBError as final:
                        if final.code == TRANSACTION_TIMED_OUT and (too_old or retried == TRANSACTION_TOO_OLD):
                            final = fdb.FDBError(TRANSACTION_TOO_OLD)  # the cause, not the timeout it led to
                        raise self._error(final, attempts, maybe_landed) from final
        except BaseException:
            tr.cancel()  # nothing of an abandoned attempt may commit
            raise

    def _error(self, e: Any, attempts: int, maybe_landed: bool = False) -> StoreError:
        """The store error for FoundationDB error ``e`` that ``on_error`` would not (or no longer) retry.

        ``maybe_landed``: a commit of this transaction ended in 1021 or in the timeout,
        so it may have been applied: whatever stopped the retries, the caller gets
        CommitUnknownResult, which the volume's transactions resolve by running
        again (they find what an earlier attempt committed: volume.py).
        """
        code = e.code
        what = f"{self.description}: {e.description} (FoundationDB error {code})"
        if code == COMMIT_UNKNOWN_RESULT or (maybe_landed and code not in _LIMIT_CODES):
            return CommitUnknownResult(
                f"{what}: the commit may or may not have been applied after {attempts} attempts; "
                "is the cluster up and reachable?"
            )
        if code in _LIMIT_CODES:
            field = _LIMIT_CODES[code]
            return LimitExceeded(
                f"{what}: over limits.{field} = {getattr(self.limits, field):,} bytes"
            )
        if code == NOT_COMMITTED:
            return ConflictError(f"{what}: still conflicting after {attempts} attempts")
        if code == TRANSACTION_TOO_OLD:
            return TransactionTooOld(
                f"{what} after {attempts} attempts: over limits.transaction_seconds = "
                f"{self.limits.transaction_seconds} s (FoundationDB's limit), retried until the store's "
                f"timeout of {self._timeout} s or its retry limit"
            )
        if code == TRANSACTION_TIMED_OUT:
            return StoreUnavailable(
                f"{what}: no commit within {self._timeout} s -- is the cluster up and reachable?"
            )
        if code in _UNAVAILABLE_CODES:
            return StoreUnavailable(what)
        if self._fdb.predicates.is_retryable(e):
            return RetryableError(f"{what}: gave up after {attempts} attempts")
        return StoreError(what)


def _get(tr: Any, key: bytes) -> bytes | None:
    """A key's value from an fdb transaction or snapshot: bytes, or None when absent."""
    value = tr.get(key).wait()
    return value.value if value.present() else None


def _ready_within(future: Any, timeout: float) -> bool:
    """Wait for an fdb future at most ``timeout`` seconds (the bindings' own wait has no timeout)."""
    if future.is_ready():
        return True
    ready = threading.Event()
    future.on_ready(lambda _future: ready.set())
    return ready.wait(timeout)
