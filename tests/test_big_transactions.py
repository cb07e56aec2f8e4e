"""Transactions without limits: staging beyond the memory budget and the store's
limits, atomic multi-database commits, bounded memory, many files.

A small memory budget (--memory-mb 16: 1 MiB of uncommitted data per file) makes
a 20 MB transaction take the same staging path a 2 GB one would.
"""
from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import run_cli

from fusesqlite.keyspace import Keyspace
from fusesqlite.store import open_store

SMALL = ("--memory-mb", "16")
ROW = 1000  # bytes of random payload per row: incompressible, so blocks stay big


def count_keys(store: str | Path, volume: str | None, *parts: object) -> int:
    """Keys under ``parts`` in a store (an embedded store's directory, or ``fdb:...``)."""
    begin, end = Keyspace(volume or "default").children(*parts)
    opened = open_store(os.fspath(store))
    try:
        return len(opened.transact(lambda tr: tr.get_range(begin, end)))
    finally:
        opened.close()


def make_db(path: Path, rows: int = 100) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    with con:
        con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(ROW),) for _ in range(rows)))
    con.close()


def insert_rows(path: Path, rows: int) -> sqlite3.Connection:
    """``rows`` random rows in one transaction; the connection stays open for more checks."""
    con = sqlite3.connect(path)
    with con:
        con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(ROW),) for _ in range(rows)))
    return con


def check(path: Path) -> tuple[int, str]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT count(*) FROM t").fetchone()[0], con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


#: BEGIN, write ~20 MB, say "ready", then COMMIT when told (a line on stdin) or sleep forever
BIG_WRITER = r"""
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("PRAGMA cache_size=50")  # spill pages into the file mid-transaction
con.execute("BEGIN")
con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(1000),) for _ in range(int(sys.argv[2]))))
print("ready", flush=True)
if sys.stdin.readline().strip() == "commit":
    con.execute("COMMIT")
    print("done", flush=True)
"""


def start_big_writer(m, db: Path, rows: int = 20_000) -> subprocess.Popen:
    p = m.py(BIG_WRITER, str(db), str(rows), stdin=subprocess.PIPE)
    line = p.stdout.readline().strip()
    assert line == "ready", f"writer did not get ready: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
    return p


@pytest.mark.timeout(180)
def test_transaction_many_times_the_budget_commits_atomically(mounts):
    m = mounts(extra_args=SMALL, debug=True)
    db = m / "big.sqlite"
    make_db(db, 10)
    con = insert_rows(db, 20_000)
    digest = con.execute("SELECT sum(length(v)), count(DISTINCT v) FROM t").fetchone()
    con.close()
    assert check(db) == (20_010, "ok")
    log = m.log_text()
    assert "event=staged" in log, "20 MB with a 1 MiB budget must have been staged"
    assert "event=commit_failed" not in log, log[-3000:]
    m = mounts.remount(m)
    assert check(db) == (20_010, "ok")
    con = sqlite3.connect(db)
    assert con.execute("SELECT sum(length(v)), count(DISTINCT v) FROM t").fetchone() == digest
    con.close()
    m.stop()
    assert count_keys(m.store, m.volume, "staging") == 0
    assert count_keys(m.store, m.volume, "stg") == 0


@pytest.mark.timeout(180)
def test_big_transaction_within_tight_store_limits(mounts):
    """The store refuses transactions over 300 kB: the same 20 MB commits, in more, smaller pieces."""
    m = mounts(extra_args=SMALL, env_extra={"FUSESQLITE_STORE_LIMITS": "transaction_bytes=300000"})
    db = m / "tight.sqlite"
    make_db(db, 10)
    con = insert_rows(db, 20_000)
    con.close()
    assert check(db) == (20_010, "ok")
    assert "event=commit_failed" not in m.log_text()


@pytest.mark.timeout(180)
def test_readers_elsewhere_see_the_previous_version_until_commit(mounts):
    a = mounts(extra_args=SMALL, debug=True)
    db_name = "inflight.sqlite"
    make_db(a / db_name, 100)
    writer = start_big_writer(a, a / db_name)
    assert a.wait_log("event=staged"), "the transaction should be partly staged by now"
    b = mounts(store=a.store)  # another mount of the same store, started mid-transaction
    assert check(b / db_name) == (100, "ok")
    writer.stdin.write("commit\n")
    writer.stdin.flush()
    assert writer.stdout.readline().strip() == "done", writer.stderr.read()
    c = mounts(store=a.store)
    assert check(c / db_name) == (20_100, "ok")


@pytest.mark.timeout(180)
def test_kill9_before_commit_point_keeps_previous_version_and_cleans_staging(mounts):
    a = mounts(extra_args=SMALL, debug=True)
    db_name = "crash.sqlite"
    make_db(a / db_name, 100)
    writer = start_big_writer(a, a / db_name)
    assert a.wait_log("event=staged")
    a.kill9()
    writer.kill()
    assert count_keys(a.store, a.volume, "staging") == 1, "the dead mount's staging should be in the store"
    staged_blocks = count_keys(a.store, a.volume, "stg")
    blocks_before = count_keys(a.store, a.volume, "b")
    assert staged_blocks > 200
    b = mounts.remount(a)
    assert b.wait_log("event=staging_reclaimed")
    assert check(b / db_name) == (100, "ok")
    b.stop()
    assert count_keys(b.store, b.volume, "staging") == 0
    assert count_keys(b.store, b.volume, "stg") == 0
    assert count_keys(b.store, b.volume, "b") == blocks_before - staged_blocks


