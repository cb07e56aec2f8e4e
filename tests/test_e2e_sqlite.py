"""Unmodified SQLite (the sqlite3 module and the sqlite3 CLI) on a real mount."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess

import pytest
from helpers import PY, child_env, integrity, opendb, table_digest

pytestmark = pytest.mark.timeout(120)

ALL_MODES = ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF", "WAL"]


def test_create_insert_query_python(mount):
    db = mount / "app.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, n REAL)")
        c.execute("CREATE INDEX t_name ON t(name)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t(name, n) VALUES (?, ?)", [(f"name{i:04d}", i * 1.5) for i in range(500)])
        c.execute("COMMIT")
        assert c.execute("SELECT count(*), sum(n) FROM t").fetchone() == (500, sum(i * 1.5 for i in range(500)))
        assert c.execute("SELECT id, n FROM t WHERE name = 'name0123'").fetchone() == (124, 123 * 1.5)
    # a second, fresh connection sees the same thing
    with opendb(db) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (500,)
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert "app.sqlite" in os.listdir(mount.mountpoint)
    st = os.stat(db)
    assert st.st_size > 0 and st.st_size % 512 == 0
    assert "event=mounted" in mount.log_text()


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 CLI not installed")
def test_sqlite3_cli(mount):
    db = mount / "cli.sqlite"

    def cli(sql: str) -> str:
        r = subprocess.run(["sqlite3", "-batch", str(db), sql], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"sqlite3 CLI failed: {r.stderr}"
        return r.stdout

    cli("CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT);"
        "BEGIN; " + " ".join(f"INSERT INTO kv VALUES ({i}, 'v{i}');" for i in range(200)) + " COMMIT;")
    assert cli("SELECT count(*), max(k) FROM kv;").strip() == "200|199"
    assert cli("SELECT v FROM kv WHERE k = 42;").strip() == "v42"
    assert cli("PRAGMA integrity_check;").strip() == "ok"
    # python reads what the CLI wrote, and the CLI reads what python wrote
    with opendb(db) as c:
        assert c.execute("SELECT count(*) FROM kv").fetchone() == (200,)
        c.execute("INSERT INTO kv VALUES (1000, 'from python')")
    assert cli("SELECT v FROM kv WHERE k = 1000;").strip() == "from python"
    dump = cli(".dump kv")
    assert "CREATE TABLE kv" in dump and "'from python'" in dump


CONCURRENT_WRITER = r"""
import sqlite3, sys
path, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(path, timeout=60, isolation_level=None)
c.execute("PRAGMA busy_timeout=60000")
for i in range(n):
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(w, i) VALUES (?, ?)", (wid, i))
    # read-modify-write: a lost update would show in the final counter
    (cur,) = c.execute("SELECT n FROM counter WHERE id = 1").fetchone()
    c.execute("UPDATE counter SET n = ? WHERE id = 1", (cur + 1,))
    c.execute("COMMIT")
    if i % 10 == 0:
        c.execute("SELECT count(*) FROM t").fetchone()  # readers interleave too
