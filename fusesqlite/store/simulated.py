"""A FoundationDB cluster imitated in front of another store (``--simulate SPEC``).

No cluster can be installed where fusesqlite is mostly developed and tested, yet
what a cluster does to a client decides whether the product is correct on one:
every read is a network round trip, a commit takes longer still, a commit may be
refused as a conflict, and a commit may end in "result unknown" although it was
applied (FoundationDB's commit_unknown_result, 1021). ``SimulatedStore`` adds
those to any store (in practice the embedded one), so tests and benchmarks run
them on one machine. What it does not imitate: docs/simulated-store.md.

A transaction that wrote nothing has no commit (FoundationDB commits a read-only
transaction without asking the cluster): it pays its reads only, and is never
refused nor left unknown.
"""
from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .base import (
    CommitUnknownResult,
    ConflictError,
    RangeRead,
    ReadView,
    RetryableError,
    Store,
    StoreError,
    Transaction,
    TransactionThrough,
    ViewThrough,
    log,
    parse_settings,
    run_with_retries,
)

T = TypeVar("T")

#: retries after the first attempt, as the FoundationDB adapter's option (foundationdb.py)
RETRY_LIMIT = 100
SOURCE = "--simulate"


class SimulateSpecError(StoreError):
    """A ``--simulate`` value that names an unknown setting or a bad number."""


@dataclass(frozen=True)
class SimulateSpec:
    """What the simulated cluster does; every setting defaults to "as the inner store"."""

    #: each read round trip (get, get_range, snapshot or not) waits this long
    latency_ms: float = 0.0
    #: each commit of a transaction that wrote waits this long
    commit_ms: float = 0.0
    #: fraction of commits applied and then reported as CommitUnknownResult
    unknown_result: float = 0.0
    #: fraction of commits refused as a conflict (ConflictError), not applied
    conflict: float = 0.0
    #: fraction of commits not applied and reported as CommitUnknownResult all the same
    unknown_lost: float = 0.0
    #: seed of the faults' random draws (None: from os.urandom, logged so a run can be replayed)
    seed: int | None = None

    def describe(self) -> str:
        return (
            f"latency_ms={self.latency_ms:g} commit_ms={self.commit_ms:g} "
            f"unknown_result={self.unknown_result:g} conflict={self.conflict:g} unknown_lost={self.unknown_lost:g} "
            f"seed={self.seed}"
        )


_FLOATS = frozenset({"latency_ms", "commit_ms", "unknown_result", "conflict", "unknown_lost"})
_ALLOWED = (
    "latency_ms=MS,commit_ms=MS,unknown_result=FRACTION,conflict=FRACTION[,unknown_lost=FRACTION][,seed=N] "
    "(milliseconds 0 or more, fractions in [0, 1) that add up to less than 1)"
)


def parse_simulate(text: str) -> SimulateSpec:
    """The ``--simulate`` value ``text`` as a SimulateSpec (SimulateSpecError, one line, if it is not one)."""
    try:
        spec = parse_settings(text, SimulateSpec(), SOURCE, _FLOATS)
    except StoreError as e:
        raise SimulateSpecError(f"{e}; use {_ALLOWED}") from None
    for name in ("latency_ms", "commit_ms"):
        value = getattr(spec, name)
        if not 0 <= value < float("inf"):
            raise SimulateSpecError(f"{SOURCE}: {name}={value:g} is not a number of milliseconds, 0 or more; use {_ALLOWED}")
    for name in ("unknown_result", "conflict", "unknown_lost"):
        value = getattr(spec, name)
        if not 0 <= value < 1:
            raise SimulateSpecError(f"{SOURCE}: {name}={value:g} is not a fraction in [0, 1); use {_ALLOWED}")
    if spec.unknown_result + spec.conflict + spec.unknown_lost >= 1:
        raise SimulateSpecError(f"{SOURCE}: unknown_result + conflict + unknown_lost must be under 1 (every commit "
                                "would fail); "
                                f"use {_ALLOWED}")
    return spec


class _Refused(Exception):
    """Aborts the inner store's attempt of a commit the simulated cluster refuses. Not a
    StoreError: the inner store must neither retry it nor translate it."""


