"""A volume's history: `fusesqlite log`, and `fusesqlite mount --at VERSION|TIME`
(docs/history.md)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from helpers import run_cli
from test_many_mounts import query, wait_for

from fusesqlite import history
from fusesqlite.cli import _join_relative_times
from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import STAMPED
from fusesqlite.pages import decode_block, encode_block
from fusesqlite.store import open_store
from fusesqlite.volume import ChangeSet, DataCommit, Volume

FILE = Inode(mode=0o100644, uid=0, gid=0, nlink=1)


# -- versions and times as text -----------------------------------------------------------
@pytest.mark.parametrize("version", [1, 7, STAMPED + 1, STAMPED + 1025, STAMPED + (1 << 70)])
def test_a_version_reads_back_as_itself(version):
    assert history.parse_version(history.version_text(version)) == version


@pytest.mark.parametrize("text", ["0", "pre-0", "-3", "1.5", "v3", "", "pre-", "2026-12-05"])
def test_what_is_no_version(text):
    assert history.parse_version(text) is None


def test_times_iso_relative_and_epoch():
    now = 1_800_000_000.0
    assert history.parse_time("-10min", now) == now - 600
    assert history.parse_time("-2h", now) == now - 7200
    assert history.parse_time("-1.5d", now) == now - 1.5 * 86400
    assert history.parse_time("-30s", now) == now - 30
    assert history.parse_time("@1700000000.5", now) == 1_700_000_000.5
    assert history.parse_time("2026-12-05T14:30:00+00:00") == 1796481000.0
    naive = history.parse_time("2026-12-05T14:30")  # local time
    assert naive == time.mktime((2026, 12, 5, 14, 30, 0, 0, 0, -1))
    for bad in ("yesterday", "-10", "10min", "@x", "2026-13-01"):
        with pytest.raises(history.HistoryError, match="is not a time"):
            history.parse_time(bad, now)


def test_a_relative_time_after_an_option_is_its_value():
    assert _join_relative_times(["mount", "m", "--at", "-10min"]) == ["mount", "m", "--at=-10min"]
    assert _join_relative_times(["log", "--since", "-2h", "--json"]) == ["log", "--since=-2h", "--json"]
    assert _join_relative_times(["log", "--json", "--limit", "3"]) == ["log", "--json", "--limit", "3"]


# -- the log of a volume, on an embedded store --------------------------------------------
def _volume_with_history(tmp_path) -> tuple[Volume, dict[str, int], list[int]]:
    """A volume with /a (written twice), /d/b, and /gone (created, then removed)."""
    vol = Volume(open_store(str(tmp_path / "store")), "default", author="host:1:test")
    vol.open()
    a, d, b, gone = vol.allocate_inodes(4)
    directory = Inode(mode=0o40755, uid=0, gid=0, nlink=2)
    versions = []
    for changes in (
        ChangeSet(inodes={a: FILE}, dirents={(ROOT_INO, b"a"): a}),
        ChangeSet(inodes={d: directory}, dirents={(ROOT_INO, b"d"): d}),
        ChangeSet(inodes={b: FILE}, dirents={(d, b"b"): b}),
        ChangeSet(inodes={gone: FILE}, dirents={(ROOT_INO, b"gone"): gone}),
        ChangeSet(inodes={gone: None}, dirents={(ROOT_INO, b"gone"): None}),
    ):
        versions.append(vol.commit(changes).version)
        time.sleep(0.01)
    block = encode_block(b"x" * vol.block_size, a, 0)
    versions.append(vol.commit(ChangeSet(inodes={a: FILE._replace(size=10)}, blocks={(a, 0): block})).version)
    return vol, {"a": a, "d": d, "b": b, "gone": gone}, versions


def test_the_log_lists_versions_newest_first_with_their_files(tmp_path):
    vol, _, versions = _volume_with_history(tmp_path)
    try:
        got = list(history.changes(vol))
        assert [c.version for c in got] == versions[::-1]
        assert [c.files for c in got] == [("/a",), ("/gone",), ("/gone",), ("/d/b",), ("/d",), ("/a",)]
        assert all(c.mount == "host:1:test" for c in got)
        assert [c.version for c in history.changes(vol, path="/a")] == [versions[5], versions[0]]
        assert [c.version for c in history.changes(vol, path="gone")] == [versions[4], versions[3]]
        assert [c.version for c in history.changes(vol, path="/d")] == [versions[2], versions[1]]
        assert [c.version for c in history.changes(vol, limit=2)] == versions[:-3:-1]
        assert [c.version for c in history.changes(vol, since=got[1].time)] == versions[:-3:-1]
        with pytest.raises(history.HistoryError, match="has no /x/y"):
            history.changes(vol, path="/x/y")
    finally:
        vol.store.close()


def test_a_time_names_the_newest_version_committed_at_or_before_it(tmp_path):
    vol, _, versions = _volume_with_history(tmp_path)
    try:
        by_version = {c.version: c.time for c in history.changes(vol)}
        for v in versions:
            assert history.resolve(vol, f"@{by_version[v]!r}") == v
            assert history.resolve(vol, history.version_text(v)) == v
        assert history.resolve(vol, "@9999999999") == versions[-1]
        with pytest.raises(history.HistoryError, match="is before the first version"):
            history.resolve(vol, "2001-01-01")
        with pytest.raises(history.HistoryError, match="has no version 99999"):
            history.resolve(vol, "99999")
        with pytest.raises(history.HistoryError, match="neither a version nor a time"):
            history.resolve(vol, "latest")
    finally:
        vol.store.close()


def test_the_log_pages_through_more_versions_than_one_read(tmp_path, monkeypatch):
    vol = Volume(open_store(str(tmp_path / "store")), "default")
    monkeypatch.setattr(Volume, "LOG_PAGE", 7)
    try:
        vol.open()
        inos = vol.allocate_inodes(30)
        versions = [vol.commit(ChangeSet(inodes={i: FILE}, dirents={(ROOT_INO, b"f%d" % i): i})).version for i in inos]
        assert [c.version for c in history.changes(vol)] == versions[::-1]
        assert [c.version for c in history.changes(vol, limit=9)] == versions[:-10:-1]
    finally:
        vol.store.close()


# -- the command and mounts of past versions ----------------------------------------------
def _log(m, *args) -> list[dict]:
    r = run_cli("log", *m.where, "--json", *args)
    assert r.returncode == 0, r.stderr
    assert not r.stderr, r.stderr
    return json.loads(r.stdout)


def _insert(path, n: int) -> None:
    con = sqlite3.connect(path)
    for i in range(n):
        con.execute("INSERT INTO t(v) VALUES (?)", (i,))
        con.commit()
    con.close()


def test_a_past_version_is_mounted_beside_a_live_mount_that_keeps_writing(mounts):
    live = mounts()
    con = sqlite3.connect(live / "app.db")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.commit()
    con.close()
    _insert(live / "app.db", 2)
    third = _log(live, "/app.db")[0]["version"]  # two rows
    _insert(live / "app.db", 3)
    (live / "notes.txt").write_bytes(b"first")
    entries = _log(live)
    assert {"version", "time", "unix_time", "mount", "files"} <= entries[0].keys()
    assert entries[0]["files"] == ["/notes.txt"]
    db_versions = _log(live, "/app.db")
    assert len(db_versions) >= 6 and all(e["files"] == ["/app.db"] for e in db_versions)
    assert [e["version"] for e in db_versions].index(third) == 3
    newest_db = db_versions[0]["version"]

    at = mounts(store=live.store, volume=live.volume, extra_args=("--at", third))
    by_time = mounts(store=live.store, volume=live.volume, extra_args=("--at", f"@{db_versions[0]['unix_time']!r}"))
    assert by_time.wait_log(f"version={newest_db} at=True")
    writer = live.py(
        "import sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], timeout=10)\n"
        "for i in range(200):\n"
        "    con.execute('INSERT INTO t(v) VALUES (?)', (i,)); con.commit()\n",
        str(live / "app.db"),
    )
    try:
        for _ in range(5):  # read while the live mount commits
            assert query(at / "app.db", "SELECT count(*) FROM t") == [(2,)]
            assert query(by_time / "app.db", "SELECT count(*) FROM t") == [(5,)]
            assert not (at / "notes.txt").exists() and not (by_time / "notes.txt").exists()
            time.sleep(0.05)
    finally:
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
    assert wait_for(lambda: query(live / "app.db", "SELECT count(*) FROM t") == [(205,)])
    time.sleep(0.3)  # a mount that followed the live one would have moved by now
    assert query(at / "app.db", "SELECT count(*) FROM t") == [(2,)]
    assert query(at / "app.db", "PRAGMA integrity_check") == [("ok",)]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        query(at / "app.db", "INSERT INTO t(v) VALUES (1)")
    with pytest.raises(OSError) as refused:
        (at / "new.txt").write_bytes(b"x")
    assert refused.value.errno == 30  # EROFS
    assert _log(live, "/app.db")[0]["version"] != newest_db  # the live mount went on
    assert "event=lease" not in at.log_text() and "event=follow" not in at.log_text()


@pytest.mark.parametrize(("at", "says"), [
    ("99999999", "has no version 99999999; see: fusesqlite log"),
    ("2001-01-01T00:00", "is before the first version of volume"),
    ("yesterday", "is neither a version nor a time; use a version from `fusesqlite log`"),
])
def test_a_past_version_that_is_none_is_one_line(mounts, tmp_path, at, says):
    live = mounts()
    (live / "f").write_bytes(b"x")
    target = tmp_path / "at"
    target.mkdir()
    r = run_cli("mount", target, *live.where, "--at", at, timeout=60)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fusesqlite: error:") and says in last, r.stderr
    assert not os.path.ismount(target)


def test_log_errors_are_one_line(mounts, tmp_path):
    live = mounts()
    (live / "f").write_bytes(b"x")
    cases = [
        (["--volume", "no-such-volume"], "has no volume 'no-such-volume'"),
        (["/no/such/file"], "has no /no/such/file"),
        (["--since", "soon"], "'soon' is not a time"),
    ]
    for extra, says in cases:
        where = [a for a in live.where if extra[0] != "--volume" or a not in ("--volume", live.volume)]
        r = run_cli("log", *where, *extra)
        assert r.returncode == 1, r
        assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    r = run_cli("log", "--store", tmp_path / "nothing-here")
    assert r.returncode == 1 and "no store at" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "nothing-here").exists()


# -- restore --------------------------------------------------------------------------
def _tree(root) -> dict[str, tuple[int, bytes | None]]:
    """path -> (mode, bytes of a file, None for a directory) of everything under ``root``."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = None if name in dirnames else open(path, "rb").read()
            out[os.path.relpath(path, root)] = (st.st_mode, data)
    return out


