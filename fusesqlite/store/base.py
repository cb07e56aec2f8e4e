"""The store protocol every backend satisfies, its errors and FoundationDB's limits.

The protocol is FoundationDB's own shape (a retried transactional function over
ordered byte keys) so the FoundationDB adapter stays thin and the embedded store
can be held to the same rules.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

T = TypeVar("T")
D = TypeVar("D")
log = logging.getLogger("fusesqlite.store")


@dataclass(frozen=True)
class Limits:
    """FoundationDB's documented per-transaction limits (Known Limitations)."""

    key_bytes: int = 10_000
    value_bytes: int = 100_000
    transaction_bytes: int = 10_000_000
    transaction_seconds: float = 5.0


FDB_LIMITS = Limits()

#: tighter limits for tests, e.g. "transaction_bytes=200000,value_bytes=50000": the
#: real store, refusing earlier, so the refusal paths run without huge data
LIMITS_ENV = "FUSESQLITE_STORE_LIMITS"


def parse_settings(spec: str, defaults: D, source: str, floats: frozenset[str] = frozenset()) -> D:
    """``defaults`` (a dataclass) with the ``name=value,...`` of ``spec`` applied: the
    settings syntax of ``FUSESQLITE_STORE_LIMITS`` and ``--simulate``. Names in
    ``floats`` take any number, the others whole numbers. A bad name or number is
    a one-line StoreError that starts with ``source`` and says what is allowed."""
    names = [f.name for f in dataclasses.fields(defaults)]  # type: ignore[arg-type]
    changes: dict[str, float | int] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in names:
            raise StoreError(f"{source}: unknown setting {name!r}; known: {', '.join(names)}")
        try:
            changes[name] = float(value) if name in floats else int(value)
        except ValueError:
            wanted = "a number" if name in floats else "a whole number"
            raise StoreError(f"{source}: {name} needs {wanted}, not {value.strip()!r}") from None
    return dataclasses.replace(defaults, **changes)  # type: ignore[type-var]


def limits_from_env(environ: Mapping[str, str] = os.environ) -> Limits:
    return parse_settings(environ.get(LIMITS_ENV, "").strip(), FDB_LIMITS, LIMITS_ENV, frozenset({"transaction_seconds"}))


class StoreError(Exception):
    """A store failure; ``errno`` is what the application sees."""

    errno: int = errno.EIO


class RetryableError(StoreError):
    """The transaction may succeed if run again (``transact`` retries it)."""


class ConflictError(RetryableError):
    """Another transaction committed something this one read."""


class CommitUnknownResult(RetryableError):
    """The commit may or may not have been applied (FoundationDB's commit_unknown_result,
    1021, or a timeout during the commit). ``transact`` runs the function again, so
    every transaction function that writes must find what an earlier attempt of it
    committed instead of writing again (volume.py, ``Attempts``)."""


class TransactionTooOld(RetryableError):
    """The transaction outlived the store's time limit."""


class LimitExceeded(StoreError):
    """A key, value or transaction is larger than the store accepts."""

    errno = errno.EFBIG


class StoreFull(StoreError):
    """The store has no room (its disk is full)."""

    errno = errno.ENOSPC


class StoreUnavailable(StoreError):
    """The store cannot be reached or written (permissions, I/O, cluster down)."""


class RangeRead(NamedTuple):
    """One range read of ``ReadView.get_ranges``: pairs with ``begin <= key < end``."""

    begin: bytes
    end: bytes
    limit: int = 0
    reverse: bool = False

    @classmethod
    def key(cls, key: bytes) -> RangeRead:
        """The one pair of ``key``, if present."""
        return cls(key, key + b"\x00", 1)

    @classmethod
    def last(cls, begin_end: tuple[bytes, bytes]) -> RangeRead:
        """The last pair of a range (e.g. a versioned key's latest version)."""
        return cls(*begin_end, 1, True)


