"""Several mounts of one embedded store (how the tests model hosts): whole
transactions only, serialized writers, contention as SQLITE_BUSY or an error,
never a lost update."""
from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import time

import pytest
import trio
from helpers import page_cache_bytes, run_py
from native_path import native_on

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.transactions import Transactions
from fusesqlite.volume import ChangeSet, Volume

INCREMENT = r"""
import sqlite3, sys, time
path, n = sys.argv[1], int(sys.argv[2])
con = sqlite3.connect(path, timeout=30, isolation_level=None)
done = errors = 0
while done < n:
    try:
        con.execute("BEGIN IMMEDIATE")
        v = con.execute("SELECT v FROM counter").fetchone()[0]
        con.execute("UPDATE counter SET v = ?", (v + 1,))
        con.execute("COMMIT")
        done += 1
    except sqlite3.Error:
        errors += 1
        try:
            con.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        time.sleep(0.005)
print(done, errors, flush=True)
"""


def wait_for(predicate, timeout: float = 5.0):
    """Poll until ``predicate`` holds; errors count as "not yet" (a file may exist before
    the transaction that fills it has reached this mount)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (sqlite3.Error, OSError) as e:
            value, error = False, e
        else:
            error = None
        if value or time.monotonic() > deadline:
            if error is not None and not value:
                raise error
            return value
        time.sleep(0.02)


def query(path, sql, *args):
    con = sqlite3.connect(path, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def new_counter(first, name: str, *others) -> None:
    """A database ``name`` on mount ``first`` with ``counter(v) = 0``, once ``others`` see it."""
    con = sqlite3.connect(first / name)
    con.execute("CREATE TABLE counter(v INTEGER)")
    con.execute("INSERT INTO counter VALUES (0)")
    con.commit()
    con.close()
    for m in others:
        assert wait_for(lambda: (m / name).exists() and query(m / name, "SELECT v FROM counter") == [(0,)])


@pytest.mark.parametrize("n_mounts", [2, 3])
@pytest.mark.timeout(240)
def test_counter_incremented_from_every_mount_is_exact(mounts, n_mounts):
    first = mounts()
    ms = [first] + [mounts(store=first.store) for _ in range(n_mounts - 1)]
    new_counter(first, "counter.db", *ms[1:])
    per_process, procs = 20, []
    for m in ms:
        for _ in range(2):
            procs.append(m.py(INCREMENT, str(m / "counter.db"), str(per_process)))
    for p in procs:
        out, err = p.communicate(timeout=200)
        assert p.returncode == 0, err
        assert int(out.split()[0]) == per_process
    expected = per_process * len(procs)
    for m in ms:
        if not wait_for(lambda: query(m / "counter.db", "SELECT v FROM counter") == [(expected,)]):
            fresh = mounts(store=first.store)  # nothing cached: what the store holds
            seen = {str(x.mountpoint): query(x / "counter.db", "SELECT v FROM counter") for x in [*ms, fresh]}
            pytest.fail(f"expected {expected}, each mount (the last one new) reads {seen}")
        assert query(m / "counter.db", "PRAGMA integrity_check") == [("ok",)]


AUTOCOMMIT_LOOP = r"""
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
deadline = time.monotonic() + float(sys.argv[2])
done = errors = 0
longest = 0.0
messages = set()
while time.monotonic() < deadline:
    start = time.monotonic()
    try:
        con.execute("UPDATE counter SET v = v + 1")
        done += 1
    except sqlite3.Error as e:
        errors += 1  # SQLite's "disk I/O error": lost a race with the other mount
        messages.add(str(e))
    longest = max(longest, time.monotonic() - start)
