"""The kernel's writeback cache: writes wait in the kernel until a commit point, and
what that must not break (docs/architecture.md, "Writeback cache").

- a commit takes the kernel's dirty pages even when SQLite never fsyncs
  (synchronous=OFF): after the commit point a dead daemon loses nothing;
- a stopping daemon takes what plain files left in the kernel before it exits;
- another mount's commits reach this kernel's idea of a file's size (it ignores
  the daemon's while the writeback cache is on);
- the kernel writing back a file's times costs no commit of its own.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess

import pytest
from native_path import native_on
from test_many_mounts import query, wait_for

#: a child that commits N rows with the given pragmas, says "committed", then waits
#: with the database still open (so no close hands its pages over)
COMMIT_AND_WAIT = r"""
import sqlite3, sys, time
path, journal_mode, synchronous, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
con = sqlite3.connect(path, isolation_level=None)
con.execute(f"PRAGMA journal_mode={journal_mode}")
con.execute(f"PRAGMA synchronous={synchronous}")
con.execute("BEGIN")
con.executemany("INSERT INTO t(v) VALUES (?)", ((i, ) for i in range(n)))
con.execute("COMMIT")
print("committed", flush=True)
time.sleep(600)
"""


def make_table(path) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.close()


@pytest.mark.parametrize("journal_mode", ["delete", "truncate", "persist"])
def test_commit_with_synchronous_off_survives_kill9_of_the_daemon(mounts, journal_mode):
    a = mounts()
    make_table(a / "off.sqlite")
    child = mounts.py(COMMIT_AND_WAIT, a / "off.sqlite", journal_mode, "OFF", 3000)
    assert child.stdout.readline().strip() == "committed", child.stderr.read()
    a.kill9()  # the kernel's dirty pages die with the connection
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    b = mounts.remount(a)
    assert query(b / "off.sqlite", "SELECT count(*), sum(v) FROM t") == [(3000, sum(range(3000)))]
    assert query(b / "off.sqlite", "PRAGMA integrity_check") == [("ok",)]


def test_stop_takes_what_an_open_plain_file_left_in_the_kernel(mounts):
    m = mounts()
    data = os.urandom(3 << 20)
    fd = os.open(m / "plain.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # no fsync, no close: the pages wait in the kernel
        m.stop()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
    m = mounts.remount(m)
    assert (m / "plain.bin").read_bytes() == data


def test_syncfs_of_the_mount_succeeds_after_sqlite_transactions(mounts):
    """The kernel writes back the times of journals already deleted: answering those
    with an error made syncfs(2) (sync -f) of the whole mount fail."""
    m = mounts()
    make_table(m / "s.sqlite")
    con = sqlite3.connect(m / "s.sqlite", isolation_level=None)
    for i in range(20):
        con.execute("INSERT INTO t(v) VALUES (?)", (i,))
    con.close()
    done = subprocess.run(["sync", "-f", str(m.mountpoint)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("how", ["unlink", "rename over"])
def test_a_database_deleted_and_created_again_under_its_name_commits(mounts, how):
    """SQLite's own tests delete test.db and create it again, with synchronous=OFF: the
    kernel still holds the times of the first file, gone from the store, and writes
    them back at the second one's commit (syncfs). That must not fail the commit."""
    m = mounts()
    db = m / "again.sqlite"
    for round_ in range(3):
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("PRAGMA synchronous=OFF")
        con.execute("CREATE TABLE t1(x)")
        con.execute("INSERT INTO t1 VALUES (?)", (round_,))
        con.close()
        if how == "unlink":
            os.unlink(db)
        else:
            make_table(m / "other.sqlite")
            os.rename(m / "other.sqlite", db)
            os.unlink(db)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE t1(x)")
    con.execute("INSERT INTO t1 VALUES (42)")
    con.close()
    assert "event=commit_failed" not in m.log_text()
    m = mounts.remount(m)
    assert query(m / "again.sqlite", "SELECT x FROM t1") == [(42,)]


def test_each_small_transaction_is_one_commit(mounts):
    """The kernel sends a database's new mtime before each fsync: it joins the
    transaction's commit instead of costing one of its own."""
    m = mounts(debug=True)
    make_table(m / "one.sqlite")
    con = sqlite3.connect(m / "one.sqlite", isolation_level=None)
    con.execute("INSERT INTO t(v) VALUES (0)")
    before = m.log_text().count("event=commit ")
    for i in range(30):
        con.execute("INSERT INTO t(v) VALUES (?)", (i,))
    after = m.log_text().count("event=commit ")
    mtime = os.stat(m / "one.sqlite").st_mtime_ns
    con.close()
    assert after - before == 30
    m = mounts.remount(m)
    # the kernel's time where it sent one, else the commit's: apart by no more than the commit
    assert abs(os.stat(m / "one.sqlite").st_mtime_ns - mtime) < 1_000_000_000