class ReadView(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def get_ranges(self, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
        """Every read of ``reads``, each as ``get_range`` returns it, all at once: on
        FoundationDB one network round trip instead of one each, so a commit that must
        read several keys first pays one round trip (``get_ranges_one_by_one`` where
        the store has no round trips)."""
        ...

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Pairs with ``begin <= key < end`` in key order (or reversed); limit 0 = all."""
        ...


#: bytes of a versionstamp: FoundationDB's commit version (8) and the transaction's
#: order in its commit batch (2), big-endian, so later commits have greater stamps
STAMP_BYTES = 10


class Stamp:
    """A transaction attempt's versionstamp: unknown until it commits, then its
    ``STAMP_BYTES`` bytes (``value``). Unique to the transaction, and greater than the
    stamp of every transaction that committed before it, whichever keys each wrote:
    a store-wide order no transaction has to read a key for."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: bytes | None = None

    def known(self) -> bytes:
        if self.value is None:
            raise StoreError("the transaction's versionstamp is not known: it has not committed")
        return self.value


class Transaction(ReadView, Protocol):
    @property
    def snapshot(self) -> ReadView:
        """Reads through it add no read conflict (FoundationDB snapshot reads)."""
        ...

    def set(self, key: bytes, value: bytes) -> None: ...

    def clear(self, key: bytes) -> None: ...

    def clear_range(self, begin: bytes, end: bytes) -> None: ...

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        """Set ``key``, its ``STAMP_BYTES`` bytes from ``offset`` replaced by the commit's
        versionstamp (FoundationDB's SET_VERSIONSTAMPED_KEY). A blind write: two
        transactions doing it conflict with nobody. The key cannot be read back in the
        same transaction (FoundationDB: accessed_unreadable)."""
        ...

    def set_versionstamped_value(self, key: bytes, value: bytes, offset: int) -> None:
        """Set ``key`` to ``value`` with its stamp bytes from ``offset`` replaced by the
        commit's versionstamp (SET_VERSIONSTAMPED_VALUE). Unreadable until committed."""
        ...

    def versionstamp(self) -> Stamp:
        """The stamp this attempt's commit will have (``Stamp.value`` once ``transact``
        returned). Only a transaction that writes has one."""
        ...


class Store(Protocol):
    """A backend. One whose commit is a local disk write (the embedded store) may also
    offer ``transact_nowait(fn)``: one attempt that never sleeps, raising
    ``ConflictError`` where ``transact`` would wait or retry (transactions/commits.py uses it
    to commit on the event loop, when that is cheaper than a thread)."""

    #: where the data lives, for log lines ("embedded store /path", "FoundationDB cluster file ...")
    description: str
    limits: Limits

    def transact(self, fn: Callable[[Transaction], T]) -> T:
        """Run ``fn`` in one serializable transaction and commit it, retrying on conflict.

        ``fn`` may run several times; it must not have side effects outside the
        transaction. Raises a ``StoreError`` when the transaction cannot commit.
        """
        ...

    def wait_for_changes(self, olds: Mapping[bytes, bytes | None], timeout: float) -> dict[bytes, bytes | None]:
        """Block until one of the keys of ``olds`` holds another value than its own there,
        ``timeout`` passes, or ``wake`` is called; return every key's value then."""
        ...

    def wake(self) -> None:
        """End the ``wait_for_changes`` under way (or the next one) at once: its caller
        has other keys to wait for."""
        ...

    def disk_space(self) -> tuple[int, int] | None:
        """(total, free) bytes of the disk that holds the store, where one disk does
        (statfs of a mount); None for a cluster."""
        ...

    def compact(self, full: bool) -> str | None:
        """Give space that removed keys freed back to the file system where the store
        does not do it by itself (``fusesqlite gc --keep``); ``full``: also where that
        rewrites the whole store (nothing else uses it). A line for the user, or None."""
        ...

    def close(self) -> None: ...


class ViewThrough:
    """Reads through another view, each read call passed to ``_read`` (a wrapper's own:
    the simulated cluster's latency, the metered store's timing)."""

    __slots__ = ("_view",)

    def __init__(self, view: ReadView) -> None:
        self._view = view

    def _read(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        return call(*args, **kwargs)

    def get(self, key: bytes) -> bytes | None:
        return self._read(self._view.get, key)

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        return self._read(self._view.get_range, begin, end, limit=limit, reverse=reverse)

    def get_ranges(self, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
        return self._read(self._view.get_ranges, reads)


class TransactionThrough(ViewThrough):
    """A transaction through another: reads as ``ViewThrough``, writes passed on as they
    are and noted (``wrote``: the attempt will commit)."""

    __slots__ = ("_tr", "wrote")

    def __init__(self, tr: Transaction) -> None:
        super().__init__(tr)
        self._tr = tr
        self.wrote = False

    @property
    def snapshot(self) -> ReadView:
        return self._snapshot_view(self._tr.snapshot)

    def _snapshot_view(self, view: ReadView) -> ReadView:
        """The snapshot's reads, through the same wrapper's kind of view."""
        raise NotImplementedError

    def set(self, key: bytes, value: bytes) -> None:
        self.wrote = True
        self._tr.set(key, value)

    def clear(self, key: bytes) -> None:
        self.wrote = True
        self._tr.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self.wrote = True
        self._tr.clear_range(begin, end)

    def set_versionstamped_key(self, key: bytes, offset: int, value: bytes) -> None:
        self.wrote = True
        self._tr.set_versionstamped_key(key, offset, value)

    def set_versionstamped_value(self, key: bytes, value: bytes, offset: int) -> None:
        self.wrote = True
        self._tr.set_versionstamped_value(key, value, offset)

    def versionstamp(self) -> Stamp:
        return self._tr.versionstamp()


def get_ranges_one_by_one(view: ReadView, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
    """``get_ranges`` for a store whose reads are local calls: one after the other."""
    return [view.get_range(r.begin, r.end, limit=r.limit, reverse=r.reverse) for r in reads]


def run_with_retries(
    attempt: Callable[[], T], *, retry_limit: int = 50, what: str = "transaction"
) -> T:
    """Retry loop shared by the backends that do not bring their own (jittered backoff)."""
    delay = 0.001
    for n in range(retry_limit):
        try:
            return attempt()
        except RetryableError as e:
            if n == retry_limit - 1:
                log.error("event=store_give_up what=%s attempts=%d cause=%s", what, n + 1, e)
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.2)
    raise AssertionError("unreachable")


_LIMIT_SUBJECTS = {"key_bytes": "key", "value_bytes": "value", "transaction_bytes": "transaction"}


def limit_exceeded(limits: Limits, field: str, size: int) -> LimitExceeded:
    """The error for ``size`` bytes over ``limits.<field>``, worded alike by every backend (it gets logged)."""
    return LimitExceeded(
        f"{_LIMIT_SUBJECTS.get(field, field)} of {size:,} bytes exceeds "
        f"limits.{field} = {getattr(limits, field):,} bytes (FoundationDB's limit)"
    )