print(done, errors, longest, flush=True)
print("|".join(sorted(messages)), flush=True)
"""


@pytest.mark.timeout(120)
def test_two_mounts_writing_flat_out_both_make_progress(mounts):
    """Each mount follows the other's commits about 10 ms late. Without a turn taken
    after a refusal, the mount whose view lagged a busy writer failed nearly every
    attempt (measured: 0 commits against 2,246, and 3,655 errors, in 6 s)."""
    a = mounts()
    b = mounts(store=a.store)
    new_counter(a, "flat.db", b)
    procs = [m.py(AUTOCOMMIT_LOOP, str(m / "flat.db"), "4") for m in (a, b)]
    results = []
    messages = set()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        counts, said = (out.split("\n") + [""])[:2]
        done, errors, longest = counts.split()
        results.append((int(done), int(errors), float(longest)))
        messages.update(m for m in said.split("|") if m)
    # a lost race is an error of the transaction (its journal's first write refused),
    # never of the journal's open ("unable to open database file")
    assert messages <= {"disk I/O error"}, messages
    (done_a, errors_a, longest_a), (done_b, errors_b, longest_b) = results
    total = done_a + done_b
    assert total > 0
    # a lock deadlock between the proxy and a local writer shows as a statement that
    # waits out SQLite's busy timeout (10 s) and fails; a lease hand-over takes
    # milliseconds, a waiter that stopped waiting holds a writer back WANT_SECONDS (2 s)
    assert max(longest_a, longest_b) < 5, f"a statement waited {max(longest_a, longest_b):.1f} s: lock deadlock"
    # no lease queue (docs/many-mounts.md, limits): the share is statistical. One mount
    # got 19-23% in 4 of 20 runs (2026-11-24, with either request loop); with new
    # journals through the page cache, 11.9% and 3.8% in about 190 runs (2026-11-25;
    # without, none under 1/8 in 85; shares alike otherwise, median 0.41-0.42 in 40
    # runs each); the failure this guards against is 0 : 2,246
    assert min(done_a, done_b) >= total / 40, f"unfair: A {done_a}, B {done_b} commits"
    assert errors_a + errors_b < total, f"{errors_a + errors_b} failed attempts for {total} commits"
    assert wait_for(lambda: query(a / "flat.db", "SELECT v FROM counter") == [(total,)]), (
        f"{query(a / 'flat.db', 'SELECT v FROM counter')} != {total} (A {done_a}, B {done_b} commits)")
    assert query(b / "flat.db", "PRAGMA integrity_check") == [("ok",)]


TRANSFERS = r"""
import random, sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
rng = random.Random(int(sys.argv[3]))
deadline = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < deadline:
    a, b = rng.sample(range(10), 2)
    amount = rng.randint(1, 20)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, a))
        con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
        con.execute("COMMIT")
        n += 1
    except sqlite3.Error:
        try:
            con.execute("ROLLBACK")
        except sqlite3.Error:
            pass
print(n, flush=True)
"""

READER = r"""
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
deadline = time.monotonic() + float(sys.argv[2])
sums, checks, seen = set(), set(), set()
while time.monotonic() < deadline:
    try:
        con.execute("BEGIN")
        s1 = con.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
        rows = tuple(con.execute("SELECT balance FROM accounts ORDER BY id"))
        time.sleep(0.005)  # commits elsewhere land meanwhile: this transaction must not see them
        s2 = con.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
        rows2 = tuple(con.execute("SELECT balance FROM accounts ORDER BY id"))
        checks.add(con.execute("PRAGMA quick_check").fetchone()[0])
        con.execute("COMMIT")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            continue
        raise
    sums.update((s1, s2))
    if rows != rows2:
        sums.add("changed within one read transaction")
    seen.add(rows)
