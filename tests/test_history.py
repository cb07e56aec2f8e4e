"""A volume's history: `fusesqlite log`, and `fusesqlite mount --at VERSION|TIME`
(docs/history.md)."""
from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest
from helpers import run_cli
from test_many_mounts import query, wait_for

from fusesqlite import history
from fusesqlite.cli import _join_relative_times
from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import STAMPED
from fusesqlite.pages import encode_block
from fusesqlite.store import open_store
from fusesqlite.volume import ChangeSet, Volume

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
