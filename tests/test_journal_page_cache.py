"""A new rollback journal goes through the kernel's page cache, so the daemon sees its
writes only when SQLite fsyncs or closes it (docs/architecture.md, "A new journal
through the page cache"). What that must not change:

- in every journal mode, synchronous level and locking mode, a COMMIT is in the store
  (another mount sees it) once it returns; the one exception, documented (README,
  "Current limits"): locking_mode EXCLUSIVE with synchronous OFF in DELETE or PERSIST
  mode, whose commits land together when SQLite next syncs or closes the journal;
- a transaction whose journal and pages the kernel still holds is never committed by
  another process's fsync or close of the database;
- a transaction takes its write lease when it creates its journal, as it did at the
  journal's first write: other mounts' writers wait (SQLITE_BUSY) from then on.
"""
from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess

import pytest
from helpers import table_digest
from test_many_mounts import new_counter, query, wait_for

pytestmark = pytest.mark.timeout(180)

MODES = list(itertools.product(("delete", "truncate", "persist"), ("OFF", "NORMAL", "FULL"), ("NORMAL", "EXCLUSIVE")))


def _lands_at_close(journal_mode: str, synchronous: str, locking_mode: str) -> bool:
    """SQLite ends these transactions by zeroing the journal's header in the page cache
    and neither syncs nor closes the journal: nothing reaches the daemon until it does."""
    return locking_mode == "EXCLUSIVE" and synchronous == "OFF" and journal_mode != "truncate"


def test_each_commit_is_in_the_store_when_it_returns_in_every_journal_mode(mounts):
    a = mounts()
    b = mounts(store=a.store)
    missed = []
    for journal_mode, synchronous, locking_mode in MODES:
        name = f"{journal_mode}-{synchronous}-{locking_mode}.sqlite".lower()
        con = sqlite3.connect(a / name, isolation_level=None)
        con.execute(f"PRAGMA journal_mode={journal_mode}")
        con.execute(f"PRAGMA synchronous={synchronous}")
        con.execute(f"PRAGMA locking_mode={locking_mode}")
        late = _lands_at_close(journal_mode, synchronous, locking_mode)
        # the first through a new journal; the others too in DELETE mode, or in
        # EXCLUSIVE locking mode (SQLite keeps the journal open), through the same one
        statements = ["CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)"]
        statements += [f"INSERT INTO t VALUES ({k}, randomblob(3000))" for k in range(1, 5)]
        for k, sql in enumerate(statements):
            con.execute(sql)
            if not late and not wait_for(lambda: query(b / name, "SELECT count(*) FROM t") == [(k,)]):
                missed.append(f"{name}: commit {k} not in the store after it returned")
                break
        con.close()
        if not wait_for(lambda: query(b / name, "SELECT count(*), sum(k) FROM t") == [(4, 10)]):
            missed.append(f"{name}: commits not in the store after the close")
    assert not missed, missed


#: a write transaction with synchronous=OFF and a small page cache: SQLite writes the
#: journal and then spills changed pages into the database, all into the page cache,
#: and the kernel sends none of it to the daemon yet; then waits
MID_TXN_OFF = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA synchronous=OFF")
c.execute("PRAGMA cache_size=20")
c.execute("BEGIN")
c.execute("UPDATE t SET data = randomblob(1000)")
print("ready", flush=True)
time.sleep(600)
"""


def test_an_fsync_of_the_database_by_another_process_mid_transaction_commits_nothing(mounts):
    a = mounts()
    b = mounts(store=a.store)
    db = a / "app.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        con.executemany("INSERT INTO t VALUES (?, randomblob(1000))", [(k,) for k in range(3000)])
        before = table_digest(con, "SELECT * FROM t ORDER BY k")
    con.close()
    assert wait_for(lambda: query(b / "app.sqlite", "SELECT count(*) FROM t") == [(3000,)])

    app = a.py(MID_TXN_OFF, str(db))
    try:
        assert app.stdout.readline().strip() == "ready", a.log_tail()
        # the kernel writes back the database's dirty pages (the transaction's, half
        # done) and sends the fsync, then the close: neither may commit them
        fd = os.open(db, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fresh = mounts(store=a.store)  # reads what the store holds, nothing cached
        with sqlite3.connect(f"file:{fresh / 'app.sqlite'}?mode=ro", uri=True) as con:
            assert table_digest(con, "SELECT * FROM t ORDER BY k") == before
        con.close()
    finally:
        os.kill(app.pid, signal.SIGKILL)  # its close hands the kernel's journal over: hot
        app.wait(10)

    with sqlite3.connect(db) as con:  # plays the hot journal back
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert table_digest(con, "SELECT * FROM t ORDER BY k") == before
    con.close()
    assert not os.path.exists(f"{db}-journal")
    with sqlite3.connect(b / "app.sqlite") as con:
        assert table_digest(con, "SELECT * FROM t ORDER BY k") == before
    con.close()


#: a write transaction that changed one row: its journal is created, and all of it is
#: still in the page cache (no fsync yet); commits when told to
SMALL_HOLDER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE counter SET v = v + 1")
print("ready", flush=True)
sys.stdin.readline()
con.execute("COMMIT")
print("committed", flush=True)
"""


def test_a_transaction_holds_its_write_lease_from_its_journals_create(mounts):
    a = mounts()
    b = mounts(store=a.store)
    new_counter(a, "c.db", b)
    holder = a.py(SMALL_HOLDER, str(a / "c.db"), stdin=subprocess.PIPE)

    def b_writer_waits() -> bool:
        con = sqlite3.connect(b / "c.db", timeout=0.2)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()  # B has not learned of A's lease yet
            return False
        except sqlite3.OperationalError as e:
            return "locked" in str(e)
        finally:
            con.close()

    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        # B's lock proxy holds RESERVED once it learns of A's lease (milliseconds)
        assert wait_for(b_writer_waits, timeout=5), "a writer on B did not wait for A's transaction"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed", holder.stderr.read()
    finally:
        holder.kill()
        holder.wait(10)
    assert wait_for(lambda: query(b / "c.db", "SELECT v FROM counter") == [(1,)])