print(sorted(map(str, sums)), sorted(checks), len(seen), flush=True)
"""


@pytest.mark.parametrize("reader_mount", ["read-write", "read-only"])
@pytest.mark.timeout(120)
def test_readers_on_another_mount_see_whole_transfers(mounts, reader_mount):
    a = mounts()
    b = mounts(store=a.store, extra_args=("--read-only",) if reader_mount == "read-only" else ())
    con = sqlite3.connect(a / "bank.db")
    con.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER)")
    con.executemany("INSERT INTO accounts VALUES (?, 100)", [(i,) for i in range(10)])
    con.commit()
    con.close()
    assert wait_for(lambda: (b / "bank.db").exists() and query(b / "bank.db", "SELECT count(*) FROM accounts") == [(10,)])
    writers = [a.py(TRANSFERS, str(a / "bank.db"), "6", str(seed)) for seed in (1, 2)]
    readers = [b.py(READER, str(b / "bank.db"), "6") for _ in range(2)]
    transfers = 0
    for w in writers:
        out, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
        transfers += int(out)
    assert transfers > 20
    for r in readers:
        out, err = r.communicate(timeout=60)
        assert r.returncode == 0, err
        assert "['1000']" in out and "changed" not in out, f"reader saw: {out}"
        assert "['ok']" in out, f"quick_check: {out}"
        assert int(out.split()[-1]) > 1, f"the reader never saw a transfer: {out}"
    final_a = query(a / "bank.db", "SELECT balance FROM accounts ORDER BY id")
    assert wait_for(lambda: query(b / "bank.db", "SELECT balance FROM accounts ORDER BY id") == final_a)
    # B's lock proxy must open the database, read-only mount or not: refused its open,
    # it takes no lock, and B's moves run under its readers' feet
    assert "event=proxy_open_failed" not in b.log_text()


@pytest.mark.timeout(120)
def test_a_mount_stopped_while_following_commits_exits_and_unmounts(mounts):
    """SIGTERM while another mount keeps committing, so that this mount's lock proxy
    opens and closes the database on its own mount all along: the daemon exits 0 and
    its mount goes. (The proxy once closed a file after the loop had stopped reading
    requests: the close waited for its flush for ever, and the process never died.)"""
    a = mounts()
    con = sqlite3.connect(a / "bank.db")
    con.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER)")
    con.executemany("INSERT INTO accounts VALUES (?, 100)", [(i,) for i in range(10)])
    con.commit()
    con.close()
    writer = a.py(TRANSFERS, str(a / "bank.db"), "60", "1")
    try:
        for _ in range(5):
            b = mounts(store=a.store, extra_args=("--read-only",))
            assert wait_for(lambda: query(b / "bank.db", "SELECT count(*) FROM accounts") == [(10,)])
            time.sleep(0.3)  # a few dozen of A's commits followed, each by the proxy
            b.stop()
    finally:
        writer.kill()
        writer.wait()


HOLDER = r"""
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE counter SET v = -1")
con.execute("INSERT INTO counter VALUES (-2)")
con.execute("PRAGMA cache_size = 1")
con.executemany("INSERT INTO counter VALUES (?)", [(-3,)] * 2000)  # spills into the file: journal active
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["kill -9", "frozen until its lease expires"])
@pytest.mark.timeout(120)
def test_dead_lease_holder_blocks_others_only_briefly(mounts, how):
    a = mounts(extra_args=("--lease-seconds", "2"))
    b = mounts(store=a.store, extra_args=("--lease-seconds", "2"))
    new_counter(a, "c.db", b)
    holder = a.py(HOLDER, str(a / "c.db"))
    assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
    # A started it on the lease it kept idle since its last commit; a transaction that
    # runs on marks the lease busy (coherence.PROMOTE_AFTER), and then nobody takes it
    time.sleep(0.5)
    if how == "kill -9":
        a.kill9()
    else:
        os.kill(a.pid, signal.SIGSTOP)  # alive but silent, like a host cut off
    started = time.monotonic()
    writer = b.py(INCREMENT, str(b / "c.db"), "5")
    out, err = writer.communicate(timeout=60)
    took = time.monotonic() - started
    assert writer.returncode == 0, err
    assert out.split()[0] == "5"
    if how != "kill -9":
        assert took > 1.0, f"B wrote after {took:.1f}s although A's 2 s lease had not expired"
        os.kill(a.pid, signal.SIGKILL)
        os.kill(a.pid, signal.SIGCONT)
        a.proc.wait(10)
    holder.kill()
    rows = query(b / "c.db", "SELECT v FROM counter")
    assert rows == [(5,)], f"the dead mount's transaction leaked: {rows[:5]}"
    assert query(b / "c.db", "PRAGMA integrity_check") == [("ok",)]


