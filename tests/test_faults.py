"""Faults: corrupt blocks, a full or read-only store, transactions over the store's limits, long names."""
from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time

import pytest
from helpers import MB, fill_until_enospc, integrity, opendb, table_digest

from fusesqlite.keyspace import Keyspace

pytestmark = pytest.mark.timeout(150)

VOLUME = "faultvol"
DB_ERRORS = ("disk I/O error", "database or disk is full")


def _store_db(m) -> str:
    p = os.path.join(m.store, "store.sqlite")
    assert os.path.exists(p), f"embedded store layout changed? {p} missing: {os.listdir(m.store)}"
    return p


def _block_rows(store_sqlite: str, volume: str, ino: int) -> list[tuple[bytes, int, int]]:
    """(key, block_no, value length) of every stored version of every block of ``ino``."""
    ks = Keyspace(volume)
    b, e = ks.blocks(ino)
    con = sqlite3.connect(store_sqlite)
    try:
        rows = con.execute("SELECT k, length(v) FROM kv WHERE k >= ? AND k < ? ORDER BY k", (b, e)).fetchall()
    finally:
        con.close()
    out = []
    for k, n in rows:
        parts = ks.parts(k)
        assert parts[0] == "b" and parts[1] == ino, parts
        out.append((k, parts[2], n))
    return out


def _corrupt(store_sqlite: str, keys: list[bytes]) -> None:
    """Flip one byte in the middle of each value (the store must be unmounted)."""
    con = sqlite3.connect(store_sqlite)
    try:
        for k in keys:
            (v,) = con.execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()
            assert len(v) > 0, "a tombstone is not a block"
            v = bytearray(v)
            v[len(v) // 2] ^= 0x5A
            con.execute("UPDATE kv SET v = ? WHERE k = ?", (bytes(v), k))
        con.commit()
    finally:
        con.close()


def _make_db(path, rows=2000):
    with opendb(path) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, randomblob(500))", [(k,) for k in range(rows)])
        c.execute("COMMIT")
        return table_digest(c, "SELECT * FROM t ORDER BY k")


#: SQLite >= 3.38 turns EIO from read() into SQLITE_IOERR_CORRUPTFS, reported as
#: SQLITE_CORRUPT ("database disk image is malformed"); EIO elsewhere is "disk I/O error".
#: Which one the app sees says nothing about wrong data; _assert_pages_eio_or_exact does.
EIO_MESSAGES = ("disk I/O error", "database disk image is malformed")


def _assert_eio(excinfo, m):
    msg = str(excinfo.value)
    assert any(e in msg for e in EIO_MESSAGES), (
        f"expected 'disk I/O error' (EIO), got {type(excinfo.value).__name__}: {msg}")


