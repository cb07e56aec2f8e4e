"""`fusesqlite clone`: a volume that starts as another was at a version, in O(1)
(docs/history.md, "Clones")."""
from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest
from helpers import run_cli
from test_many_mounts import query, wait_for
from test_retention import FILE, _snapshot, _staged, _write

from fusesqlite import retention
from fusesqlite.inodes import ROOT_INO
from fusesqlite.pages import decode_block
from fusesqlite.store import open_store
from fusesqlite.volume import ChangeSet, DataCommit, Volume, VolumeExists


def test_a_clone_reads_as_its_source_did_and_writes_to_either_stay_apart(tmp_path):
    store = open_store(str(tmp_path / "store"))
    src = Volume(store, "src", author="host:1:src")
    try:
        src.open()
        bs = src.block_size
        a, gone, big, d = src.allocate_inodes(4)
        rnd = [os.urandom(bs) for _ in range(8)]
        _write(src, a, FILE._replace(size=3 * bs, hwm=3), {0: rnd[0], 1: rnd[1], 2: rnd[2]}, b"a")
        _write(src, gone, FILE._replace(size=bs, hwm=1), {0: rnd[3]}, b"gone")
        src.commit(ChangeSet(inodes={d: FILE._replace(mode=0o40755, nlink=2)}, dirents={(ROOT_INO, b"d"): d}))
        src.commit(ChangeSet(inodes={big: FILE._replace(size=bs, hwm=1)}, dirents={(d, b"big"): big}))
        staging = _staged(src, big, {0: rnd[4]})  # staged before the clone, published after it
        v = src.head()
        at_v = _snapshot(src, v)

        dst = Volume(store, "dst", author="host:1:dst")
        start = time.monotonic()
        dst.clone(src, v)
        assert time.monotonic() - start < 1
        assert dst.open(create=False) == v and dst.base is not None
        dst.clone(src, v)  # a retry after it landed (result unknown) finds its own clone
        assert _snapshot(dst, v) == at_v
        assert retention.pins(src) == {"clone:dst": v}

        # the source goes on: the staged block is published, a file changes, one goes
        src.commit(ChangeSet(inodes={big: FILE._replace(size=bs, hwm=1)}), {big: DataCommit(0, staging)})
        _write(src, a, FILE._replace(size=3 * bs, hwm=3), {1: rnd[5]})
        src.commit(ChangeSet(inodes={gone: None}, dirents={(ROOT_INO, b"gone"): None}))
        assert _snapshot(dst, dst.head()) == at_v  # none of it in the clone
        with pytest.raises(VolumeExists):
            Volume(store, "dst").clone(src, src.head())

        # the clone writes: an inherited file, a new one, a removal; then its data commit of
        # the staged file reads the base as of the clone (the staged block is not its)
        base = dst.read_inode(a, dst.head())
        _write(dst, a, FILE._replace(size=3 * bs, hwm=3), {2: rnd[6]})
        assert base is not None and dst.read_inode(a, dst.head()).dver > v
        mine = dst.allocate_inodes(1)[0]
        assert mine not in (a, gone, big, d)
        _write(dst, mine, FILE._replace(size=bs, hwm=1), {0: rnd[7]}, b"mine")
        dst.commit(ChangeSet(inodes={gone: None}, dirents={(ROOT_INO, b"gone"): None}, expect={(ROOT_INO, b"gone"): gone}))
        rec = dst.read_inode(big, dst.head())
        dst.commit(ChangeSet(inodes={big: rec._replace(mtime_ns=5)}))  # attributes only
        now = _snapshot(dst, dst.head())
        assert sorted(now) == ["/a", "/d", "/d/big", "/mine"]
        assert now["/a"][1] == rnd[0] + rnd[1] + rnd[6]
        assert now["/d/big"][1] == bytes(bs)  # as at the clone: the block was staged, unpublished
        assert _snapshot(src, src.head())["/d/big"][1] == rnd[4]
        assert "/mine" not in _snapshot(src, src.head())
        assert _snapshot(src, src.head())["/a"][1] == rnd[0] + rnd[5] + rnd[2]

        # a data commit of an inherited file checks the base's data version (lost updates)
        from fusesqlite.volume import StaleWrite
        with pytest.raises(StaleWrite):
            dst.commit(ChangeSet(inodes={big: FILE._replace(size=bs, hwm=1)}), {big: DataCommit(12345)})

        # gc of either keeps what the other reads
        kept_dst = _snapshot(dst, dst.head())
        retention.collect_at(dst, dst.head())
        retention.collect_at(src, retention.choose_horizon(src, 0).version)
        assert retention.horizon(src) <= v
        assert _snapshot(dst, dst.head()) == kept_dst  # no removal undone, no base block lost
        got = dst.read_blocks(big, [0], dst.read_inode(big, dst.head()).dver)
        assert 0 not in got or bytes(decode_block(got[0], big, 0, bs)) == bytes(bs)
    finally:
        store.close()