def open_by(pid: int) -> list[str]:
    """Paths that process ``pid`` has open (a file of its own mount would hang its exit)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.mark.timeout(120)
def test_a_mount_killed_while_its_lock_proxy_holds_a_file_exits(mounts):
    """While another mount writes a database, this mount's lock proxy holds it open on
    this very mount. The kernel closes a dying process's files before it lets go of
    /dev/fuse, so a daemon holding one hung in its exit for ever, its mount with it
    (every time, measured: `kill -9` with the proxy holding a file). The files are held
    by a helper process instead, which dies with the daemon."""
    a = mounts()
    b = mounts(store=a.store)
    new_counter(a, "c.db", b)
    writer = a.py(HOLDER, str(a / "c.db"))
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    helper = helper_of(b)
    db = str(b / "c.db")
    # B learns of A's busy lease and takes RESERVED on B's host, through the helper
    assert wait_for(lambda: db in open_by(helper), timeout=10), "B's lock proxy never held the database"
    assert db not in open_by(b.pid)
    started = time.monotonic()
    os.kill(b.pid, signal.SIGKILL)
    try:
        b.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("the killed daemon hung in its exit (a file of its own mount open)")
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{helper}") and open(f"/proc/{helper}/stat").read().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the lock holder outlived its daemon"
        time.sleep(0.05)
    print(f"daemon and helper gone {time.monotonic() - started:.2f} s after kill -9")
    writer.kill()
    writer.wait()
    assert query(a / "c.db", "PRAGMA integrity_check") == [("ok",)]


def helpers_of(m) -> list[int]:
    """The pids of mount ``m``'s own-mount helper processes (its daemon's children)."""
    return [int(pid) for pid in open(f"/proc/{m.pid}/task/{m.pid}/children").read().split()]


def helper_of(m) -> int:
    """The pid of mount ``m``'s own-mount helper process (its daemon's only child)."""
    children = helpers_of(m)
    assert len(children) == 1, f"the daemon should have one helper process: {children}"
    return children[0]


@pytest.mark.timeout(120)
def test_a_killed_helper_is_replaced_and_the_proxy_takes_its_locks_again(mounts):
    """The helper holds the lock proxy's files and does the syncfs a commit may need. Killed
    on its own, it takes its locks with it; without a new helper every later commit that
    needs syncfs would fail and the proxy stay down for the life of the mount."""
    a = mounts()
    b = mounts(store=a.store)
    new_counter(a, "c.db", b)
    writer = a.py(HOLDER, str(a / "c.db"))
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    db = str(b / "c.db")
    helper = helper_of(b)
    assert wait_for(lambda: db in open_by(helper), timeout=10), "B's lock proxy never held the database"
    os.kill(helper, signal.SIGKILL)
    assert wait_for(lambda: helpers_of(b) not in ([], [helper]), timeout=10), "no new helper after the old one was killed"
    replacement = helper_of(b)
    # the proxy holds the file, and RESERVED on it, again: B's writers wait for A's lease
    assert wait_for(lambda: db in open_by(replacement), timeout=10), "the proxy did not take its locks again"
    con = sqlite3.connect(db, timeout=0.5)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        con.execute("BEGIN IMMEDIATE")
    con.close()
    # a commit without SQLite's fsync needs the helper's syncfs of the mount
    other = sqlite3.connect(b / "off.db", isolation_level=None)
    other.execute("PRAGMA synchronous=OFF")
    other.execute("CREATE TABLE t(x)")
    other.execute("INSERT INTO t VALUES (42)")
    other.close()
    assert wait_for(lambda: query(a / "off.db", "SELECT x FROM t") == [(42,)], timeout=10)
    assert "event=own_mount_helper_restarted" in b.log_text()
    writer.kill()
    writer.wait()
    assert query(a / "c.db", "PRAGMA integrity_check") == [("ok",)]


SYNC_OFF_COMMIT = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA synchronous=OFF")
try:
    con.execute("CREATE TABLE t(x)")  # its commit point needs the helper's syncfs
    print("committed", flush=True)
except sqlite3.Error as e:
    print("refused", e, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_helper_killed_with_a_request_unread_is_replaced(mounts):
    """A helper that dies with a request of the daemon's still in its socket resets the
    connection (ECONNRESET, not end of file). Escaping the daemon's reader, that error
    would end the whole mount (seen once in a loop of this file). The helper is
    stopped first, so that the request waits unread for the kill."""
    b = mounts()
    helper = helper_of(b)
    os.kill(helper, signal.SIGSTOP)
    app = b.py(SYNC_OFF_COMMIT, str(b / "off.db"))
    time.sleep(1)  # the commit point's syncfs request is sent at once, and sits unread
    os.kill(helper, signal.SIGKILL)
    out, err = app.communicate(timeout=30)
    assert b.alive(), f"the daemon died with its helper:\n{b.log_tail()}"
    assert out.startswith(("committed", "refused")), (out, err)
    assert wait_for(lambda: helpers_of(b) not in ([], [helper]), timeout=10), "no new helper"
    con = sqlite3.connect(b / "again.db", isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE t(x)")  # the new helper serves the next syncfs
    con.execute("INSERT INTO t VALUES (1)")
    con.close()
    assert query(b / "again.db", "SELECT x FROM t") == [(1,)]
    assert "event=own_mount_helper_restarted" in b.log_text()


@pytest.mark.timeout(60)
def test_read_only_mount_refuses_writes_and_follows_commits(mounts):
    a = mounts()
    ro = mounts(store=a.store, extra_args=("--read-only",))
    con = sqlite3.connect(a / "r.db")
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    assert wait_for(lambda: (ro / "r.db").exists() and query(ro / "r.db", "SELECT count(*) FROM t") == [(1,)])
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        c = sqlite3.connect(ro / "r.db")
        c.execute("INSERT INTO t VALUES (2)")
        c.commit()
    for op in (lambda: (ro / "new.txt").write_text("x"), lambda: os.mkdir(ro / "d"), lambda: os.unlink(ro / "r.db")):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == 30  # EROFS
    con.execute("INSERT INTO t VALUES (3)")
    con.commit()
    con.close()
    assert wait_for(lambda: query(ro / "r.db", "SELECT x FROM t ORDER BY x") == [(1,), (3,)])
    assert sorted(os.listdir(ro.mountpoint)) == sorted(os.listdir(a.mountpoint))


@pytest.mark.timeout(120)
def test_a_mount_never_keeps_a_view_older_than_what_it_followed(mounts):
    """A lookup that read the store just before this mount applied another mount's
    commit must not put its older record back over the new one: the file would then be
    opened, and its blocks cached, at the old version for good (seen in about 1 in 100
    rounds)."""
    a = mounts()
    ro = mounts(store=a.store, extra_args=("--read-only",))
    for i in range(300):
        name = f"r{i}.db"
        con = sqlite3.connect(a / name)
        con.execute("CREATE TABLE t(x)")  # commits on its own: readers may see it empty first
        con.execute("INSERT INTO t VALUES (1)")
        con.commit()
        con.close()
        assert wait_for(lambda: query(ro / name, "SELECT count(*) FROM t") == [(1,)], timeout=3), (
            f"round {i}: the read-only mount kept {query(ro / name, 'SELECT count(*) FROM t')}"
        )


@pytest.mark.timeout(60)
def test_kernel_keeps_pages_across_own_commits_and_drops_them_on_others(mounts):
    """The kernel's page cache of a database outlives this mount's own commits (reads of
    unchanged pages never reach the daemon) and is dropped when another mount commits.

    With libfuse's default auto_inval_data (fuse_caps.py turns it off), the first
    getattr after every commit would show a new mtime and drop the whole cache."""
    a = mounts()
    b = mounts(store=a.store)
    db = a / "cached.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t(v) VALUES (randomblob(1000))", [()] * 2000)
    con.commit()
    size = os.path.getsize(db)
    (a / "cached.db").read_bytes()
    assert page_cache_bytes(db) >= size * 0.9, a.log_tail()
    for _ in range(3):  # commits of this mount, each followed by a new read transaction
        con.execute("INSERT INTO t(v) VALUES (x'01')")
        con.commit()
        assert con.execute("SELECT max(k) FROM t").fetchone() >= (2001,)
        os.stat(db)
    if native_on(a):
        assert page_cache_bytes(db) >= size * 0.9, f"own commits dropped the cache\n{a.log_tail()}"
    else:  # the documented cost of the pure-Python path (docs/portability.md)
        assert page_cache_bytes(db) < size / 2, f"auto_inval_data is on, yet own commits kept the cache\n{a.log_tail()}"
    # B follows A's commits a moment later; a transaction on an older view would fail
    assert wait_for(lambda: query(b / "cached.db", "SELECT max(k) FROM t") == [(2003,)])
    other = sqlite3.connect(b / "cached.db", timeout=30)
    other.execute("INSERT INTO t(v) VALUES (x'02')")
    other.commit()
    other.close()
    assert wait_for(lambda: query(db, "SELECT max(k) FROM t") == [(2004,)])  # reads a few pages only
    assert page_cache_bytes(db) < size / 2, "another mount's commit left this mount's cache in place"
    con.close()


@pytest.mark.timeout(60)
def test_namespace_changes_reach_other_mounts(mounts):
    a = mounts()
    b = mounts(store=a.store)
    assert not (b / "later.txt").exists()  # the kernel now caches this negative answer
    (a / "later.txt").write_text("hello")
    os.mkdir(a / "dir")
    assert wait_for(lambda: (b / "later.txt").exists()), "a file created on A never appeared on B"
    # write_text creates (one commit), then writes and closes (another): B may see it empty first
    assert wait_for(lambda: (b / "later.txt").read_text() == "hello")
    (a / "later.txt").write_text("changed!")
    assert wait_for(lambda: (b / "later.txt").read_text() == "changed!")
    os.rename(a / "later.txt", a / "dir" / "moved.txt")
    assert wait_for(lambda: not (b / "later.txt").exists() and (b / "dir" / "moved.txt").exists())
    assert sorted(os.listdir(b / "dir")) == ["moved.txt"]


@pytest.mark.timeout(120)
def test_creating_a_name_another_mount_just_created_never_replaces_it(mounts):
    """B's view may lag A's by a few milliseconds; a create on B of a name A just
    created must fail or open A's file, never replace it with an empty one."""
    a = mounts()
    b = mounts(store=a.store)
    lost = []
    for i in range(60):
        name = f"race{i}.sqlite"
        con = sqlite3.connect(a / name)
        con.execute("CREATE TABLE c(x)")
        con.execute("INSERT INTO c VALUES (1)")
        con.commit()
        con.close()
        try:  # plain connect creates the file if this mount does not see it yet
            sqlite3.connect(b / name).execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.Error:
            pass
        time.sleep(0.02)
        if wait_for(lambda: query(a / name, "SELECT x FROM c") == [(1,)], timeout=2) is not True:
            lost.append(name)
    assert not lost, f"A's databases replaced by B's creates: {lost}"
    print("creates refused on B:", b.log_text().count("event=namespace_conflict"))


