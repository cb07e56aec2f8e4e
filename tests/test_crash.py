"""Crashes: kill -9 of the daemon mid-stream, kill -9 of an application mid-transaction."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest
from helpers import ONE_CPU, opendb, run_py, table_digest

pytestmark = pytest.mark.timeout(120)

#: ``PRAGMA synchronous`` reads back as a number
SYNC_LEVEL = {"OFF": 0, "NORMAL": 1, "FULL": 2}
#: a stream of small autocommit transactions (3 rows + a meta update each) at the given
#: journal mode and synchronous setting; prints each txn number after COMMIT returned.
#: With a limit (argv[7]) it closes the connection after that many and exits 0.
STREAM_WRITER = r"""
import sqlite3, sys
path, mode, sync, first, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
limit = int(sys.argv[7]) if len(sys.argv) > 7 else None
c = sqlite3.connect(path, timeout=30, isolation_level=None)
got = c.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
assert got.lower() == mode.lower(), got
c.execute(f"PRAGMA synchronous={sync}")
level = c.execute("PRAGMA synchronous").fetchone()[0]
assert level == int(sys.argv[6]), (sync, level)
txn = first
try:
    while limit is None or txn < first + limit:
        c.execute("BEGIN")
        for k in range(3):
            c.execute("INSERT INTO t(txn, k, data) VALUES (?, ?, randomblob(? + abs(random() % 1500)))", (txn, k, size))
        c.execute("UPDATE meta SET last = ?, n = n + 3 WHERE id = 1", (txn,))
        c.execute("COMMIT")
        print(txn, flush=True)
        txn += 1
    c.close()
except BaseException as e:
    print(f"writer stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
"""


def _setup_stream_db(db, mode):
    with opendb(db, journal_mode=mode) as c:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, txn INTEGER, k INTEGER, data BLOB)")
        c.execute("CREATE INDEX t_txn ON t(txn)")
        c.execute("CREATE TABLE meta(id INTEGER PRIMARY KEY, last INTEGER, n INTEGER)")
        c.execute("INSERT INTO meta VALUES (1, 0, 0)")


class _Lines:
    """Collects a pipe's lines in a thread (mixing readline and communicate loses data)."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = False
        self.t = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.t.start()

    def _run(self, pipe):
        for line in pipe:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.lines) >= n or self.eof, timeout)


def _run_stream_until(mounts, m, db, mode, first, acks_before, action, size=200, writer_box=None):
    """Start the writer, wait for ``acks_before`` acknowledged commits, then run ``action``;
    returns the set of acknowledged txn numbers and the writer's stderr."""
    w = mounts.py(STREAM_WRITER, str(db), mode, "FULL", str(first), str(size), str(SYNC_LEVEL["FULL"]))
    if writer_box is not None:
        writer_box.append(w)
    out = _Lines(w.stdout)
    out.wait_for(acks_before, 60)
    if len(out.lines) < acks_before:
        w.kill()
        w.wait(10)
        pytest.fail(f"writer stopped/slow (rc {w.returncode}) after {len(out.lines)} commits: {w.stderr.read()}\n"
                    f"--- daemon log ---\n{m.log_tail()}", pytrace=False)
    action()
    try:
        w.wait(30)
        note = ""
    except subprocess.TimeoutExpired:  # still writing into a mount that did not go away
        w.kill()
        w.wait(10)
        note = "\n(writer was still running 30 s after the action; killed)"
    out.t.join(10)
    err = w.stderr.read() + note
    # everything the writer printed was acknowledged (printed after COMMIT returned)
    return {int(x) for x in out.lines}, err