def test_another_mounts_growth_reaches_a_kernel_holding_the_file_open(mounts):
    a = mounts()
    b = mounts(store=a.store)
    make_table(a / "grow.sqlite")
    assert wait_for(lambda: query(b / "grow.sqlite", "SELECT count(*) FROM t") == [(0,)], timeout=20)
    held = sqlite3.connect(b / "grow.sqlite", timeout=30)
    try:
        assert held.execute("SELECT count(*) FROM t").fetchone() == (0,)
        small = os.stat(b / "grow.sqlite").st_size
        con = sqlite3.connect(a / "grow.sqlite")
        with con:
            con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(500),) for _ in range(2000)))
        con.close()
        big = os.stat(a / "grow.sqlite").st_size
        assert big > small * 10
        # without the new size, SQLite on b finds its header beyond the file: "malformed"
        assert wait_for(lambda: held.execute("SELECT count(*) FROM t").fetchone() == (2000,), timeout=20)
        assert held.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert os.fstat(os.open(b / "grow.sqlite", os.O_RDONLY)).st_size == big
    finally:
        held.close()


def test_another_mounts_shrink_is_seen_once_closed_here(mounts):
    a = mounts()
    b = mounts(store=a.store)
    make_table(a / "shrink.sqlite")
    con = sqlite3.connect(a / "shrink.sqlite")
    with con:
        con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(500),) for _ in range(2000)))
    big = os.stat(a / "shrink.sqlite").st_size
    assert wait_for(lambda: query(b / "shrink.sqlite", "SELECT count(*) FROM t") == [(2000,)], timeout=20)
    held = sqlite3.connect(b / "shrink.sqlite", timeout=30)
    try:
        assert held.execute("SELECT count(*) FROM t").fetchone() == (2000,)
        with con:
            con.execute("DELETE FROM t WHERE id > 10")
        con.execute("VACUUM")
        con.close()
        small = os.stat(a / "shrink.sqlite").st_size
        assert small < big // 10
        # SQLite on b reads the database's size from its header: right while the kernel is not
        assert wait_for(lambda: held.execute("SELECT count(*) FROM t").fetchone() == (10,), timeout=20)
        assert held.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        held.close()
    assert wait_for(lambda: os.stat(b / "shrink.sqlite").st_size == small, timeout=20)


def _writeback_said(m, state: str) -> str:
    """What the log says of the writeback cache: as the kernel's handshake settled it
    (event=fuse_caps, native path), else as the mount asked pyfuse3 for it
    (event=mounted; the pure-Python path sees no handshake, tests/native_path.py)."""
    return f"writeback_cache={state}" if native_on(m) else f"writeback_cache={state == 'on'}"


def test_without_writeback_cache(mounts):
    m = mounts(extra_args=("--no-writeback-cache",))
    assert m.wait_log(_writeback_said(m, "off"))
    make_table(m / "plain.sqlite")
    con = sqlite3.connect(m / "plain.sqlite", isolation_level=None)
    for i in range(10):
        con.execute("INSERT INTO t(v) VALUES (?)", (i,))
    con.close()
    m = mounts.remount(m)
    assert query(m / "plain.sqlite", "SELECT count(*) FROM t") == [(10,)]


def test_the_default_is_the_writeback_cache_only_where_the_kernel_makes_it_correct(mounts, tmp_path):
    """Before Linux 6.16 syncfs(2) of a FUSE mount can return with pages still queued, so
    a synchronous=OFF commit could miss them: the default there is without the cache.
    Without the native path libfuse's auto_inval_data stays on, and the cache with it
    left malformed databases after a kill -9 (tests/test_crash_modes.py): off there too,
    and --writeback-cache is refused in one line."""
    from helpers import run_cli
    from native_path import expected

    from fusesqlite.mount import WRITEBACK_CORRECT_SINCE, _kernel_release

    native, _ = expected()
    m = mounts()
    kernel_ok = _kernel_release() >= WRITEBACK_CORRECT_SINCE
    want = "on" if kernel_ok and native else "off"
    assert m.wait_log(_writeback_said(m, want))
    assert ("event=writeback_cache_off" in m.log_text()) == (kernel_ok and not native), m.log_tail()
    if not native:
        refused = tmp_path / "refused"
        refused.mkdir()
        done = run_cli("mount", str(refused), *m.where, "--writeback-cache")
        lines = [line for line in done.stderr.splitlines() if line.startswith("fusesqlite: error:")]
        assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "--writeback-cache needs the native path" in lines[0], lines[0]
        return
    forced = mounts(extra_args=("--writeback-cache",))
    assert forced.wait_log(_writeback_said(forced, "on"))
    assert ("event=old_kernel" in forced.log_text()) == (want == "off")


def test_writeback_cache_on_and_off_together_is_a_one_line_error():
    from helpers import run_cli

    done = run_cli("mount", "/nonexistent", "--writeback-cache", "--no-writeback-cache")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr and "Traceback" not in done.stderr