def _restore(m, path: str, to: str):
    r = run_cli("restore", path, "--to", to, *m.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not r.stderr, r.stderr
    return r.stdout.strip()


def test_restore_of_the_whole_volume_makes_it_byte_identical_to_a_mount_of_that_version(mounts):
    live = mounts(debug=True)
    (live / "d" / "e").mkdir(parents=True)
    (live / "d" / "e" / "deep.txt").write_bytes(b"deep" * 3000)
    (live / "kept.txt").write_bytes(b"kept")
    (live / "removed-later.txt").write_bytes(b"r" * 10000)
    os.chmod(live / "kept.txt", 0o600)
    con = sqlite3.connect(live / "app.db")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.executemany("INSERT INTO t(v) VALUES (?)", [(os.urandom(300),) for _ in range(500)])
    con.commit()
    then = _log(live)[0]["version"]
    # every kind of change after it: data, size, mode, removals, new files and directories
    con.execute("DELETE FROM t WHERE id % 3 = 0")
    con.execute("UPDATE t SET v = zeroblob(2000) WHERE id % 7 = 0")
    con.commit()
    con.execute("VACUUM")
    con.close()
    (live / "kept.txt").write_bytes(b"changed and longer")
    os.chmod(live / "kept.txt", 0o644)
    os.unlink(live / "removed-later.txt")
    os.unlink(live / "d" / "e" / "deep.txt")
    os.rmdir(live / "d" / "e")
    (live / "new-dir").mkdir()
    (live / "new-dir" / "new.txt").write_bytes(b"new")
    before = _log(live)[0]["version"]

    out = _restore(live, "/", then)
    assert f"to version {then} as version" in out and f"undo with fusesqlite restore / --to {before}" in out, out
    past = mounts(store=live.store, volume=live.volume, extra_args=("--at", then))
    assert wait_for(lambda: _tree(live.mountpoint) == _tree(past.mountpoint)), (
        sorted(_tree(live.mountpoint)), sorted(_tree(past.mountpoint)))
    assert query(live / "app.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(live / "app.db", "SELECT count(*) FROM t") == [(500,)]
    # undone by restoring the version it replaced
    undo = mounts(store=live.store, volume=live.volume, extra_args=("--at", before))
    _restore(live, "/", before)
    assert wait_for(lambda: _tree(live.mountpoint) == _tree(undo.mountpoint))
    assert query(live / "app.db", "SELECT count(*) FROM t") == [(334,)]
    assert "nothing restored" in _restore(live, "/", before)


def test_restore_while_another_mount_reads_and_writes_the_database(mounts):
    a = mounts()
    b = mounts(store=a.store, volume=a.volume)
    con = sqlite3.connect(a / "app.db")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.executemany("INSERT INTO t(v) VALUES (?)", [(i,) for i in range(100)])
    con.commit()
    con.close()
    then = _log(a, "/app.db")[0]["version"]
    _insert(a / "app.db", 50)
    assert wait_for(lambda: query(b / "app.db", "SELECT count(*) FROM t") == [(150,)])
    # a reader on b keeps a connection open across the restore; a writer on a goes on
    reader = sqlite3.connect(b / "app.db", timeout=10)
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (150,)
    # an app on another host that retries on errors, as apps of several mounts do
    writer = a.py(
        "import sqlite3, sys, time\n"
        "con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)\n"
        "done = errors = 0\n"
        "while done < 300:\n"
        "    try:\n"
        "        con.execute('BEGIN IMMEDIATE'); con.execute('INSERT INTO t(v) VALUES (-1)'); con.execute('COMMIT')\n"
        "        done += 1\n"
        "    except sqlite3.OperationalError:\n"
        "        errors += 1\n"
        "        if con.in_transaction: con.execute('ROLLBACK')\n"
        "print(done, errors)\n",
        str(a / "app.db"),
    )
    time.sleep(0.2)
    out = run_cli("restore", "/app.db", "--to", then, *b.where, timeout=120)
    out_writer, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.returncode == 0, out.stderr
    # the reader's next transaction sees one whole version: as restored, plus the writer's rows after it
    count, writes = reader.execute("SELECT count(*), count(*) FILTER (WHERE v = -1) FROM t").fetchone()
    reader.close()
    assert count - writes == 100, (count, writes)
    assert query(b / "app.db", "PRAGMA integrity_check") == [("ok",)]
    assert wait_for(lambda: query(a / "app.db", "SELECT count(*) FROM t") == query(b / "app.db", "SELECT count(*) FROM t"))
    final = query(a / "app.db", "SELECT count(*), count(*) FILTER (WHERE v = -1) FROM t")[0]
    assert final[0] - final[1] == 100, final  # the writer's rows from before the restore are gone
    done, errors = map(int, out_writer.split())
    assert done == 300 and errors <= 3, out_writer


def test_restore_brings_back_a_removed_database_and_removes_a_newer_one(mounts):
    live = mounts()
    con = sqlite3.connect(live / "old.db")
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES ('old')")
    con.commit()
    con.close()
    then = _log(live)[0]["version"]
    os.unlink(live / "old.db")
    sqlite3.connect(live / "new.db").execute("CREATE TABLE n(x)").connection.close()
    assert "restored /old.db" in _restore(live, "/old.db", then)
    assert query(live / "old.db", "SELECT x FROM t") == [("old",)]
    assert "restored /new.db" in _restore(live, "/new.db", then)
    assert not (live / "new.db").exists()
    names = [e["files"] for e in _log(live, "/old.db", "--limit", "2")]
    assert names == [["/old.db"], ["/old.db"]], names


def test_restore_refuses_a_database_another_mount_has_in_wal_mode(mounts):
    a = mounts()
    con = sqlite3.connect(a / "w.db", isolation_level=None)
    con.execute("CREATE TABLE t(x)")
    then = _log(a)[0]["version"]
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.execute("INSERT INTO t VALUES (1)")
    try:
        r = run_cli("restore", "/w.db", "--to", then, *a.where, timeout=120)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "is open in WAL mode on another mount" in r.stderr, r.stderr
        assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        con.close()
    assert "restored /w.db" in _restore(a, "/w.db", then)  # its connections closed: the WAL is free
    assert query(a / "w.db", "SELECT count(*) FROM t") == [(0,)]


def test_restore_errors_are_one_line(mounts):
    live = mounts()
    (live / "f").write_bytes(b"x")
    then = _log(live)[0]["version"]
    for path, to, says in [
        ("/nothing", then, "/nothing exists neither now nor at version"),
        ("/no/dir/f", then, "/no/dir is not a directory of the volume now: restore it first"),
        ("/f", "123456789", "has no version 123456789"),
        ("/f", "2001-01-01", "is before the first version"),
    ]:
        r = run_cli("restore", path, "--to", to, *live.where)
        assert r.returncode == 1, r
        assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr


def test_a_restore_bigger_than_one_transaction_is_staged(tmp_path, monkeypatch):
    """Blocks past INLINE_BYTES go through a staging, as a big transaction's do, and the
    file reads back as it was; a restore of it to now changes nothing."""
    from fusesqlite import restore as restoring

    monkeypatch.setattr(restoring, "INLINE_BYTES", 20_000)
    monkeypatch.setattr(restoring, "STAGE_BYTES", 10_000)
    vol = Volume(open_store(str(tmp_path / "store")), "default", author="host:1:test")
    try:
        vol.open()
        ino = vol.allocate_inodes(1)[0]
        bs = vol.block_size
        first = [os.urandom(bs) for _ in range(40)]
        rec = FILE._replace(size=40 * bs, hwm=40)
        blocks = {(ino, b): encode_block(d, ino, b) for b, d in enumerate(first)}
        then = vol.commit(ChangeSet(inodes={ino: rec}, dirents={(ROOT_INO, b"big"): ino}, blocks=blocks),
                          {ino: DataCommit(0)}).version
        base = vol.read_inode(ino, then)
        assert base.dver == then
        later = {(ino, b): encode_block(os.urandom(bs), ino, b) for b in range(0, 60, 2)}
        vol.commit(ChangeSet(inodes={ino: rec._replace(size=60 * bs, hwm=60)}, blocks=later),
                   {ino: DataCommit(base.dver)})
        done = restoring.restore(vol, "/big", then)
        assert done.version is not None and done.paths == ("/big",)
        now = vol.read_inode(ino, done.version)
        assert now.size == 40 * bs and now.hwm == 60
        got = vol.read_blocks(ino, range(40), now.dver)
        assert [bytes(decode_block(got[b], ino, b, bs)) for b in range(40)] == first
        assert vol.stagings() == []
        assert restoring.restore(vol, "/big", then).version is None
    finally:
        vol.store.close()


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
def test_a_restore_killed_half_way_changes_nothing_and_holds_nothing(mounts):
    """A restore behind a slow simulated cluster, killed with -9 while it works: the
    database is as it was, and a writer on the live mount goes on at once (the
    restore's leases die with its process on this host)."""
    live = mounts()
    con = sqlite3.connect(live / "app.db")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.executemany("INSERT INTO t(v) VALUES (randomblob(3000))", [()] * 2000)
    con.commit()
    then = _log(live)[0]["version"]
    con.execute("UPDATE t SET v = randomblob(3000)")
    con.commit()
    con.close()
    before = query(live / "app.db", "SELECT sum(length(v)), count(*), sum(id * length(hex(v)) % 7) FROM t")
    restorer = live.py(
        "import sys\nfrom fusesqlite.cli import main\nsys.exit(main(sys.argv[1:]))\n",
        "restore", "/app.db", "--to", then, *live.where, "--simulate", "latency_ms=100,commit_ms=100",
    )
    time.sleep(3.0)
    assert restorer.poll() is None, restorer.communicate()
    os.kill(restorer.pid, signal.SIGKILL)
    restorer.wait()
    assert query(live / "app.db", "SELECT sum(length(v)), count(*), sum(id * length(hex(v)) % 7) FROM t") == before
    con = sqlite3.connect(live / "app.db", timeout=5)
    con.execute("INSERT INTO t(v) VALUES (1)")
    con.commit()
    con.close()
    assert query(live / "app.db", "PRAGMA integrity_check") == [("ok",)]
    r = run_cli("restore", "/app.db", "--to", then, *live.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert query(live / "app.db", "SELECT count(*) FROM t") == [(2000,)]


def test_a_database_in_wal_mode_at_a_past_version_opens_immutable(mounts):
    """A read-only mount cannot make the -shm a WAL database needs: SQLite refuses a plain
    open ("unable to open database file", as on any read-only mount) and reads it with
    immutable=1; a mount of a past version never changes, so that is exact."""
    live = mounts()
    con = sqlite3.connect(live / "w.db")
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()  # the last connection: database and -wal published
    then = _log(live)[0]["version"]
    past = mounts(store=live.store, volume=live.volume, extra_args=("--at", then))
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        sqlite3.connect(past / "w.db").execute("SELECT count(*) FROM t")
    ro = sqlite3.connect(f"file:{past / 'w.db'}?immutable=1", uri=True)
    assert ro.execute("SELECT count(*) FROM t").fetchone() == (1,)
    ro.close()