c.close()
print("done", wid, flush=True)
"""


@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_concurrent_processes(mounts, mode):
    m = mounts()
    db = m / "shared.sqlite"
    with opendb(db, journal_mode=mode) as c:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, w INTEGER, i INTEGER, UNIQUE(w, i))")
        c.execute("CREATE TABLE counter(id INTEGER PRIMARY KEY, n INTEGER)")
        c.execute("INSERT INTO counter VALUES (1, 0)")
    nproc, per = 4, 40
    procs = [m.py(CONCURRENT_WRITER, str(db), str(w), str(per)) for w in range(nproc)]
    for p in procs:
        out, err = p.communicate(timeout=100)
        assert p.returncode == 0, f"writer failed: {err}\n--- daemon log ---\n{m.log_tail()}"
        assert out.startswith("done")
    with opendb(db) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (nproc * per,)
        assert c.execute("SELECT n FROM counter").fetchone() == (nproc * per,)
        for w in range(nproc):
            assert c.execute("SELECT count(*), min(i), max(i) FROM t WHERE w = ?", (w,)).fetchone() == (per, 0, per - 1)
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    m = mounts.remount(m)
    assert integrity(m / "shared.sqlite") == "ok"
    with opendb(m / "shared.sqlite") as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (nproc * per,)


def test_persists_across_remount(mounts):
    m = mounts()
    with opendb(m / "a.sqlite") as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        for k in range(50):  # 50 small transactions
            c.execute("INSERT INTO t VALUES (?, ?)", (k, hashlib.sha256(str(k).encode()).digest() * 20))
        expect = table_digest(c, "SELECT * FROM t ORDER BY k")
    with opendb(m / "b.sqlite") as c:
        c.execute("CREATE TABLE u(x)")
        c.execute("INSERT INTO u VALUES ('second db')")
    m = mounts.remount(m)
    with opendb(m / "a.sqlite") as c:
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == expect
        c.execute("INSERT INTO t VALUES (1000, x'00')")
    with opendb(m / "b.sqlite") as c:
        assert c.execute("SELECT x FROM u").fetchall() == [("second db",)]
    # and once more: what the second mount wrote is there on the third
    m = mounts.remount(m)
    with opendb(m / "a.sqlite") as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (51,)
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_journal_modes_persist(mounts, mode):
    m = mounts()
    db = m / f"jm_{mode.lower()}.sqlite"
    rng = random.Random(mode)
    with opendb(db, journal_mode=mode) as c:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, txn INTEGER, v BLOB)")
        for txn in range(30):
            c.execute("BEGIN")
            for _ in range(4):
                c.execute("INSERT INTO t(txn, v) VALUES (?, ?)", (txn, rng.randbytes(rng.randrange(10, 3000))))
            c.execute("UPDATE t SET v = ? WHERE id = ?", (b"updated", txn + 1))
            c.execute("COMMIT")
        c.execute("DELETE FROM t WHERE txn = 7")
        expect = table_digest(c, "SELECT * FROM t ORDER BY id")
        assert expect[0] == 30 * 4 - 4
    # journal file conventions still hold (a plain SQLite behaviour on a working fs)
    names = os.listdir(m.mountpoint)
    if mode in ("DELETE", "MEMORY", "OFF"):
        assert not any(n.endswith("-journal") for n in names), names
    m = mounts.remount(m)
    with opendb(db) as c:
        assert table_digest(c, "SELECT * FROM t ORDER BY id") == expect
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if mode == "WAL":
            assert c.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        # still writable after the remount
        c.execute("INSERT INTO t(txn, v) VALUES (999, x'01')")
    assert integrity(db) == "ok"


WAL_APP = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
assert c.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
c.execute("PRAGMA wal_autocheckpoint=0")   # keep everything in the -wal file
c.execute("PRAGMA synchronous=FULL")
c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
for k in range(40):
    c.execute("INSERT INTO t VALUES (?, ?)", (k, "x" * k))
print("ready", flush=True)
time.sleep(300)
"""


def test_wal_file_survives_remount(mounts):
    """Committed transactions that live only in the -wal file (no checkpoint) survive a remount."""
    m = mounts()
    db = m / "wal.sqlite"
    app = m.py(WAL_APP, str(db))
    line = app.stdout.readline()
    assert line.strip() == "ready", f"app failed: {app.stderr.read() if app.poll() is not None else ''}"
    app.kill()  # no checkpoint on close: the data stays in -wal
    app.wait(10)
    wal = m / "wal.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 0
    m = mounts.remount(m)
    with opendb(db) as c:
        assert c.execute("SELECT count(*), sum(length(v)) FROM t").fetchone() == (40, sum(range(40)))
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_rollback_leaves_nothing(mounts, mode):
    m = mounts()
    db = m / "rb.sqlite"
    with opendb(db, journal_mode=mode) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, ?)", [(k, bytes([k % 256]) * 500) for k in range(100)])
        c.execute("COMMIT")
        before = table_digest(c, "SELECT * FROM t ORDER BY k")
        c.execute("PRAGMA cache_size=5")  # spill: changed pages reach the db file before ROLLBACK
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, ?)", [(k, os.urandom(1000)) for k in range(100, 1100)])
        c.execute("UPDATE t SET v = x'ff' WHERE k < 50")
        c.execute("DELETE FROM t WHERE k BETWEEN 50 AND 60")
        c.execute("ROLLBACK")
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == before
    with opendb(db) as c:
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == before
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    m = mounts.remount(m)
    with opendb(db) as c:
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == before
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_large_transaction_commits(mounts):
    m = mounts()
    db = m / "big.sqlite"
    blobs = [os.urandom(32 * 1024) for _ in range(64)]  # 2 MB, incompressible
    with opendb(db) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(blobs)))
        c.execute("COMMIT")
    digest = hashlib.sha256(b"".join(blobs)).hexdigest()

    def check(c):
        got = hashlib.sha256(b"".join(v for (v,) in c.execute("SELECT v FROM t ORDER BY k"))).hexdigest()
        assert got == digest
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    with opendb(db) as c:
        check(c)
    m = mounts.remount(m)
    with opendb(db) as c:
        check(c)


