"""Retention: `fusesqlite gc --keep`, pins, mount registrations (docs/history.md, "Retention")."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from helpers import run_cli
from test_many_mounts import query, wait_for

from fusesqlite import history, retention
from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.pages import decode_block, encode_block
from fusesqlite.restore import restore
from fusesqlite.store import open_store
from fusesqlite.volume import ChangeSet, DataCommit, Volume

FILE = Inode(mode=0o100644, uid=0, gid=0, nlink=1)


def _snapshot(vol: Volume, version: int) -> dict[str, tuple[Inode, bytes | None]]:
    """Everything a read at ``version`` sees: path -> (record, file bytes)."""
    bs = vol.block_size
    out = {}
    todo = [(ROOT_INO, "")]
    while todo:
        parent, prefix = todo.pop()
        for name, ino, rec in vol.list_dir(parent, version):
            path = f"{prefix}/{name.decode()}"
            if rec.is_dir:
                out[path] = (rec, None)
                todo.append((ino, path))
                continue
            n = -(-rec.size // bs)
            got = vol.read_blocks(ino, range(n), rec.dver)
            data = b"".join(bytes(decode_block(got[b], ino, b, bs)) if b in got else bytes(bs) for b in range(n))
            out[path] = (rec, data[: rec.size])
    return out


def _write(vol: Volume, ino: int, rec: Inode, blocks: dict[int, bytes], name: bytes | None = None) -> int:
    base = vol.read_inode(ino, vol.head())
    changes = ChangeSet(inodes={ino: rec}, blocks={(ino, b): encode_block(d, ino, b) for b, d in blocks.items()})
    if name is not None:
        changes.dirents[(ROOT_INO, name)] = ino
    return vol.commit(changes, {ino: DataCommit(base.dver if base else 0)}).version


def _staged(vol: Volume, ino: int, blocks: dict[int, bytes]) -> int:
    staging = vol.begin_staging(ino, vol.author)
    vol.stage_blocks(ino, staging, {b: encode_block(d, ino, b) for b, d in blocks.items()}, vol.author)
    return staging


def _keys(vol: Volume) -> int:
    return len(vol.store.transact(lambda tr: tr.get_range(*vol.ks.volume_range())))


def test_every_kept_version_reads_the_same_after_gc(tmp_path):
    """A history with every kind of change around the horizon: rewrites, attribute-only
    commits, removals before and after it, a file removed and restored, a big
    transaction staged before the horizon and published after it, one staged and still
    under way. Every version at or after the horizon reads byte for byte the same after
    gc, and older ones are gone."""
    vol = Volume(open_store(str(tmp_path / "store")), "default", author="host:1:test")
    try:
        vol.open()
        bs = vol.block_size
        a, gone, later_gone, big, pending, back = vol.allocate_inodes(6)
        rnd = [os.urandom(bs) for _ in range(12)]
        _write(vol, a, FILE._replace(size=4 * bs, hwm=4), {i: rnd[i] for i in range(4)}, b"a")
        _write(vol, gone, FILE._replace(size=bs, hwm=1), {0: rnd[4]}, b"gone")
        _write(vol, later_gone, FILE._replace(size=bs, hwm=1), {0: rnd[5]}, b"later-gone")
        _write(vol, back, FILE._replace(size=2 * bs, hwm=2), {0: rnd[6], 1: rnd[7]}, b"back")
        alive_back = vol.head()
        _write(vol, a, FILE._replace(size=4 * bs, hwm=4), {1: rnd[8]})
        vol.commit(ChangeSet(inodes={a: FILE._replace(mode=0o100600)}))  # attributes only
        vol.commit(ChangeSet(inodes={gone: None}, dirents={(ROOT_INO, b"gone"): None}))
        vol.commit(ChangeSet(inodes={back: None}, dirents={(ROOT_INO, b"back"): None}))
        vol.commit(ChangeSet(inodes={big: FILE}, dirents={(ROOT_INO, b"big"): big}))
        staging = _staged(vol, big, {b: rnd[b % 12] for b in range(6)})
        vol.commit(ChangeSet(inodes={pending: FILE}, dirents={(ROOT_INO, b"pending"): pending}))
        _staged(vol, pending, {0: rnd[9]})
        _write(vol, a, FILE._replace(size=3 * bs, hwm=4), {2: rnd[10]})
        h = vol.head()  # the horizon
        vol.commit(ChangeSet(inodes={big: FILE._replace(size=6 * bs, hwm=6)}), {big: DataCommit(0, staging)})
        vol.commit(ChangeSet(inodes={later_gone: None}, dirents={(ROOT_INO, b"later-gone"): None}))
        _write(vol, a, FILE._replace(size=4 * bs, hwm=4), {3: rnd[11]})
        restore(vol, "/back", alive_back)
        kept = [e.version for e in vol.log_newest_first() if e.version >= h]
        before = {v: _snapshot(vol, v) for v in kept}
        assert before[kept[0]]["/back"][1] == rnd[6] + rnd[7] and before[kept[0]]["/big"][1] == b"".join(rnd[:6])
        keys = _keys(vol)

        done = retention.collect_at(vol, h)

        assert done.records > 0 and done.blocks > 0 and done.log > 0 and done.entries > 0, done
        assert _keys(vol) < keys
        assert {v: _snapshot(vol, v) for v in kept} == before
        assert [e.version for e in vol.log_newest_first()] == kept  # h is the oldest version now
        assert retention.horizon(vol) == h
        assert [s[0] for s in vol.stagings()] == [pending]  # under way: kept, blocks and all
        with pytest.raises(history.HistoryError, match="was removed by gc"):
            history.resolve(vol, history.version_text(alive_back))
        assert retention.collect_at(vol, h).keys == 0  # nothing more to remove at the same horizon
        marks = vol.store.transact(lambda tr: {ino: tr.get(vol.ks.changed(ino)) for ino in (a, gone, later_gone)})
        assert marks[gone] is None, "a removed file's change mark outlived its last record"
        assert marks[a] is not None and marks[later_gone] is not None  # still read by its kept versions
    finally:
        vol.store.close()


def test_the_horizon_is_held_back_by_live_mounts_and_pins_and_never_moves_back(tmp_path):
    vol = Volume(open_store(str(tmp_path / "store")), "default", author="host:1:test")
    try:
        vol.open()
        ino = vol.allocate_inodes(1)[0]
        versions = [_write(vol, ino, FILE._replace(size=1, hwm=1), {0: bytes([i]) * vol.block_size}, b"f")
                    for i in range(6)]
        assert retention.choose_horizon(vol, 0).version == versions[-1]
        assert retention.choose_horizon(vol, 3600).version == 0  # nothing that old
        retention.set_pin(vol, "release", versions[2])
        assert retention.choose_horizon(vol, 0) == retention.Horizon(versions[2], "pin release")
        other = Volume(vol.store, "default", author="otherhost:1:x")  # another host's mount: alive until it expires
        retention.register(other, versions[1], "/mnt/x", "at")
        assert retention.choose_horizon(vol, 0).version == versions[1]
        assert retention.choose_horizon(vol, 0).because == "mount otherhost:1:x at /mnt/x"
        retention.unregister(other)
        assert retention.clear_pin(vol, "release") and not retention.clear_pin(vol, "release")
        retention.collect_at(vol, versions[4])
        retention.collect_at(vol, versions[3])  # an older horizon later: it stays where it was
        assert retention.horizon(vol) == versions[4]
        with pytest.raises(retention.RetentionError, match="older than what gc keeps"):
            retention.set_pin(vol, "old", versions[3])
    finally:
        vol.store.close()


# -- end to end ------------------------------------------------------------------------
def _log(m, *args) -> list[dict]:
    r = run_cli("log", *m.where, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _digest(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _table(path, rows: int, size: int) -> None:
    """A database at ``path`` with ``t(id, v)``: ``rows`` random blobs of ``size`` bytes."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.executemany("INSERT INTO t(v) VALUES (randomblob(?))", [(size,)] * rows)
    con.commit()
    con.close()


