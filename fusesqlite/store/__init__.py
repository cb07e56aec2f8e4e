"""Transactional key-value stores: FoundationDB, or an embedded SQLite file held to the same rules."""
from __future__ import annotations

from pathlib import Path

from .base import (
    FDB_LIMITS,
    STAMP_BYTES,
    CommitUnknownResult,
    ConflictError,
    LimitExceeded,
    Limits,
    RangeRead,
    ReadView,
    RetryableError,
    Stamp,
    Store,
    StoreError,
    StoreFull,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
    limit_exceeded,
    limits_from_env,
    run_with_retries,
)
from .embedded import EmbeddedStore, StoreNotPrivate
from .foundationdb import FoundationDBStore
from .simulated import SimulatedStore, SimulateSpec, SimulateSpecError, parse_simulate

__all__ = [
    "FDB_LIMITS",
    "STAMP_BYTES",
    "CommitUnknownResult",
    "ConflictError",
    "EmbeddedStore",
    "FoundationDBStore",
    "LimitExceeded",
    "Limits",
    "RangeRead",
    "ReadView",
    "RetryableError",
    "SimulateSpec",
    "SimulateSpecError",
    "SimulatedStore",
    "Stamp",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreNotPrivate",
    "StoreUnavailable",
    "Transaction",
    "TransactionTooOld",
    "limit_exceeded",
    "open_store",
    "parse_simulate",
    "run_with_retries",
]

FDB_PREFIX = "fdb:"


def open_store(
    spec: str, limits: Limits | None = None, *, allow_shared: bool = False, simulate: str | SimulateSpec | None = None
) -> Store:
    """Open the store named by ``spec``, as given on the command line.

    ``fdb:`` is FoundationDB with its default cluster file, ``fdb:PATH`` with
    the cluster file PATH; anything else is the directory of an embedded store,
    refused if other users can read or write it unless ``allow_shared``
    (FoundationDB's access is the cluster's business: its TLS and network).
    ``simulate`` (``--simulate``, simulated.py) puts the store behind a simulated
    FoundationDB cluster.
    """
    if simulate is None:
        return _open(spec, limits, allow_shared)
    if isinstance(simulate, str):
        simulate = parse_simulate(simulate)
    return SimulatedStore(_open(spec, limits, allow_shared), simulate)


def _open(spec: str, limits: Limits | None, allow_shared: bool) -> Store:
    limits = limits or limits_from_env()
    if spec.startswith(FDB_PREFIX):
        cluster = spec[len(FDB_PREFIX):]
        if not cluster:
            return FoundationDBStore(None, limits)
        cluster_file = Path(cluster).expanduser()
        if not cluster_file.is_file():
            raise StoreUnavailable(f"FoundationDB cluster file {cluster_file} does not exist")
        return FoundationDBStore(str(cluster_file), limits)
    if not spec:
        raise StoreUnavailable("no store given: name a directory, 'fdb:' or 'fdb:/path/to/fdb.cluster'")
    return EmbeddedStore(Path(spec).expanduser(), limits, allow_shared=allow_shared)