def test_a_file_opened_again_starts_from_the_version_of_the_pages_the_kernel_holds(tmp_path):
    """The kernel keeps a file's pages across opens and drops them only in a move, so
    a file opened again must start from the record of those pages, not from a newer
    one: between another mount's commit and this mount's move to it (the move waits
    for SQLite's locks on this host), three mounts incrementing one counter lost an
    update in about 1 run in 12. Here a mount's follower (coherence/) and the
    kernel's page cache are played by hand on a real store; the counter tests above
    exercise the same through real mounts."""
    store = EmbeddedStore(tmp_path / "store")
    a, b = (Transactions(Volume(store, "default", author=n), cache_bytes=1 << 20, mount_id=n) for n in "ab")

    async def commit(fs, data: bytes) -> None:
        await a.write(fs, 0, data)
        await a.commit(fs, "test")

    async def opened(ino: int) -> tuple[bytes, int, bool]:
        """What a process opening the file on b reads, the data version its writes would
        be based on, and whether b's kernel keeps the pages it holds."""
        rec, keep_cache = await b.open_record(ino)
        fs = b.state(ino, rec, "f")
        try:
            return bytes(await b.read(fs, 0, 3)), fs.record.dver, keep_cache
        finally:
            b.forget_state(fs)

    async def main() -> None:
        await a.open_volume()
        await b.open_volume()
        ino = await a.new_ino()
        await a.commit_changes(ChangeSet(inodes={ino: Inode.new(stat.S_IFREG, 0o644, 0, 0)},
                                         dirents={(ROOT_INO, b"f"): ino}))
        fa = a.state(ino, await a.record(ino), "f")
        await commit(fa, b"one")
        one = fa.record.dver
        b.snapshot = a.snapshot
        # b's first open; its kernel (and block cache) hold "one" from here on
        assert await opened(ino) == (b"one", one, False)

        await commit(fa, b"two")
        two = fa.record.dver
        b.snapshot = a.snapshot  # b follows it (coherence._apply), and its move waits
        b.records.put(ino, None, b.snapshot)
        assert await opened(ino) == (b"one", one, True), "opened ahead of the pages it reads"
        await b.refresh(ino)  # the move (the kernel's pages go with it)
        assert await opened(ino) == (b"two", two, True)

        await commit(fa, b"six")  # not yet followed by b, but b commits another file after it
        six = fa.record.dver
        other = await b.new_ino()
        await b.commit_changes(ChangeSet(inodes={other: Inode.new(stat.S_IFREG, 0o644, 0, 0)}))
        found = await b.lookup(ROOT_INO, b"f")  # read as of b's own commit: "six"
        assert found is not None and found[1].dver == six
        assert await opened(ino) == (b"two", two, True), "a lookup ahead of the follower moved the view"
        await b.refresh(ino)
        assert await opened(ino) == (b"six", six, True)

        b.views.clear()  # a view forgotten: the kernel drops the file's pages at the open
        assert await opened(ino) == (b"six", six, False)

    trio.run(main)