def _updates(path, n: int) -> None:
    con = sqlite3.connect(path)
    for _ in range(n):
        con.execute("UPDATE t SET v = randomblob(3000) WHERE id % 5 = abs(random()) % 5")
        con.commit()
    con.close()


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
@pytest.mark.embedded
def test_gc_keep_0s_beside_a_live_mount_a_past_version_and_a_pin(mounts):
    live = mounts()
    _table(live / "app.db", 300, 3000)
    _updates(live / "app.db", 40)
    at_version = _log(live)[0]["version"]
    past = mounts(store=live.store, volume=live.volume, extra_args=("--at", at_version))
    _updates(live / "app.db", 40)
    pinned = _log(live)[0]["version"]
    r = run_cli("pin", "release-1", "--at", pinned, *live.where)
    assert r.returncode == 0 and f"pinned version {pinned} as release-1" in r.stdout, r.stderr
    _updates(live / "app.db", 200)
    past_before = _digest(past.mountpoint)
    live_before = query(live / "app.db", "SELECT sum(length(v)), count(*) FROM t")
    store_file = live.store_dir / "store.sqlite"
    rows_before = sqlite3.connect(store_file).execute("SELECT count(*) FROM kv").fetchone()[0]

    r = run_cli("gc", "--keep", "0s", *live.where, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"kept every version from {at_version} on (mount " in r.stdout, r.stdout
    assert _digest(past.mountpoint) == past_before
    assert query(past / "app.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(live / "app.db", "SELECT sum(length(v)), count(*) FROM t") == live_before

    past.stop()
    r = run_cli("gc", "--keep", "0s", *live.where, timeout=300)
    assert r.returncode == 0 and f"kept every version from {pinned} on (pin release-1)" in r.stdout, r.stdout
    pinned_mount = mounts(store=live.store, volume=live.volume, extra_args=("--at", pinned))
    assert query(pinned_mount / "app.db", "PRAGMA integrity_check") == [("ok",)]
    pinned_mount.stop()
    r = run_cli("unpin", "release-1", *live.where)
    assert r.returncode == 0, r.stderr
    time.sleep(retention.REGISTER_EVERY + 0.5)  # the live mount's registration catches up with it
    r = run_cli("gc", "--keep", "0s", *live.where, timeout=300)
    assert r.returncode == 0 and ("(window)" in r.stdout or "(mount " in r.stdout), r.stdout
    rows_after = sqlite3.connect(store_file).execute("SELECT count(*) FROM kv").fetchone()[0]
    assert rows_after < rows_before / 3, (rows_before, rows_after)
    assert query(live / "app.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(live / "app.db", "SELECT sum(length(v)), count(*) FROM t") == live_before
    (live.mountpoint.parent / "old").mkdir()
    r = run_cli("mount", live.mountpoint.parent / "old", *live.where, "--at", at_version)
    assert r.returncode == 1 and "was removed by gc" in r.stderr, r.stderr
    _updates(live / "app.db", 5)  # the live mount goes on
    assert query(live / "app.db", "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
def test_gc_killed_half_way_leaves_every_kept_version_readable(mounts):
    """gc behind a slow simulated cluster, killed with -9 in the middle, then run again."""
    live = mounts()
    _table(live / "app.db", 200, 2000)
    _updates(live / "app.db", 150)
    expected = query(live / "app.db", "SELECT sum(length(v)), count(*), sum(id * length(v)) FROM t")
    time.sleep(retention.REGISTER_EVERY + 0.5)
    slow = live.py(  # stands in for the CLI, whose store round trips it slows down
        "import sys\n"
        "from fusesqlite.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n",
        "gc", "--keep", "0s", *live.where, "--simulate", "latency_ms=300,commit_ms=300",
    )
    time.sleep(2.5)
    assert slow.poll() is None, slow.communicate()
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait()
    assert len(_log(live)) > 100  # killed before it removed the log, its last step
    assert query(live / "app.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(live / "app.db", "SELECT sum(length(v)), count(*), sum(id * length(v)) FROM t") == expected
    r = run_cli("gc", "--keep", "0s", *live.where, timeout=300)
    assert r.returncode == 0, r.stderr
    fresh = mounts(store=live.store, volume=live.volume)
    assert query(fresh / "app.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(fresh / "app.db", "SELECT sum(length(v)), count(*), sum(id * length(v)) FROM t") == expected
    assert wait_for(lambda: len(_log(live)) <= 3)


def test_a_commit_made_from_a_version_gc_has_passed_fails(tmp_path):
    """A restore's commit names the version it read (``oldest_read``): once gc's horizon
    has passed it, the commit fails in its own store transaction, so gc either saw the
    commit (and keeps what it needs) or the commit does not land."""
    from fusesqlite.volume import HistoryCollected

    vol = Volume(open_store(str(tmp_path / "store")), "default", author="host:1:test")
    try:
        vol.open()
        a, b = vol.allocate_inodes(2)
        old = _write(vol, a, FILE._replace(size=1, hwm=1), {0: bytes(vol.block_size)}, b"a")
        newer = _write(vol, b, FILE._replace(size=1, hwm=1), {0: bytes(vol.block_size)}, b"b")
        vol.commit(ChangeSet(inodes={a: FILE._replace(mode=0o100600)}), oldest_read=old)  # not passed yet
        retention.collect_at(vol, newer)
        with pytest.raises(HistoryCollected):
            vol.commit(ChangeSet(inodes={a: FILE._replace(mode=0o100640)}), oldest_read=old)
        assert vol.read_inode(a, vol.head()).mode == 0o100600
    finally:
        vol.store.close()


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
@pytest.mark.timeout(240)
def test_mounts_collecting_every_second_while_both_write_lose_nothing(mounts):
    """Two mounts with --retention 0s collecting every second (one at a time) while
    processes on both increment one counter and a reader on each checks it: the count
    is exact, the database intact, and the history was collected as it went."""
    from test_many_mounts import INCREMENT, new_counter

    env = {"FUSESQLITE_COLLECT_EVERY": "1"}
    a = mounts(extra_args=("--retention", "0s"), env_extra=env)
    b = mounts(store=a.store, volume=a.volume, extra_args=("--retention", "0s"), env_extra=env)
    new_counter(a, "counter.db", b)
    procs = [m.py(INCREMENT, str(m / "counter.db"), "300") for m in (a, b, a, b)]
    reads = 0
    while any(p.poll() is None for p in procs):
        for m in (a, b):
            assert query(m / "counter.db", "PRAGMA quick_check") == [("ok",)]
            reads += 1
        time.sleep(0.05)
    for p in procs:
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0 and int(out.split()[0]) == 300, err
    for m in (a, b):
        assert wait_for(lambda: query(m / "counter.db", "SELECT v FROM counter") == [(1200,)]), m.log_tail()
        assert query(m / "counter.db", "PRAGMA integrity_check") == [("ok",)]
    assert "event=gc_history " in a.log_text() + b.log_text()
    assert "event=view_collected" not in a.log_text() + b.log_text()
    assert wait_for(lambda: len(_log(a)) < 100, timeout=10), len(_log(a))
    fresh = mounts(store=a.store, volume=a.volume)
    assert query(fresh / "counter.db", "SELECT v FROM counter") == [(1200,)]
    assert reads > 10


BIG_WRITER = r"""
import os, sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30)
con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
con.commit()
deadline, done = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < deadline:
    with con:  # one transaction of some 6 MB: staged (--memory-mb 16), then published
        con.executemany("INSERT INTO t(v) VALUES (?)", ((os.urandom(3000),) for _ in range(2000)))
    with con:
        con.execute("UPDATE t SET v = zeroblob(10) WHERE id % 50 = ?", (done % 50,))
    done += 1
print(done, con.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
"""


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
@pytest.mark.timeout(240)
def test_gc_racing_big_staged_transactions_loses_nothing(mounts):
    """Big transactions (staged before their commit, at older versions than it) while the
    mount collects with --retention 0s every 0.2 s and `gc --keep 0s` runs beside it:
    every row is there, the database intact, before and after a remount."""
    m = mounts(extra_args=("--memory-mb", "16", "--retention", "0s"), env_extra={"FUSESQLITE_COLLECT_EVERY": "0.2"})
    writer = m.py(BIG_WRITER, str(m / "big.db"), "3")  # registrations lag 2 s: some collect as it writes
    runs, removed = 0, 0
    while writer.poll() is None:
        r = run_cli("gc", "--keep", "0s", *m.where, timeout=120)
        assert r.returncode == 0, r.stderr
        runs += 1
        if "kept every version" in r.stdout:
            removed += int(r.stdout.split("; removed ")[1].split(" record")[0])
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    done, rows = map(int, out.split())
    assert rows == 2000 * done and done >= 2 and runs >= 2, (out, runs)
    assert query(m / "big.db", "PRAGMA integrity_check") == [("ok",)]
    digest = query(m / "big.db", "SELECT count(*), sum(length(v)) FROM t")
    assert removed > 0 or "event=gc_history " in m.log_text(), "no gc removed anything while it wrote"
    m = mounts.remount(m)
    assert query(m / "big.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(m / "big.db", "SELECT count(*), sum(length(v)) FROM t") == digest