def _assert_pages_eio_or_exact(path, original: bytes, page: int = 4096) -> int:
    """Every page of ``path`` reads back exactly as before or fails with EIO; returns the EIO count."""
    fd = os.open(path, os.O_RDONLY)
    eio, wrong = 0, []
    try:
        assert os.fstat(fd).st_size == len(original)
        for off in range(0, len(original), page):
            try:
                got = os.pread(fd, page, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                eio += 1
                continue
            if got != original[off : off + page]:
                wrong.append((off, len(got)))
    finally:
        os.close(fd)
    assert not wrong, f"wrong data (offset, length) instead of EIO: {wrong[:10]}"
    assert os.stat(path).st_size == len(original), "the file's size changed after failed reads"
    return eio


@pytest.mark.embedded
@pytest.mark.parametrize("which", ["all_blocks", "one_block"])
def test_corrupt_block_gives_eio(mounts, which):
    m = mounts(volume=VOLUME)
    db = m / "app.sqlite"
    _make_db(db)
    original = db.read_bytes()
    (m / "other.txt").write_bytes(b"still fine\n" * 1000)
    ino = os.stat(db).st_ino
    m.stop()
    store = _store_db(m)
    rows = _block_rows(store, VOLUME, ino)
    assert rows, f"no block keys for inode {ino} in {store} (Keyspace.blocks layout not used?)"
    block_nos = sorted({b for _, b, _ in rows})
    if which == "all_blocks":
        keys = [k for k, _, _ in rows]
    else:
        target = block_nos[len(block_nos) // 2] if len(block_nos) > 1 else block_nos[0]
        keys = [k for k, b, _ in rows if b == target]
    _corrupt(store, keys)
    m = mounts.remount(m)
    with pytest.raises(sqlite3.DatabaseError) as ei:
        c = sqlite3.connect(db, timeout=5)
        try:
            c.execute("SELECT * FROM t").fetchall()
            c.execute("SELECT sum(length(data)) FROM t").fetchall()
        finally:
            c.close()
    _assert_eio(ei, m)
    assert m.wait_log("event=block_corrupt", 5), f"no event=block_corrupt in the log:\n{m.log_tail()}"
    bad = [line for line in m.log_text().splitlines() if "event=block_corrupt" in line]
    assert any("app.sqlite" in line for line in bad), f"block_corrupt lines do not name the file: {bad}"
    # at the file level: EIO for the bad blocks, exact bytes for the rest, never wrong data
    assert _assert_pages_eio_or_exact(db, original) >= 1
    # the rest of the mount works
    assert (m / "other.txt").read_bytes() == b"still fine\n" * 1000
    with opendb(m / "fresh.sqlite") as c:
        c.execute("CREATE TABLE x(v)")
        c.execute("INSERT INTO x VALUES (1)")
    assert integrity(m / "fresh.sqlite") == "ok"
    # still an error (not wrong data) on a second try
    with pytest.raises(sqlite3.DatabaseError) as ei:
        with opendb(db) as c:
            c.execute("SELECT * FROM t").fetchall()
    _assert_eio(ei, m)
@pytest.mark.embedded
def test_corrupt_block_plain_file(mounts):
    m = mounts(volume=VOLUME)
    data = os.urandom(400_000)
    (m / "plain.bin").write_bytes(data)
    ino = os.stat(m / "plain.bin").st_ino
    m.stop()
    store = _store_db(m)
    rows = _block_rows(store, VOLUME, ino)
    assert rows
    _corrupt(store, [k for k, _, _ in rows])
    m = mounts.remount(m)
    with pytest.raises(OSError) as ei:
        (m / "plain.bin").read_bytes()
    assert ei.value.errno == errno.EIO
    r = subprocess.run(["cat", str(m / "plain.bin")], capture_output=True, timeout=30)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert any("event=block_corrupt" in line and "plain.bin" in line for line in m.log_text().splitlines()), m.log_tail()
    assert _assert_pages_eio_or_exact(m / "plain.bin", data) == len(data) // 4096 + 1
    # stat and listing still work; the file can be removed and the name reused
    assert os.stat(m / "plain.bin").st_size == len(data)
    assert "plain.bin" in os.listdir(m.mountpoint)
    os.unlink(m / "plain.bin")
    (m / "plain.bin").write_bytes(b"replaced")
    assert (m / "plain.bin").read_bytes() == b"replaced"
@pytest.mark.embedded
def test_corrupt_middle_block_plain_file(mounts):
    """One bad block in the middle: EIO there only; the blocks around it read exactly."""
    m = mounts(volume=VOLUME)
    data = os.urandom(64 * 4096)
    (m / "mid.bin").write_bytes(data)
    ino = os.stat(m / "mid.bin").st_ino
    m.stop()
    store = _store_db(m)
    rows = _block_rows(store, VOLUME, ino)
    block_nos = sorted({b for _, b, _ in rows})
    target = block_nos[len(block_nos) // 2]
    _corrupt(store, [k for k, b, _ in rows if b == target])
    m = mounts.remount(m)
    with pytest.raises(OSError) as ei:
        (m / "mid.bin").read_bytes()
    assert ei.value.errno == errno.EIO
    assert _assert_pages_eio_or_exact(m / "mid.bin", data) >= 1


def _assert_db_error(excinfo):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, sqlite3.OperationalError) and any(e in msg for e in DB_ERRORS), (
        f"expected OperationalError 'disk I/O error' or 'database or disk is full', got "
        f"{type(excinfo.value).__name__}: {msg}")


def _failing_insert(db, nbytes: int):
    with opendb(db) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (?, ?)", (-1, os.urandom(nbytes)))
        c.execute("COMMIT")


@pytest.fixture
def small_tmpfs(tmp_path, root_only):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr}")
    try:
        yield d
    finally:
        # the fusesqlite mount using it is torn down first (mounts fixture is set up later)
        subprocess.run(["umount", str(d)], capture_output=True)
        if any(line.split()[1] == str(d) for line in open("/proc/mounts")):
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _after_fault_checks(m, db, before, where, problems: list[str]):
    """State intact + integrity ok (asserted); a new transaction works right away (recorded in
    ``problems`` so the rest of the test still runs and reports everything)."""
    with opendb(db) as c:
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == before, f"{where}: state changed"
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)], where
        try:  # the mount keeps serving: a new transaction works right away
            c.execute("INSERT INTO t VALUES (100000, 'new row')")
        except sqlite3.Error as e:
            time.sleep(2)
            try:
                c.execute("INSERT INTO t VALUES (100000, 'new row')")
                later = "the same insert worked 2 s later (stale kernel entry/attr cache?)"
            except sqlite3.Error as e2:
                later = f"still failing 2 s later: {e2}"
            problems.append(f"{where}: a new transaction failed: {type(e).__name__}: {e}; {later}; "
                            f"mount dir: {os.listdir(os.path.dirname(db))}")
        assert c.execute("SELECT count(*) FROM t").fetchone() == (before[0] + 1,)
        c.execute("DELETE FROM t WHERE k = 100000")