CANCELLED_PROXY = r"""
import sys, time, trio
from fusesqlite.coherence import Coherence
from fusesqlite.own_mount import OwnMount
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.transactions import Transactions
from fusesqlite.volume import Volume

store_dir, db = sys.argv[1], sys.argv[2].encode()
volume = Volume(EmbeddedStore(store_dir), "default", author="test")
volume.open()
tx = Transactions(volume, cache_bytes=1 << 20, mount_id="test")

class Kernel:  # no kernel: the database's path is the local file db

    def abs_path(self, ino):
        return db

    def invalidate_entry(self, parent, name):
        pass

    async def moved(self, ino, rec):
        pass

    def known_inodes(self):
        return ()

holder = OwnMount.spawn()
coherence = Coherence(tx, Kernel(), holder, 10)

async def main():
    async with trio.open_nursery() as outer:
        outer.start_soon(holder.serve)
        with trio.CancelScope() as stopping:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(coherence.run)
                while coherence.nursery is None:
                    await trio.sleep(0.01)
                # another mount holds the lease: the proxy must take RESERVED here...
                p = coherence._proxy(2)
                p.want_reserved = True
                coherence._kick(2, p)
                # ...and the mount stops before its task reached its first lock
                stopping.cancel()
                started = time.monotonic()
        print(f"{time.monotonic() - started:.3f}", flush=True)
        await trio.to_thread.run_sync(holder.stop)
        outer.cancel_scope.cancel()

trio.run(main)
"""