def _log(m, *args) -> list[dict]:
    r = run_cli("log", *m.where, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.embedded
def test_a_clone_mounted_beside_its_source_both_written(mounts, tmp_path):
    src = mounts(volume="src")
    con = sqlite3.connect(src / "app.db")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.executemany("INSERT INTO t(v) VALUES (randomblob(3000))", [()] * 3000)  # ~10 MB
    con.commit()
    then = _log(src)[0]["version"]
    con.execute("DELETE FROM t WHERE id > 1000")
    con.commit()
    con.close()
    r = run_cli("clone", "src", "dst", "--at", then, "--store", src.store)
    assert r.returncode == 0, r.stderr
    assert f"cloned src at version {then} as dst in" in r.stdout, r.stdout
    dst = mounts(store=src.store, volume="dst")
    assert query(dst / "app.db", "SELECT count(*) FROM t") == [(3000,)]
    assert query(dst / "app.db", "PRAGMA integrity_check") == [("ok",)]
    # both written: neither sees the other
    with sqlite3.connect(dst / "app.db") as c:
        c.execute("UPDATE t SET v = 'clone' WHERE id <= 10")
        c.execute("INSERT INTO t(v) VALUES ('clone only')")
    with sqlite3.connect(src / "app.db") as c:
        c.execute("INSERT INTO t(v) VALUES ('source only')")
    (dst / "notes.txt").write_bytes(b"in the clone")
    assert query(dst / "app.db", "SELECT count(*), sum(v = 'clone'), sum(v = 'source only') FROM t") == [(3001, 10, 0)]
    assert query(src / "app.db", "SELECT count(*), sum(v = 'clone'), sum(v = 'clone only') FROM t") == [(1001, 0, 0)]
    assert not (src / "notes.txt").exists()
    assert query(dst / "app.db", "PRAGMA integrity_check") == [("ok",)]
    # the source's gc keeps the clone's version (a pin); the clone survives a remount
    time.sleep(retention.REGISTER_EVERY + 0.5)
    r = run_cli("gc", "--keep", "0s", "--store", src.store, "--volume", "src", timeout=120)
    assert r.returncode == 0 and "(pin clone:dst)" in r.stdout, r.stdout
    dst = mounts.remount(dst)
    assert query(dst / "app.db", "SELECT count(*) FROM t") == [(3001,)]
    assert query(dst / "app.db", "PRAGMA integrity_check") == [("ok",)]
    status = json.loads(run_cli("status", "--store", src.store, "--volume", "dst", "--json").stdout)
    assert status["volumes"][0]["clone_of"] == f"src@{then}"
    r = run_cli("unpin", "clone:dst", "--store", src.store, "--volume", "src")
    assert r.returncode == 1 and "it stays while that volume exists" in r.stderr, r.stderr
    for args, says in [
        (["clone", "src", "dst"], "volume 'dst' exists; name a new one"),
        (["clone", "nothing", "x"], "has no volume 'nothing'"),
        (["clone", "src", "a/b"], "invalid volume name"),
    ]:
        r = run_cli(*args, "--store", src.store)
        assert r.returncode in (1, 2) and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert wait_for(lambda: query(dst / "app.db", "SELECT count(*) FROM t") == [(3001,)])


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
def test_a_clone_killed_before_it_lands_leaves_no_volume(mounts):
    """A clone is one store transaction: killed with -9 behind a slow simulated cluster,
    it either made the whole clone or nothing, and can be run again."""
    src = mounts(volume="src")
    (src / "f.txt").write_bytes(b"before")
    cli = "import sys\nfrom fusesqlite.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    cloner = src.py(cli, "clone", "src", "dst", "--store", src.store, "--simulate", "latency_ms=400,commit_ms=400")
    time.sleep(0.8)
    cloner.kill()
    cloner.wait()
    r = run_cli("status", "--store", src.store, "--volume", "dst", "--json")
    if r.returncode == 0:  # it landed whole before the kill
        assert json.loads(r.stdout)["volumes"][0]["clone_of"].startswith("src@")
    else:
        assert "has no volume 'dst'" in r.stderr, r.stderr
        r = run_cli("clone", "src", "dst", "--store", src.store)
        assert r.returncode == 0, r.stderr
    dst = mounts(store=src.store, volume="dst")
    assert (dst / "f.txt").read_bytes() == b"before"