def _check_stream_db(db, acked: set[int], first: int):
    with opendb(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = c.execute("SELECT txn, count(*), group_concat(k) FROM t GROUP BY txn ORDER BY txn").fetchall()
        present = {txn for txn, _, _ in rows}
        partial = [(txn, n, ks) for txn, n, ks in rows if n != 3]
        assert not partial, f"half-applied transactions: {partial}"
        missing = sorted(acked - present)
        assert not missing, f"acknowledged transactions lost: {missing[:20]} (of {len(missing)})"
        # at most the one in-flight transaction beyond the acknowledged ones
        extra = sorted(present - acked)
        assert all(x >= first for x in extra) and len([x for x in extra if x > max(acked)]) <= 1, extra
        last, n = c.execute("SELECT last, n FROM meta WHERE id = 1").fetchone()
        total = c.execute("SELECT count(*) FROM t").fetchone()[0]
        assert n == total, "meta.n disagrees with the rows: a transaction applied only partly"
        assert last == max(present), (last, max(present))
        return max(present)


# MEMORY and OFF: SQLite's commit is its fsync of the database file, which is where the
# file system commits; a kill -9 of the daemon (not of the app) must not leave half a transaction.
@pytest.mark.parametrize("mode", ["DELETE", "TRUNCATE", "PERSIST", "WAL", "MEMORY", "OFF"])
def test_kill9_daemon_during_commit_stream(mounts, mode):
    _kill9_daemon_stream(mounts, mode)


@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_kill9_daemon_during_commits_on_the_event_loop(mounts, mode):
    """The same with the daemon on one CPU, where small commits run on its event loop
    (mount.py's _commit_inline): acknowledged means in the store there too."""
    m = _kill9_daemon_stream(mounts, mode, cpus=ONE_CPU)
    assert "event=commit_path inline=yes cpus=1" in m.log_text(), m.log_tail()


def _kill9_daemon_stream(mounts, mode, cpus=None):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    m = mounts(cpus=cpus)
    db = m / "crash.sqlite"
    _setup_stream_db(db, mode)
    first = 1
    all_acked: set[int] = set()
    for round_ in range(3):
        delay = rng.uniform(0, 0.1)

        def kill():
            time.sleep(delay)  # a random instant in the stream
            m.kill9()

        acked, err = _run_stream_until(mounts, m, db, mode, first, rng.randint(3, 30), kill)
        assert acked, "no commit acknowledged"
        # the writer was still going when the daemon died, and noticed
        assert "writer stopped" in err, f"writer did not see the daemon die: {err!r}"
        all_acked |= acked
        m = mounts.remount(m)  # cleans up the dead mount first
        last = _check_stream_db(db, all_acked, 1)
        print(f"round {round_}: delay={delay:.3f} acked={len(acked)} last={last} writer: {err.strip()}")
        first = last + 1
    return m


@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_kill9_daemon_during_big_transactions(mounts, mode):
    """Transactions of ~60-100 KB each (overflow pages): more of the kill instants land mid-commit."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    m = mounts()
    db = m / "bigcrash.sqlite"
    _setup_stream_db(db, mode)
    first, all_acked = 1, set()
    for round_ in range(3):
        delay = rng.uniform(0, 0.1)

        def kill():
            time.sleep(delay)
            m.kill9()

        acked, err = _run_stream_until(mounts, m, db, mode, first, rng.randint(2, 12), kill, size=20_000)
        assert "writer stopped" in err, err
        all_acked |= acked
        m = mounts.remount(m)
        first = _check_stream_db(db, all_acked, 1) + 1


@pytest.mark.parametrize("mode", ["DELETE", "TRUNCATE", "PERSIST", "WAL"])
def test_kill9_app_during_commit_stream(mounts, mode):
    """kill -9 of the application at random instants (possibly inside COMMIT): the next opener
    sees every acknowledged transaction and no half one."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    m = mounts()
    db = m / "appcrash.sqlite"
    _setup_stream_db(db, mode)
    first, all_acked = 1, set()
    for round_ in range(4):
        box: list = []
        delay = rng.uniform(0, 0.05)

        def kill_app():
            time.sleep(delay)
            box[0].kill()

        acked, err = _run_stream_until(mounts, m, db, mode, first, rng.randint(2, 20), kill_app,
                                       size=rng.choice([200, 20_000]), writer_box=box)
        all_acked |= acked
        first = _check_stream_db(db, all_acked, 1) + 1  # the next opener, on the same mount
    assert m.alive(), m.log_tail()
    m = mounts.remount(m)
    _check_stream_db(db, all_acked, 1)


def test_kill9_daemon_plain_files_fsync_and_close(mounts):
    """Plain files commit on fsync and on close: both survive a kill -9 of the daemon right after."""
    m = mounts()
    a, b, c = os.urandom(300_000), os.urandom(70_000), os.urandom(5000)
    with open(m / "closed.bin", "wb") as f:
        f.write(b)
    with open(m / "existing.bin", "wb") as f:
        f.write(c)
    f = open(m / "fsynced.bin", "wb")
    try:
        f.write(a)
        f.flush()
        os.fsync(f.fileno())
        # an overwrite in place, fsynced
        with open(m / "existing.bin", "r+b") as g:
            g.seek(1000)
            g.write(b"X" * 100)
            g.flush()
            os.fsync(g.fileno())
        m.kill9()
    finally:
        try:
            f.close()
        except OSError:
            pass  # the daemon is gone
    m = mounts.remount(m)
    assert (m / "fsynced.bin").read_bytes() == a
    assert (m / "closed.bin").read_bytes() == b
    assert (m / "existing.bin").read_bytes() == c[:1000] + b"X" * 100 + c[1100:]


@pytest.mark.parametrize("mode", ["DELETE", "WAL"])
def test_sigterm_during_commit_stream_exits_0_and_keeps_commits(mounts, mode):
    m = mounts()
    db = m / "term.sqlite"
    _setup_stream_db(db, mode)
    rcs = []

    def term():
        time.sleep(random.uniform(0, 0.1))
        os.kill(m.pid, signal.SIGTERM)
        try:
            rcs.append(m.proc.wait(30))
        except Exception as e:  # noqa: BLE001
            rcs.append(repr(e))

    acked, _ = _run_stream_until(mounts, m, db, mode, 1, 10, term)
    assert rcs == [0], f"daemon exit status after SIGTERM with a writer running: {rcs}\n{m.log_tail()}"
    m = mounts.remount(m)
    _check_stream_db(db, acked, 1)


#: opens a big transaction, writes a lot (spilling to the db file / -wal), prints ready, sleeps
MID_TXN_APP = r"""
import sqlite3, sys, time
path, mode = sys.argv[1], sys.argv[2]
c = sqlite3.connect(path, isolation_level=None)
got = c.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
assert got.lower() == mode.lower(), got
c.execute("PRAGMA cache_size=10")   # force the pager to spill changed pages before COMMIT
c.execute("BEGIN")
for i in range(600):
    c.execute("INSERT INTO t(k, data) VALUES (?, randomblob(1500))", (10_000 + i,))
c.execute("UPDATE t SET data = x'00' WHERE k < 20")
c.execute("DELETE FROM t WHERE k >= 20 AND k < 40")
c.execute("CREATE TABLE newtable(x)")
print("ready", flush=True)
time.sleep(300)
"""

READER = r"""
import sqlite3, sys, json, hashlib
c = sqlite3.connect(sys.argv[1], timeout=30)
h = hashlib.sha256(); n = 0
for row in c.execute("SELECT * FROM t ORDER BY k"):
    h.update(repr(row).encode()); n += 1
tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
print(json.dumps({"n": n, "sha": h.hexdigest(), "tables": tables,
                  "integrity": c.execute("PRAGMA integrity_check").fetchall()}))
"""


def _kill_app_mid_transaction(mounts, m, db, mode):
    app = mounts.py(MID_TXN_APP, str(db), mode)
    line = app.stdout.readline()
    if line.strip() != "ready":
        app.wait(10)
        pytest.fail(f"app did not get ready: {line!r} {app.stderr.read()}\n{m.log_tail()}", pytrace=False)
    os.kill(app.pid, signal.SIGKILL)
    app.wait(10)
    # the test is only meaningful if the transaction had reached the files: a hot journal / -wal tail
    side = f"{db}-wal" if mode == "WAL" else f"{db}-journal"
    assert os.path.exists(side) and os.path.getsize(side) > 0, (
        f"no non-empty {os.path.basename(side)} after the kill: {os.listdir(os.path.dirname(db))}")


@pytest.mark.parametrize("mode", ["DELETE", "TRUNCATE", "PERSIST", "WAL"])
def test_kill9_app_mid_transaction(mounts, mode):
    m = mounts()
    db = m / "app.sqlite"
    with opendb(db, journal_mode=mode) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, randomblob(700))", [(k,) for k in range(300)])
        c.execute("COMMIT")
        c.execute("INSERT INTO t VALUES (5000, 'last committed')")
        before = table_digest(c, "SELECT * FROM t ORDER BY k")

    def expect_committed_state(where):
        r = json.loads(run_py(READER, db, timeout=60).stdout)
        assert r["integrity"] == [["ok"]], (where, r["integrity"])
        assert r["tables"] == ["t"], (where, r["tables"])
        assert (r["n"], r["sha"]) == before, f"{where}: state differs from the last committed one"

    # 1) another process opens right after the kill (rolls back the hot journal / ignores the -wal tail)
    _kill_app_mid_transaction(mounts, m, db, mode)
    expect_committed_state("reader after app kill -9")
    m = mounts.remount(m)
    expect_committed_state("after remount")
    # 2) nobody opens it before the remount: the hot journal / -wal must survive the remount as is
    _kill_app_mid_transaction(mounts, m, db, mode)
    m = mounts.remount(m)
    expect_committed_state("first opener after remount")
    with opendb(db) as c:
        c.execute("INSERT INTO t VALUES (6000, 'after')")
        assert c.execute("SELECT count(*) FROM t").fetchone() == (before[0] + 1,)