def test_store_disk_full(small_tmpfs, mounts):
    store = small_tmpfs / "store"
    m = mounts(store=store, volume=VOLUME)
    db = m / "full.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        for k in range(50):
            c.execute("INSERT INTO t VALUES (?, randomblob(300))", (k,))
        before = table_digest(c, "SELECT * FROM t ORDER BY k")
    filler = small_tmpfs / "filler"
    fill_until_enospc(filler)
    try:
        with pytest.raises(sqlite3.Error) as ei:
            _failing_insert(db, MB)
        _assert_db_error(ei)
        assert m.wait_log("event=commit_failed", 5), f"no event=commit_failed in the log:\n{m.log_tail()}"
        # plain files: an fsync/close on a full store reports an error too
        with pytest.raises(OSError) as ei2:
            with open(m / "plain.bin", "wb") as f:
                f.write(os.urandom(MB))
                f.flush()
                os.fsync(f.fileno())
        assert ei2.value.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG), ei2.value
    finally:
        os.unlink(filler)
    assert m.alive(), f"daemon died on a full store:\n{m.log_tail()}"
    problems: list[str] = []
    _after_fault_checks(m, db, before, "after the disk has room again (same mount)", problems)
    m = mounts.remount(m)
    _after_fault_checks(m, db, before, "after remount", problems)
    assert not problems, problems


@pytest.mark.timeout(200)
def test_transaction_over_store_limit(mounts):
    """A store that refuses what a commit needs: here its values may hold 2,000 bytes,
    and a page of random bytes does not compress below that.

    The commit fails at COMMIT (OperationalError), the daemon logs event=commit_failed,
    nothing is half-written and the mount keeps serving.
    """
    m = mounts(volume=VOLUME, env_extra={"FUSESQLITE_STORE_LIMITS": "value_bytes=2000"})
    db = m / "limit.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        for k in range(30):  # compressible rows: their pages fit the store
            c.execute("INSERT INTO t VALUES (?, ?)", (k, b"x" * 1000))
        before = table_digest(c, "SELECT * FROM t ORDER BY k")
    with pytest.raises(sqlite3.OperationalError) as ei:
        with opendb(db) as c:
            c.execute("BEGIN")
            c.execute("INSERT INTO t VALUES (?, ?)", (-1, os.urandom(100_000)))
            c.execute("COMMIT")
    assert any(x in str(ei.value) for x in DB_ERRORS), str(ei.value)
    assert m.wait_log("event=commit_failed", 5), f"no event=commit_failed in the log:\n{m.log_tail()}"
    assert "LimitExceeded" in m.log_text()
    assert m.alive(), m.log_tail()
    problems: list[str] = []
    _after_fault_checks(m, db, before, "after the refused transaction (same mount)", problems)
    m = mounts.remount(m)
    _after_fault_checks(m, db, before, "after remount", problems)
    assert not problems, problems