@pytest.mark.timeout(120)
def test_gc_command_removes_an_abandoned_staging(mounts):
    a = mounts(extra_args=SMALL, debug=True)
    make_db(a / "gc.sqlite", 10)
    writer = start_big_writer(a, a / "gc.sqlite", rows=5_000)
    assert a.wait_log("event=staged")
    a.kill9()
    writer.kill()
    from helpers import force_unmount

    force_unmount(a.mountpoint)
    assert count_keys(a.store, a.volume, "staging") == 1
    r = run_cli("gc", *a.where)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed 1 abandoned staging(s)"), r.stdout
    assert count_keys(a.store, a.volume, "staging") == 0
    assert count_keys(a.store, a.volume, "stg") == 0


ATTACH_WRITER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("ATTACH ? AS other", (sys.argv[2],))
con.execute("CREATE TABLE IF NOT EXISTS main.t(i)")
con.execute("CREATE TABLE IF NOT EXISTS other.t(i)")
i = 0
while True:
    i += 1
    con.execute("BEGIN")
    con.execute("INSERT INTO main.t VALUES (?)", (i,))
    con.execute("INSERT INTO other.t VALUES (?)", (i,))
    con.execute("COMMIT")
    print(i, flush=True)
"""


@pytest.mark.timeout(180)
def test_attach_transaction_is_atomic_across_a_crash(mounts):
    m = mounts()
    rng = random.Random(7)
    for round_ in range(3):
        writer = m.py(ATTACH_WRITER, str(m / "a.sqlite"), str(m / "b.sqlite"))
        first = writer.stdout.readline()
        assert first.strip().isdigit(), writer.stderr.read()
        time.sleep(rng.uniform(0.2, 0.8))
        m.kill9()
        writer.kill()
        acked = [int(first)] + [int(x) for x in writer.stdout.read().split() if x.isdigit()]
        m = mounts.remount(m)
        a = sqlite3.connect(m / "a.sqlite")
        a.execute("ATTACH ? AS other", (str(m / "b.sqlite"),))
        in_a = {r[0] for r in a.execute("SELECT i FROM main.t")}
        in_b = {r[0] for r in a.execute("SELECT i FROM other.t")}
        assert a.execute("PRAGMA main.integrity_check").fetchone()[0] == "ok"
        assert a.execute("PRAGMA other.integrity_check").fetchone()[0] == "ok"
        a.execute("DELETE FROM main.t")
        a.execute("DELETE FROM other.t")
        a.commit()
        a.close()
        assert in_a == in_b, f"round {round_}: only in one database: {sorted(in_a ^ in_b)[:10]}"
        assert set(acked) <= in_a, f"round {round_}: acknowledged but lost: {sorted(set(acked) - in_a)[:10]}"


def daemon_peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


@pytest.mark.timeout(240)
def test_memory_stays_under_the_cap(mounts, tmp_path):
    cap = 96
    m = mounts(extra_args=("--memory-mb", str(cap)))
    db = m / "mem.sqlite"
    make_db(db, 10)
    con = sqlite3.connect(db)
    with con:  # 60 MB in one transaction
        con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(ROW),) for _ in range(60_000)))
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 60_010
    con.close()
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(60):
            f.write(os.urandom(1 << 20))
    shutil.copyfile(src, m / "big.bin")
    assert (m / "big.bin").stat().st_size == 60 << 20
    peak = daemon_peak_rss_mb(m.pid)
    assert peak < cap, f"daemon peak RSS {peak:.0f} MiB over its {cap} MiB budget"


@pytest.mark.timeout(180)
def test_copy_commits_as_one_version_at_close(mounts, tmp_path):
    m = mounts(extra_args=SMALL, debug=True)
    src = tmp_path / "db.bin"
    src.write_bytes(os.urandom(12 << 20))
    subprocess.run(["cp", src, m / "copy.bin"], check=True)
    commits = [line for line in m.log_text().splitlines() if "event=commit " in line and "/copy.bin" in line]
    assert len(commits) == 1 and "reason=close" in commits[0], commits
    assert (m / "copy.bin").read_bytes() == src.read_bytes()


@pytest.mark.slow  # 15 s: run once, on the native path (directories are the store's, not the FUSE path's)
@pytest.mark.timeout(300)
def test_ten_thousand_files_in_one_directory(mounts):
    m = mounts()
    d = m / "many"
    d.mkdir()
    names = {f"f{i:05d}" for i in range(10_000)}
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(d)) == names
    m = mounts.remount(m)
    assert set(os.listdir(m / "many")) == names
    assert (m / "many" / "f04242").stat().st_size == 0
