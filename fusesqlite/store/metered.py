"""A store that counts its transactions, their round trips and their latency, for
``mount --metrics`` (metrics.py); in front of the store only when metrics are on.

A round trip is what one costs on FoundationDB: each read call (``get``,
``get_range``, or a batch of ``get_ranges``) and each commit. On the embedded
store those are local calls, counted alike so that the figures compare. The
counters are prometheus_client's: transactions run on several worker threads.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.core import Metric

from fusesqlite import metrics

from .base import RangeRead, ReadView, Stamp, Store, StoreError, Transaction

T = TypeVar("T")


class _Counting:
    """A transaction (or its snapshot view) whose reads are timed."""

    __slots__ = ("_tr", "_reads", "wrote")

    def __init__(self, tr: Any, reads: Histogram) -> None:
        self._tr = tr
        self._reads = reads
        self.wrote = False  # its commit is a round trip (a read-only one's end is none)

    def get(self, key: bytes) -> bytes | None:
        started = time.perf_counter()
        try:
            return self._tr.get(key)
        finally:
            self._reads.observe(time.perf_counter() - started)

    def get_range(self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False) -> list[tuple[bytes, bytes]]:
        started = time.perf_counter()
        try:
            return self._tr.get_range(begin, end, limit=limit, reverse=reverse)
        finally:
            self._reads.observe(time.perf_counter() - started)

    def get_ranges(self, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
        started = time.perf_counter()
        try:
            return self._tr.get_ranges(reads)
        finally:
            self._reads.observe(time.perf_counter() - started)

    @property
    def snapshot(self) -> ReadView:
        return _Counting(self._tr.snapshot, self._reads)

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


class MeteredStore:
    """``inner`` with every transaction counted. Anything else (``description``,
    ``limits``, an embedded store's ``path``) is the inner store's."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.transactions = Counter("fusesqlite_store_transactions", "Store transactions, by outcome",
                                    ["outcome"], registry=None)
        self._ok, self._failed = self.transactions.labels("ok"), self.transactions.labels("error")
        self.attempts = Counter("fusesqlite_store_attempts", "Attempts of store transactions (retries included)",
                                registry=None)
        self.round_trips = Histogram("fusesqlite_store_round_trip", "Store round trips: each read call, and "
                                     "the commit of each transaction that wrote", ["kind"], unit="seconds",
                                     buckets=metrics.LATENCY_BUCKETS, registry=None)
        self._reads, self._commits = self.round_trips.labels("read"), self.round_trips.labels("commit")
        self.seconds = metrics.latency_histogram("fusesqlite_store_transaction",
                                                 "Store transactions, retries included")
        if hasattr(inner, "transact_nowait"):  # mount.py and transactions/commits.py look for it
            self.transact_nowait = self._transact_nowait

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def collect(self) -> Iterator[Metric]:
        for metric in (self.transactions, self.attempts, self.round_trips, self.seconds):
            yield from metric.collect()

    def _metered(self, call: Callable[[Callable[[Transaction], T]], T], fn: Callable[[Transaction], T]) -> T:
        """``call(fn)`` (the inner store's transact), counted and timed: the whole, its
        attempts, and the commit (from the last attempt's end to the store's answer)."""
        committing = 0.0  # when the last attempt that wrote handed over to the commit

        def attempt(tr: Transaction) -> T:
            nonlocal committing
            self.attempts.inc()
            counting = _Counting(tr, self._reads)
            result = fn(counting)
            committing = time.perf_counter() if counting.wrote else 0.0
            return result

        started = time.perf_counter()
        try:
            result = call(attempt)
        except StoreError:
            self._failed.inc()
            raise
        finally:
            now = time.perf_counter()
            self.seconds.observe(now - started)
        if committing:
            self._commits.observe(now - committing)
        self._ok.inc()
        return result

    def transact(self, fn: Callable[[Transaction], T]) -> T:
        return self._metered(self._inner.transact, fn)

    def _transact_nowait(self, fn: Callable[[Transaction], T]) -> T:
        return self._metered(self._inner.transact_nowait, fn)  # type: ignore[attr-defined]

    def wait_for_change(self, key: bytes, old: bytes | None, timeout: float) -> bytes | None:
        return self._inner.wait_for_change(key, old, timeout)

    def disk_space(self) -> tuple[int, int] | None:
        return self._inner.disk_space()

    def compact(self, full: bool) -> str | None:
        return self._inner.compact(full)

    def close(self) -> None:
        self._inner.close()