@pytest.mark.timeout(200)
def test_a_refused_commits_journal_can_be_opened_at_once(mounts):
    """The commit point is the journal's unlink. When the store refuses the commit, the
    unlink fails and the kernel keeps its entry of the journal, so the daemon keeps the
    journal's name, emptied. Dropping the journal, the entry would lead to a gone inode
    for up to a second, and SQLite's next transaction, opening the journal with O_CREAT,
    would get ENOENT ("unable to open database file"; measured: 16 of these 40 tries,
    and test_transaction_over_store_limit about once in 7 runs)."""
    m = mounts(volume=VOLUME, env_extra={"FUSESQLITE_STORE_LIMITS": "value_bytes=2000"})
    db = m / "refused.sqlite"
    journal = str(db) + "-journal"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        c.execute("INSERT INTO t VALUES (0, 'kept')")
    failures = []
    for i in range(40):
        c = sqlite3.connect(db, isolation_level=None)
        try:
            c.execute("BEGIN")
            c.execute("INSERT INTO t VALUES (?, ?)", (i + 1, os.urandom(100_000)))
            with pytest.raises(sqlite3.OperationalError):
                c.execute("COMMIT")
        finally:
            c.close()
        try:  # what SQLite's next transaction does first
            os.close(os.open(journal, os.O_RDWR | os.O_CREAT, 0o644))
            os.unlink(journal)
        except OSError as e:
            failures.append(f"try {i}: {e}")
    assert not failures, f"{len(failures)} of 40: {failures[:3]}"
    with opendb(db) as c:
        c.execute("INSERT INTO t VALUES (100, 'new')")
        assert c.execute("SELECT k FROM t ORDER BY k").fetchall() == [(0,), (100,)]
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_failed_commit_is_never_read_back(mounts):
    """A refused commit leaves the pages it wrote in the kernel's cache until the daemon
    drops them, and the same connection reads at once (SQLite rereads everything after
    an I/O error). So the reply waits for the drop: a drop on its own thread after the
    reply, that thread 50 ms late, made this test read "database disk image is
    malformed" (the uncommitted pages mixed with committed ones).
    The database is big, all of it cached, so that a drop still under way shows."""
    # interior pages of this table compress to about 3,800 bytes; a leaf holding a row
    # of random bytes does not compress at all
    m = mounts(volume=VOLUME, env_extra={"FUSESQLITE_STORE_LIMITS": "value_bytes=3950"})
    db = m / "refused.sqlite"
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        con.execute("BEGIN")
        for k in range(8000):  # 32 MiB of compressible rows
            con.execute("INSERT INTO t VALUES (?, zeroblob(4000))", (k,))
        con.execute("COMMIT")
        assert con.execute("SELECT count(*), sum(length(data)) FROM t").fetchone() == (8000, 32_000_000)
        refused, seen = 0, []
        for k in range(8000, 8020):
            try:
                con.execute("INSERT INTO t VALUES (?, ?)", (k, os.urandom(4000)))
            except sqlite3.Error:
                refused += 1
            seen.append(con.execute("SELECT max(k) FROM t").fetchone()[0])
    finally:
        con.close()
    assert refused == 20, f"only {refused} of 20 inserts were refused"
    assert seen == [7999] * 20, f"the last row read right after each refused commit: {seen}"
    assert "event=commit_failed" in m.log_text()


def test_transaction_over_store_transaction_limit_commits_whole(mounts):
    """12 MB in one SQLite transaction: more than a FoundationDB transaction may hold.
    It is staged and commits whole (exact blob, integrity ok, survives a remount)."""
    m = mounts(volume=VOLUME)
    db = m / "limit.sqlite"
    with opendb(db) as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        for k in range(30):
            c.execute("INSERT INTO t VALUES (?, randomblob(1000))", (k,))
        before = table_digest(c, "SELECT * FROM t ORDER BY k")
    blob = os.urandom(12 * MB)  # > 10 MB in one transaction, incompressible
    with opendb(db) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO t VALUES (?, ?)", (-1, blob))
        c.execute("COMMIT")
    assert "event=commit_failed" not in m.log_text()
    for where in ("same mount", "after remount"):
        if where == "after remount":
            m = mounts.remount(m)
        with opendb(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)], where
            assert c.execute("SELECT data FROM t WHERE k = -1").fetchone() == (blob,), where
            assert table_digest(c, "SELECT * FROM t WHERE k >= 0 ORDER BY k") == before, where


def test_name_too_long_everywhere(mount):
    m = mount
    long = "x" * 256
    (m / "target").write_bytes(b"t")
    os.mkdir(m / "dir")
    ops = {
        "create": lambda: os.close(os.open(m / long, os.O_CREAT | os.O_WRONLY, 0o644)),
        "open": lambda: os.open(m / long, os.O_RDONLY),
        "stat": lambda: os.stat(m / long),
        "mkdir": lambda: os.mkdir(m / long),
        "mkdir_nested": lambda: os.mkdir(m / "dir" / long),
        "rename": lambda: os.rename(m / "target", m / long),
        "symlink": lambda: os.symlink("target", m / long),
        "link": lambda: os.link(m / "target", m / long),
        "unlink": lambda: os.unlink(m / long),
        "rmdir": lambda: os.rmdir(m / long),
    }
    wrong = {}
    for name, op in ops.items():
        try:
            op()
            wrong[name] = "succeeded"
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                wrong[name] = errno.errorcode.get(e.errno, e.errno)
    assert not wrong, f"expected ENAMETOOLONG from: {wrong}"
    with pytest.raises(sqlite3.OperationalError):
        sqlite3.connect(m / ("d" * 300 + ".sqlite")).execute("CREATE TABLE t(x)")
    # nothing was created and the mount keeps working
    assert sorted(os.listdir(m.mountpoint)) == ["dir", "target"]
    assert (m / "target").read_bytes() == b"t"
    os.rename(m / "target", m / ("y" * 255))
    assert (m / ("y" * 255)).read_bytes() == b"t"
