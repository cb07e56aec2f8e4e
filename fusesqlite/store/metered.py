"""A store that counts its transactions, their round trips and their latency, for
``mount --metrics`` (metrics.py); in front of the store only when metrics are on.

A round trip is what one costs on FoundationDB: each read call (``get``,
``get_range``, or a batch of ``get_ranges``) and each commit. On the embedded
store those are local calls, counted alike so that the figures compare. The
counters are prometheus_client's: transactions run on several worker threads.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.core import Metric

from fusesqlite import metrics

from .base import ReadView, Store, StoreError, Transaction, TransactionThrough, ViewThrough

T = TypeVar("T")


class _Timed(TransactionThrough):
    """A transaction whose read calls are timed (each a round trip on FoundationDB)."""

    __slots__ = ("_reads",)

    def __init__(self, tr: Transaction, reads: Histogram) -> None:
        super().__init__(tr)
        self._reads = reads

    def _read(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self._reads.observe(time.perf_counter() - started)

    def _snapshot_view(self, view: ReadView) -> ReadView:
        return _TimedView(view, self._reads)


class _TimedView(ViewThrough):
    __slots__ = ("_reads",)

    def __init__(self, view: ReadView, reads: Histogram) -> None:
        super().__init__(view)
        self._reads = reads

    _read = _Timed._read


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
            timed = _Timed(tr, self._reads)
            result = fn(timed)
            committing = time.perf_counter() if timed.wrote else 0.0
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

    def wait_for_changes(self, olds: Mapping[bytes, bytes | None], timeout: float) -> dict[bytes, bytes | None]:
        return self._inner.wait_for_changes(olds, timeout)

    def wake(self) -> None:
        self._inner.wake()

    def disk_space(self) -> tuple[int, int] | None:
        return self._inner.disk_space()

    def compact(self, full: bool) -> str | None:
        return self._inner.compact(full)

    def close(self) -> None:
        self._inner.close()
