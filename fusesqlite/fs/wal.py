"""WAL files (-shm, -wal) across mounts: one mount at a time has a database in WAL mode.

SQLite's WAL index (``X-shm``) is a transient file, in one daemon's memory: a second
mount building its own index of the same ``X-wal`` would append frames the first
one never sees, and commits would be lost (measured: 194 of 499 acknowledged). So a
mount whose apps open ``X-shm`` or ``X-wal`` (a session) becomes the WAL owner of ``X``
in the store (a lease record, coherence/) until their last handle of either closes
(SQLite with locking_mode=EXCLUSIVE keeps its index in its heap and opens ``X-wal``
only). Every commit that writes ``X`` or ``X-wal`` (data or attributes), or changes
their names, reads that record in its own store transaction (``Volume._check_wal``):
from the owner it must still name the owner, from any other mount it must name no other live one. Opens of ``X-shm`` and
``X-wal`` are refused (EBUSY) while another mount owns it, before SQLite reads anything.
An owner whose index may no longer match the store (its ownership lost, or a commit
of ``X`` or ``X-wal`` failed) is poisoned: its commits of them fail until its apps
have closed them. SQLite reports a refused open as "unable to open database file"
(SQLITE_CANTOPEN), a refused commit as "disk I/O error"; neither writes anything.
docs/many-mounts.md, "WAL and several mounts", says why this is correct.

These are the hooks files.py and directories.py call; the ownership itself is
Coherence's (``index_opened``, ``index_closed``, ``wal_poison``).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import pyfuse3

from fusesqlite.volume import WalGrant, WalHeld

if TYPE_CHECKING:
    from fusesqlite.fs.files import FileOps

log = logging.getLogger("fusesqlite.fs")

SHM = b"-shm"
WAL = b"-wal"


def database_of(name: bytes, suffix: bytes) -> bytes | None:
    """``X`` for ``X-shm`` / ``X-wal`` (by ``suffix``), else None."""
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _database(name: bytes) -> bytes | None:
    """``X`` for ``X-shm`` or ``X-wal``: the files whose handles make a WAL session."""
    return database_of(name, SHM) or database_of(name, WAL)


async def opening(ops: FileOps, parent: int, name: bytes) -> None:
    """Before a create of ``name`` in ``parent``: a -shm or -wal joins, or starts, this
    mount's WAL session of its database (EBUSY while another live mount has one)."""
    await session_opening(ops, parent, name)


async def opening_ino(ops: FileOps, ino: int) -> None:
    """Before an open of ``ino`` by an app (not by this mount's own lock proxy)."""
    tf = ops.transient.by_ino.get(ino)
    if tf is not None:
        if tf.linked:  # else the open fails (ENOENT)
            await session_opening(ops, tf.parent, tf.name)
        return
    known = ops.names.get(ino)
    if known is not None:
        await session_opening(ops, known[0], known[1])


async def open_failed(ops: FileOps, parent: int, name: bytes) -> None:
    """A create that ``opening`` let through failed: it made no handle."""
    db = _database(name)
    if db is not None and not ops.read_only:
        await ops.coherence.index_closed((parent, db), ops.child_path(parent, db))


async def open_failed_ino(ops: FileOps, ino: int) -> None:
    """An open of stored file ``ino`` that ``opening_ino`` let through failed."""
    known = ops.names.get(ino)
    if known is not None:
        await open_failed(ops, known[0], known[1])


async def released(ops: FileOps, file: object) -> None:
    """After an app's handle of ``file`` is released: the session's last one ends this
    mount's WAL ownership."""
    if ops.read_only:
        return
    name, parent = getattr(file, "name", None), getattr(file, "parent", None)
    if not isinstance(name, bytes):  # a stored file: named as this mount knows it
        known = ops.names.get(getattr(file, "ino", 0))
        if known is None:
            return
        parent, name = known
    if isinstance(parent, int):
        await session_released(ops, parent, name)


async def session_opening(ops: FileOps, parent: int, name: bytes) -> None:
    """Before a create or open of ``name`` in ``parent``: a -shm or -wal takes or shares
    the WAL ownership of its database. SQLite opens -wal first, then -shm (or, with
    locking_mode=EXCLUSIVE, keeps its WAL index in its heap and never opens -shm):
    either way the index is built after the session started."""
    db = _database(name)
    if db is None:
        return
    op = "open_shm" if name.endswith(SHM) else "open_wal"
    try:
        if ops.read_only:  # it commits nothing: no session, no record written
            await ops.coherence.wal_check((parent, db), ops.child_path(parent, db), op)
            return
        await ops.coherence.index_opened(
            (parent, db), ops.child_path(parent, db), op, partial(_view_current, ops, parent),
            partial(_reset, ops, parent, db),
        )
    except WalHeld as e:
        raise pyfuse3.FUSEError(e.errno) from None


async def _reset(ops: FileOps, parent: int, db: bytes) -> None:
    """Drop what this mount holds uncommitted of ``db`` and its -wal, written under a
    poisoned WAL index (``Coherence.wal_poison``): its commits were refused, and a new
    index must not publish them."""
    for ino in (ops.open_file_named(parent, db), ops.open_file_named(parent, db + WAL)):
        fs = ops.tx.files.get(ino) if ino else None
        if fs is not None and fs.changed:
            async with fs.commit_lock:
                await ops.tx.rollback(fs)
            log.info("event=wal_reset path=%s", fs.label)


def _view_current(ops: FileOps, parent: int, grant: WalGrant) -> bool:
    """Whether the database and its -wal, where open here, are as ``grant`` found them
    in the store (``Coherence.index_opened`` checks that no change to them is unfollowed)."""
    for name, ino, dver in grant.files:
        here = ops.open_file_named(parent, name)
        if here is None:
            continue  # not open here: its next open reads what this mount has followed
        if here != ino:
            log.debug("event=wal_view_behind name=%r ino_here=%s ino_stored=%s", name, here, ino)
            return False  # open here as a file the store no longer has under this name
        fs = ops.tx.files.get(here)
        if fs is not None and fs.record.dver != dver:
            log.debug("event=wal_view_behind name=%r dver_here=%d dver_stored=%d", name, fs.record.dver, dver)
            return False  # open with an older version: its move is still to come
    return True


async def session_released(ops: FileOps, parent: int, name: bytes) -> None:
    """After an app's handle of a -shm or -wal is released (``session_opening``)."""
    db = _database(name)
    if db is None:
        return
    key, path = (parent, db), ops.child_path(parent, db)
    await ops.coherence.index_closed(key, path, lambda: _publish_before_release(ops, parent, db, path))


async def _publish_before_release(ops: FileOps, parent: int, db: bytes, path: str) -> None:
    """Commit what this mount wrote to ``db`` and its -wal before giving the WAL away.

    With synchronous=OFF SQLite never fsyncs: its last checkpoint's pages reach the
    store only at the database's close, which comes after the session's last handle.
    A mount taking the WAL in between would read the database without them. With
    NORMAL and FULL they were committed already, and this costs one syncfs.
    """
    inos = [ino for ino in (ops.open_file_named(parent, db), ops.open_file_named(parent, db + WAL)) if ino]
    if not inos:
        return
    try:
        await ops.take_kernel_pages(inos)
        for ino in inos:
            fs = ops.tx.files.get(ino)
            if fs is not None:
                await ops.commit_unless_in_transaction(fs, "wal released")
    except pyfuse3.FUSEError as e:  # logged by the commit; the app's own close reports it too
        log.warning("event=wal_publish_failed path=%s errno=%d", path, e.errno)
