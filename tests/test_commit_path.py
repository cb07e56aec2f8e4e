"""Commits on the event loop (one CPU): the store's no-wait attempt, its checkpoints,
and the fall-back to a worker thread when another writer holds the store."""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
from helpers import ONE_CPU, opendb

from fusesqlite.store.base import ConflictError
from fusesqlite.store.embedded import CHECKPOINT_EVERY, FILE_NAME, EmbeddedStore

pytestmark = pytest.mark.timeout(120)

def _hold_write_lock(store_dir) -> sqlite3.Connection:
    """Another process's writer, as SQLite sees it: a connection inside BEGIN IMMEDIATE."""
    c = sqlite3.connect(os.path.join(store_dir, FILE_NAME), isolation_level=None, timeout=10)
    c.execute("BEGIN IMMEDIATE")
    return c


def test_transact_nowait_commits_and_refuses_at_once_while_another_writer_holds_the_store(tmp_path):
    store = EmbeddedStore(tmp_path)
    try:
        store.transact_nowait(lambda tr: tr.set(b"k", b"1"))
        assert store.transact(lambda tr: tr.get(b"k")) == b"1"
        holder = _hold_write_lock(tmp_path)
        try:
            t0 = time.monotonic()
            with pytest.raises(ConflictError):
                store.transact_nowait(lambda tr: tr.set(b"k", b"2"))
            assert time.monotonic() - t0 < 1.0, "transact_nowait waited for the lock"
        finally:
            holder.rollback()
            holder.close()
        assert store.transact(lambda tr: tr.get(b"k")) == b"1", "the refused attempt left a write behind"
        store.transact_nowait(lambda tr: tr.set(b"k", b"3"))
        assert store.transact(lambda tr: tr.get(b"k")) == b"3"
    finally:
        store.close()


def test_transact_nowait_commits_keep_the_wal_short_under_sustained_load(tmp_path):
    """Its connection never checkpoints. Every CHECKPOINT_EVERY commits one attempt is
    refused, so that commit goes through ``transact``, which checkpoints after it, as
    SQLite's auto-checkpoint would. A checkpoint on a background thread never catches
    up with commits that do not pause: the WAL grows by every commit's pages, for
    ever, and every append costs its fdatasync a file-size update too."""
    store = EmbeddedStore(tmp_path)
    wal = tmp_path / (FILE_NAME + "-wal")
    value = os.urandom(40_000)
    refused = 0
    one_interval = 0  # the WAL once CHECKPOINT_EVERY commits are in it
    try:
        n = 10 * CHECKPOINT_EVERY
        for i in range(n):
            def put(tr, i=i):
                tr.set(b"k%d" % (i % 50), value)
            try:
                store.transact_nowait(put)
            except ConflictError:
                refused += 1
                one_interval = one_interval or wal.stat().st_size
                store.transact(put)  # what the caller does (transactions/commits.py)
        assert refused == n // (CHECKPOINT_EVERY + 1), refused  # the refused one goes through transact
        assert one_interval > CHECKPOINT_EVERY * len(value), one_interval
        # ten intervals later, still about one interval long (it grew ten times that before)
        assert wal.stat().st_size < 1.5 * one_interval, (wal.stat().st_size, one_interval)
    finally:
        store.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as c:
        assert c.execute("SELECT count(*) FROM kv WHERE k >= x'6b' AND k < x'6c'").fetchone()[0] == 50


def test_one_cpu_mount_commits_on_a_thread_while_another_writer_holds_the_store(mounts):
    """The event loop's attempt is refused at once; the commit waits on a worker thread
    while the mount goes on answering, and lands when the store is free."""
    m = mounts(debug=True, cpus=ONE_CPU)
    assert m.wait_log("event=commit_path inline=yes cpus=1"), m.log_tail()
    db = m / "busy.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(x)")
        c.execute("INSERT INTO t VALUES (1)")
    other = m / "other.txt"
    other.write_bytes(b"still here")
    holder = _hold_write_lock(m.store_dir)
    done: dict[str, object] = {}

    def insert():
        t0 = time.monotonic()
        try:
            with opendb(db) as c:
                c.execute("INSERT INTO t VALUES (2)")
        except Exception as e:  # reported below
            done["error"] = e
        done["seconds"] = time.monotonic() - t0

    writer = threading.Thread(target=insert)
    try:
        writer.start()
        assert m.wait_log("event=commit_inline_busy", timeout=10), m.log_tail()
        t0 = time.monotonic()  # (the database's own attributes wait for its commit)
        assert other.read_bytes() == b"still here" and os.stat(m.mountpoint).st_nlink >= 1
        answered = time.monotonic() - t0
        time.sleep(0.5)
        assert writer.is_alive(), f"the commit did not wait for the store: {done}"
    finally:
        holder.rollback()
        holder.close()
        writer.join(30)
    assert answered < 0.5, f"the mount stalled {answered:.2f} s while a commit waited for the store"
    assert "error" not in done, done["error"]
    assert done["seconds"] >= 0.5
    with opendb(db) as c:
        assert c.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