#: one transaction far over the store's 10 MB limit (stored whole, or refused whole)
HUGE_TXN_APP = r"""
import sqlite3, sys, os, hashlib
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
blob = os.urandom(12 * 1024 * 1024)
c.execute("BEGIN")
c.execute("INSERT INTO big VALUES (1, ?)", (blob,))
c.execute("INSERT INTO sums VALUES (1, ?, ?)", (hashlib.sha256(blob).hexdigest(), len(blob)))
print("committing", flush=True)
try:
    c.execute("COMMIT")
    print("committed", flush=True)
except sqlite3.Error as e:
    print("refused", e, flush=True)
"""


@pytest.mark.timeout(180)
def test_kill9_daemon_during_huge_commit(mounts):
    """kill -9 of the daemon while a > 10 MB transaction commits: after remount it is there
    whole or not at all (never half staged), and the database passes integrity_check."""
    rng = random.Random()
    m = mounts()
    db = m / "huge.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, data BLOB)")
        c.execute("CREATE TABLE sums(id INTEGER PRIMARY KEY, sha TEXT, n INTEGER)")
    outcomes = []
    for round_ in range(2):
        with opendb(db) as c:
            c.execute("DELETE FROM big")
            c.execute("DELETE FROM sums")
        app = mounts.py(HUGE_TXN_APP, str(db))
        assert app.stdout.readline().strip() == "committing", app.stderr.read() if app.poll() is not None else ""
        time.sleep(rng.uniform(0, 0.3))
        m.kill9()
        out, err = app.communicate(timeout=60)
        m = mounts.remount(m)
        with opendb(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            sums = c.execute("SELECT sha, n FROM sums").fetchall()
            rows = c.execute("SELECT data FROM big").fetchall()
            if sums:
                assert len(rows) == 1, "sums row without its blob: half a transaction"
                assert (hashlib.sha256(rows[0][0]).hexdigest(), len(rows[0][0])) == sums[0]
                outcomes.append("whole")
            else:
                assert rows == [], "blob without its sums row: half a transaction"
                assert "committed" not in out, "COMMIT returned but the transaction is gone"
                outcomes.append("none")
    print("outcomes:", outcomes)