def test_a_lock_proxy_cancelled_by_a_stopping_mount_lets_it_stop(tmp_path):
    """A stopping mount cancels its lock proxy. A proxy task cancelled while it still has
    to take RESERVED must not start a new one on its way out: that one would be
    cancelled at once and start the next, the event loop would spin and the daemon never
    exit (seen as 1 stop in 5 of two mounts writing flat out; killed with -9 after that,
    a daemon could hang in its exit). Real store, real lock file; the FUSE side plays no part."""
    db = tmp_path / "x.db"
    db.write_bytes(b"")
    try:
        r = run_py(CANCELLED_PROXY, tmp_path / "store", db, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the cancelled lock proxy kept restarting itself: coherence never stopped")
    assert float(r.stdout) < 5, r.stdout


def test_pages_written_without_a_journal_are_not_moved_under_another_mounts_commit(mounts):
    """journal_mode MEMORY with synchronous OFF: SQLite's commit leaves its pages dirty
    in B's kernel, and B's daemon sees them only at their write-back. A move of the
    file to A's commit must not take them as written on A's version: they are written
    on the version before, so B's commit of them fails (an error at commit, as
    documented), and A's update stays.

    Without the writeback cache (the pure-Python path) B's pages reach its daemon at
    once and the two commits race: whichever loses fails loudly, and no update is
    lost without an error."""
    a = mounts()
    b = mounts(store=a.store, debug=True)
    new_counter(a, "mem.db", b)
    cached = "writeback_cache=True" in b.log_text()
    a_failed = None
    con = sqlite3.connect(b / "mem.db", isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=MEMORY")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("UPDATE counter SET v = v + 1")  # on B: dirty in B's kernel, not yet in its daemon
        moves = b.log_text().count("event=moved ")
        try:
            with sqlite3.connect(a / "mem.db") as ca:
                ca.execute("UPDATE counter SET v = v + 10")
        except sqlite3.OperationalError as e:
            if cached:
                raise
            a_failed = e  # B's commit came first: A's transaction was on the version before
        if a_failed is None:
            assert wait_for(lambda: b.log_text().count("event=moved ") > moves, timeout=10), "B never moved"
    finally:
        con.close()  # B's daemon commits what it got: refused, A committed the file since
    if a_failed is not None:
        assert wait_for(lambda: query(a / "mem.db", "SELECT v FROM counter") == [(1,)]), (
            f"A failed ({a_failed}) but B's update is not what A reads: {query(a / 'mem.db', 'SELECT v FROM counter')}")
        return
    expected = [(10,)] if cached else None
    if expected is None:  # no page cache: B's commit may have landed first, then A's on it
        seen = query(a / "mem.db", "SELECT v FROM counter")
        expected = [(11,)] if seen == [(11,)] else [(10,)]
    assert wait_for(lambda: query(a / "mem.db", "SELECT v FROM counter") == expected), (
        f"A's update lost: A reads {query(a / 'mem.db', 'SELECT v FROM counter')}")
    assert wait_for(lambda: query(b / "mem.db", "SELECT v FROM counter") == expected)
    if expected == [(10,)]:
        assert "event=commit_failed" in b.log_text()