class _Latency:
    """Each read call of a view or transaction waits the cluster's read latency first."""

    __slots__ = ()
    _delay: float

    def _read(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        if self._delay:
            time.sleep(self._delay)
        return call(*args, **kwargs)

    def get_ranges(self, reads: Sequence[RangeRead]) -> list[list[tuple[bytes, bytes]]]:
        """All of them in one round trip, as FoundationDB's futures issued together."""
        return super().get_ranges(reads) if reads else []  # type: ignore[misc]


class _View(_Latency, ViewThrough):
    """Reads through the inner store, each one a round trip."""

    __slots__ = ("_delay",)

    def __init__(self, view: ReadView, delay: float) -> None:
        super().__init__(view)
        self._delay = delay


class _Transaction(_Latency, TransactionThrough):
    """One attempt's transaction: reads pay the latency, writes are buffered by the
    client in FoundationDB (no round trip), so they go straight to the inner store."""

    __slots__ = ("_delay",)

    def __init__(self, tr: Transaction, delay: float) -> None:
        super().__init__(tr)
        self._delay = delay

    def _snapshot_view(self, view: ReadView) -> ReadView:
        return _View(view, self._delay)


class SimulatedStore:
    """``inner`` behind a simulated FoundationDB cluster (``spec``).

    No ``transact_nowait``: a cluster's commit is a network round trip, never cheap
    enough for the event loop (mount.py then commits on worker threads).
    """

    def __init__(self, inner: Store, spec: SimulateSpec) -> None:
        if spec.seed is None:
            spec = dataclasses.replace(spec, seed=int.from_bytes(os.urandom(4), "big"))
        self.inner = inner
        self.spec = spec
        self.limits = inner.limits
        self.description = f"{inner.description} behind a simulated cluster"
        self._read_delay = spec.latency_ms / 1000
        self._commit_delay = spec.commit_ms / 1000
        self._rng = random.Random(spec.seed)
        self._rng_lock = threading.Lock()  # one sequence of draws whatever the threads
        log.info("event=store_simulated %s store=%r", spec.describe(), inner.description)

    # Store protocol

    def transact(self, fn: Callable[[Transaction], T]) -> T:
        """FoundationDB's retry loop (``on_error``): refusals and unknown results are
        retried. Given up after an attempt whose result was unknown, the error is
        CommitUnknownResult whatever the last attempt's was, as the adapter's."""
        maybe_landed = False

        def attempt() -> T:
            nonlocal maybe_landed
            try:
                return self._attempt(fn)
            except CommitUnknownResult:
                maybe_landed = True
                raise

        try:
            return run_with_retries(attempt, retry_limit=RETRY_LIMIT + 1, what=self.description)
        except RetryableError as e:
            if maybe_landed and not isinstance(e, CommitUnknownResult):
                raise CommitUnknownResult(f"{e}; an earlier attempt's commit result was unknown") from e
            raise

    def wait_for_changes(self, olds: Mapping[bytes, bytes | None], timeout: float) -> dict[bytes, bytes | None]:
        """The inner store's wait, after one read round trip (FoundationDB reads the keys, then watches them)."""
        if self._read_delay:
            time.sleep(self._read_delay)
        return self.inner.wait_for_changes(olds, timeout)

    def wake(self) -> None:
        self.inner.wake()

    def disk_space(self) -> tuple[int, int] | None:
        return self.inner.disk_space()

    def compact(self, full: bool) -> str | None:
        return self.inner.compact(full)

    def close(self) -> None:
        self.inner.close()

    # one attempt

    def _attempt(self, fn: Callable[[Transaction], T]) -> T:
        with self._rng_lock:
            draw = self._rng.random()
        spec = self.spec
        refuse = draw < spec.conflict
        unknown = not refuse and draw < spec.conflict + spec.unknown_result
        lost = not (refuse or unknown) and draw < spec.conflict + spec.unknown_result + spec.unknown_lost
        delay = self._read_delay

        def attempt(tr: Transaction) -> tuple[T, bool]:
            sim = _Transaction(tr, delay)
            result = fn(sim)
            if (refuse or lost) and sim.wrote:
                raise _Refused()  # the inner store rolls this attempt back
            return result, sim.wrote

        try:
            result, wrote = self.inner.transact(attempt)
        except _Refused:
            self._commit_wait()
            if lost:
                raise CommitUnknownResult(f"{self.description}: commit result unknown (simulated; it was not "
                                          "applied)") from None
            raise ConflictError(f"{self.description}: commit refused as a conflict (simulated)") from None
        if wrote:
            self._commit_wait()
            if unknown:
                raise CommitUnknownResult(f"{self.description}: commit result unknown (simulated; it was applied)")
        return result

    def _commit_wait(self) -> None:
        if self._commit_delay:
            time.sleep(self._commit_delay)
