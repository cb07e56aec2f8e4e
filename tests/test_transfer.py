"""`fusesqlite export` and `fusesqlite import` (docs/history.md, "Export and import")."""
from __future__ import annotations

import filecmp
import json
import os
import signal
import sqlite3
import time

import pytest
from helpers import run_cli
from test_many_mounts import query, wait_for


def _tree(root) -> dict[str, tuple[int, int, bytes | None]]:
    """path -> (mode, mtime in s, bytes of a file or a link's target; None for a directory)."""
    out: dict[str, tuple[int, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                data: bytes | None = os.readlink(path).encode()
            elif name in dirnames:
                data = None
            else:
                with open(path, "rb") as f:
                    data = f.read()
            mtime = int(st.st_mtime) if not os.path.isdir(path) else 0  # a directory's changes with its entries
            out[os.path.relpath(path, root)] = (st.st_mode, mtime, data)
    return out


def _source(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(3_000_000) + bytes(1_000_000) + os.urandom(123))  # staged
    (src / "sub" / "small.txt").write_bytes(b"small")
    (src / "sub" / "empty").write_bytes(b"")
    os.symlink("small.txt", src / "sub" / "link")
    (src / "sub" / "deeper" / "mode.txt").write_bytes(b"x" * 5000)
    os.chmod(src / "sub" / "deeper" / "mode.txt", 0o640)
    os.utime(src / "sub" / "small.txt", (1_700_000_000, 1_700_000_000))
    return src


def test_an_import_appears_whole_on_live_mounts_and_exports_back_identical(mounts, tmp_path):
    a = mounts()
    b = mounts(store=a.store, volume=a.volume)
    src = _source(tmp_path)
    r = run_cli("import", src, "/imported", *a.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "imported" in r.stdout and "4 file(s)" in r.stdout, r.stdout
    version = r.stdout.split("as version ")[1].split(":")[0]
    for m in (a, b):
        assert wait_for(lambda: _tree(m / "imported") == _tree(src)), (sorted(_tree(m / "imported")), sorted(_tree(src)))
    out = tmp_path / "out"
    r = run_cli("export", "/imported", out, *a.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _tree(out) == _tree(src)
    # into an existing directory; a name it has already is refused before anything is written
    (a / "here").mkdir()
    (a / "here" / "big.bin").write_bytes(b"mine")
    r = run_cli("import", src, "/here", *a.where, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "/here/big.bin exists in the volume" in r.stderr
    assert sorted(os.listdir(a / "here")) == ["big.bin"] and (a / "here" / "big.bin").read_bytes() == b"mine"
    log = json.loads(run_cli("log", "/imported", *a.where, "--json").stdout)
    assert [e["version"] for e in log] == [version]  # one commit made all of it
    assert len(log[0]["files"]) == 8, log  # /imported and the 7 entries under it


def test_an_export_of_a_past_version_is_byte_identical_to_a_mount_of_it(mounts, tmp_path):
    live = mounts()
    con = sqlite3.connect(live / "app.db")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    con.executemany("INSERT INTO t(v) VALUES (randomblob(2000))", [()] * 1000)
    con.commit()
    then = json.loads(run_cli("log", *live.where, "--json", "--limit", "1").stdout)[0]["version"]
    con.execute("DELETE FROM t WHERE id % 2 = 0")
    con.commit()
    con.execute("VACUUM")
    con.close()
    past = mounts(store=live.store, volume=live.volume, extra_args=("--at", then))
    out = tmp_path / "app-then.db"
    r = run_cli("export", "/app.db", out, "--at", then, *live.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(out, past / "app.db", shallow=False)
    assert query(out, "SELECT count(*) FROM t") == [(1000,)]
    everything = tmp_path / "all"
    assert run_cli("export", everything, *live.where, timeout=120).returncode == 0
    assert filecmp.cmp(everything / "app.db", live / "app.db", shallow=False)
    for args, says in [
        (["export", "/app.db", out], "exists; name a new path"),
        (["export", "/nothing", tmp_path / "n"], "has no /nothing"),
        (["export", "/app.db", tmp_path / "no" / "such" / "dir"], "is not a directory; create it first"),
        (["import", tmp_path / "nothing"], "is not a directory"),
    ]:
        r = run_cli(*args, *live.where)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / "n").exists()


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
def test_an_import_killed_half_way_leaves_nothing(mounts, tmp_path):
    """An import behind a slow simulated cluster, killed with -9 while it stages: no name
    of it appears, and gc removes what it staged."""
    live = mounts()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(2_000_000))
    importer = live.py(
        "import sys\nfrom fusesqlite.cli import main\nsys.exit(main(sys.argv[1:]))\n",
        "import", str(src), "/imported", *live.where, "--simulate", "latency_ms=100,commit_ms=100",
    )
    time.sleep(2.0)
    assert importer.poll() is None, importer.communicate()
    os.kill(importer.pid, signal.SIGKILL)
    importer.wait()
    assert not (live / "imported").exists()
    r = run_cli("gc", "--staging-timeout", "0", *live.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "removed 0 abandoned" not in r.stdout, r.stdout
    r = run_cli("import", src, "/imported", *live.where, timeout=120)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: _tree(live / "imported") == _tree(src))


@pytest.mark.slow  # run once, on the native path: it tests the store, not the FUSE path
def test_ctrl_c_leaves_no_half_done_import_or_export(mounts, tmp_path):
    """SIGINT (Ctrl-C) in the middle: the import removes its stagings and makes nothing
    visible; the export removes its unfinished tree; both exit 130."""
    live = mounts()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(2_000_000))
    cli = "import sys\nfrom fusesqlite.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    slow = ("--simulate", "latency_ms=100,commit_ms=100")
    importer = live.py(cli, "import", str(src), "/imported", *live.where, *slow)
    time.sleep(2.0)
    assert importer.poll() is None, importer.communicate()
    os.kill(importer.pid, signal.SIGINT)
    assert importer.wait(timeout=60) == 130, importer.communicate()
    assert not (live / "imported").exists()
    r = run_cli("gc", "--staging-timeout", "0", *live.where, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("removed 0 abandoned staging(s)"), r.stdout

    assert run_cli("import", src, "/imported", *live.where, timeout=120).returncode == 0
    dest = tmp_path / "out"
    exporter = live.py(cli, "export", "/imported", str(dest), *live.where, *slow)
    time.sleep(2.0)
    assert exporter.poll() is None, exporter.communicate()
    os.kill(exporter.pid, signal.SIGINT)
    assert exporter.wait(timeout=60) == 130, exporter.communicate()
    assert not dest.exists()
    assert not [n for n in os.listdir(tmp_path) if "fusesqlite-export" in n], os.listdir(tmp_path)