def test_sqlite_in_subdirectory_and_rename(mounts):
    """A database in a subdirectory, renamed with mv while closed, keeps working."""
    m = mounts()
    os.mkdir(m / "data")
    with opendb(m / "data" / "x.sqlite") as c:
        c.execute("CREATE TABLE t(v)")
        c.execute("INSERT INTO t VALUES (42)")
    r = subprocess.run(["mv", str(m / "data" / "x.sqlite"), str(m / "data" / "y.sqlite")], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    with opendb(m / "data" / "y.sqlite") as c:
        assert c.execute("SELECT v FROM t").fetchall() == [(42,)]
    m = mounts.remount(m)
    assert sorted(os.listdir(m / "data")) == ["y.sqlite"]
    assert integrity(m / "data" / "y.sqlite") == "ok"


def test_other_process_sees_commit_immediately(mounts):
    """A commit in one process is visible to a fresh reader process right away."""
    m = mounts()
    db = m / "vis.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(v)")
        for i in range(5):
            c.execute("INSERT INTO t VALUES (?)", (i,))
            r = subprocess.run(
                [PY, "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from t').fetchone()[0])", str(db)],
                capture_output=True, text=True, timeout=30, env=child_env(),
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == str(i + 1)


def test_cp_database_in_and_out(mounts, tmp_path):
    """A database built elsewhere, copied in with cp, works on the mount; copied out, it still works."""
    local = tmp_path / "local.sqlite"
    with opendb(local) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, ?)", [(k, f"v{k}" * 10) for k in range(3000)])
        c.execute("COMMIT")
    m = mounts()
    r = subprocess.run(["cp", str(local), str(m / "copied.sqlite")], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with opendb(m / "copied.sqlite") as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (3000,)
        c.execute("UPDATE t SET v = 'changed' WHERE k % 7 = 0")
        expect = table_digest(c, "SELECT * FROM t ORDER BY k")
    back = tmp_path / "back.sqlite"
    r = subprocess.run(["cp", str(m / "copied.sqlite"), str(back)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with opendb(back) as c:
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == expect
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


LOCK_HOLDER = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
c.execute("INSERT INTO t VALUES ('uncommitted')")
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
print("committed", flush=True)
"""


@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_locking_between_processes(mounts, mode):
    """SQLite's POSIX locks work across processes on the mount."""
    m = mounts()
    db = m / "lock.sqlite"
    with opendb(db, journal_mode=mode) as c:
        c.execute("CREATE TABLE t(v)")
    holder = mounts.py(LOCK_HOLDER, str(db), stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read() if holder.poll() is not None else ""
    c = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            c.execute("BEGIN IMMEDIATE")
        if mode == "DELETE":  # an exclusive lock keeps readers out too
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                c.execute("SELECT count(*) FROM t").fetchone()
        else:  # WAL readers are not blocked and see only committed data
            assert c.execute("SELECT count(*) FROM t").fetchone() == (0,)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
        assert holder.wait(20) == 0
        c.execute("PRAGMA busy_timeout=5000")
        assert c.execute("SELECT v FROM t").fetchall() == [("uncommitted",)]
        c.execute("BEGIN IMMEDIATE")
        c.execute("COMMIT")
    finally:
        c.close()
