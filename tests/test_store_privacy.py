"""The embedded store is its owner's alone (README, Security).

Whoever can read a store's files reads every file of every volume, whatever the
mounts' permissions say. So a new store is 0700/0600 throughout whatever the
umask, a user other than its owner cannot open it, an existing store open to
other users is refused with one line saying what to run unless
``--allow-shared-store``, and journals spilled to local temporary files are 0600.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusesqlite._journal import Contents
from helpers import force_unmount, is_mounted, opendb, run_cli

from fusesqlite.fs.transient import SPOOL_BYTES
from fusesqlite.store import EmbeddedStore, StoreNotPrivate
from fusesqlite.store.embedded import FILE_NAME

pytestmark = pytest.mark.timeout(90)

#: the unprivileged reader: a system Python (the test's own may live under /root, 0700)
NOBODY_PYTHON = "/usr/bin/python3"
READ_AS_NOBODY = (
    "import sqlite3, sys\n"
    "con = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)\n"
    "print(con.execute('SELECT count(*) FROM kv').fetchone()[0])\n"
)

#: one transaction that fills table t with n rows of size random bytes
ROWS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) "
    "INSERT INTO t SELECT randomblob({size}) FROM n"
)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block (and the processes it starts) under ``mask``."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top, name)
            found[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return found


def assert_private(root: Path) -> dict[str, int]:
    __tracebackhide__ = True
    found = modes(root)
    wrong = {}
    for rel, mode in found.items():
        want = 0o700 if (root / rel).is_dir() else 0o600
        if mode != want:
            wrong[rel] = f"{mode:04o} (want {want:04o})"
    assert not wrong, f"not private: {wrong}"
    return found


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    __tracebackhide__ = True
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, f"expected failure, got exit 0; stderr={r.stderr!r}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("fusesqlite: error:"), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def shared_store(path: Path, dir_mode: int = 0o755, file_mode: int = 0o644) -> Path:
    """A store with data, then opened up as a careless ``chmod`` (or an older version) would leave it."""
    store = EmbeddedStore(path)
    store.transact(lambda tr: tr.set(b"k", b"v"))
    store.close()
    for p in [path, *path.rglob("*")]:
        os.chmod(p, dir_mode if p.is_dir() else file_mode)
    return path


# a new store


def test_a_mounted_store_is_private_under_umask_022(mounts, tmp_path):
    store = tmp_path / "store"
    with umask(0o022):
        m = mounts(store=store)  # the fixture creates the directory first (0755 here): empty, it becomes the store's
        b = mounts(store=store)  # a second mount: the wake-up directory is in use
    with opendb(m / "app.sqlite") as c:
        c.execute("CREATE TABLE t(v)")
        c.execute(ROWS.format(n=500, size=200))
    with opendb(b / "app.sqlite") as c:
        c.execute("SELECT count(*) FROM sqlite_master").fetchone()  # b reads the store too
    found = assert_private(store)
    for name in (FILE_NAME, FILE_NAME + "-wal", FILE_NAME + "-shm", "watchers"):
        assert name in found, f"{name} missing: the check above saw {sorted(found)}"
    assert any(rel.startswith("watchers/") for rel in found), sorted(found)
    b.stop()
    m.stop()
    assert_private(store)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277], ids=lambda m: f"umask{m:04o}")
def test_a_new_store_is_private_whatever_the_umask(tmp_path, mask):
    path = tmp_path / "store"
    with umask(mask):
        store = EmbeddedStore(path)
        try:
            store.transact(lambda tr: tr.set(b"k", b"v"))  # 0277 would leave the owner unable to write
            assert store._wakeups.listen() is not None
            assert_private(path)
        finally:
            store.close()


def test_an_empty_directory_becomes_a_private_store(tmp_path):
    path = tmp_path / "store"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    EmbeddedStore(path).close()
    assert_private(path)


def test_a_directory_with_other_things_in_it_is_not_made_a_store(tmp_path):
    path = tmp_path / "things"
    path.mkdir()
    os.chmod(path, 0o755)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreNotPrivate, match="chmod -R go-rwx"):
        EmbeddedStore(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755, "someone else's directory must not be chmod'ed"
    assert not (path / FILE_NAME).exists()


# another user


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory every user can enter (tmp_path's parents are root's alone, which
    would stop another user before the store's own modes are put to the test)."""
    d = Path(tempfile.mkdtemp(prefix="fusesqlite-privacy-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def read_as_nobody(db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", NOBODY_PYTHON, "-c", READ_AS_NOBODY, str(db)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def test_another_user_cannot_open_the_store(reachable_dir):
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(NOBODY_PYTHON, os.X_OK):
        pytest.skip("needs root, setpriv and a system python3 to act as another user")
    path = reachable_dir / "store"
    with umask(0o022):
        store = EmbeddedStore(path)
    try:
        store.transact(lambda tr: [tr.set(b"k%d" % i, b"secret") for i in range(10)])
        assert (path / (FILE_NAME + "-wal")).exists()
        r = read_as_nobody(path / FILE_NAME)
        assert r.returncode != 0, f"nobody read the store: {r.stdout!r}"
        assert "unable to open" in r.stderr or "Permission denied" in r.stderr, r.stderr
        # the same read succeeds once the store is opened up: the refusal above is the modes' doing
        for p in [path, *path.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        r = read_as_nobody(path / FILE_NAME)
        assert r.returncode == 0 and r.stdout.strip() == "10", f"control read failed: {r.stderr}"
    finally:
        store.close()


# an existing store open to others


@pytest.mark.parametrize(
    "dir_mode,file_mode",
    [(0o755, 0o644), (0o770, 0o660), (0o700, 0o644)],
    ids=["world-readable", "group-writable", "files-only"],
)
def test_gc_refuses_a_shared_store_with_one_line(tmp_path, dir_mode, file_mode):
    path = shared_store(tmp_path / "store", dir_mode, file_mode)
    r = run_cli("gc", "--store", path)
    assert_one_line_error(r, f"chmod -R go-rwx {path}", "--allow-shared-store")
    r = run_cli("gc", "--store", path, "--allow-shared-store")
    assert r.returncode == 0, r.stderr
    assert "removed 0 abandoned staging(s)" in r.stdout


def test_mount_refuses_a_shared_store_with_one_line(mounts, tmp_path):
    path = shared_store(tmp_path / "store")
    mp = tmp_path / "mp"
    mp.mkdir()
    try:
        r = run_cli("mount", mp, "--store", path, timeout=20)
    except subprocess.TimeoutExpired:
        r = None
    if r is None or is_mounted(mp):
        force_unmount(mp)
        pytest.fail("mounted a store open to other users")
    assert_one_line_error(r, f"chmod -R go-rwx {path}", "--allow-shared-store")
    m = mounts(mountpoint=mp, store=path, extra_args=("--allow-shared-store",))
    assert m.wait_log("event=store_shared"), m.log_tail()
    (m / "f").write_bytes(b"shared on purpose")
    m.stop()
    # once made private as the message says, it mounts without the option
    subprocess.run(["chmod", "-R", "go-rwx", str(path)], check=True)
    m = mounts(mountpoint=mp, store=path)
    assert (m / "f").read_bytes() == b"shared on purpose"
    m.stop()


def test_a_store_shared_on_purpose_keeps_wakeups_usable_by_its_group(tmp_path):
    path = shared_store(tmp_path / "store", 0o770, 0o660)
    store = EmbeddedStore(path, allow_shared=True)
    try:
        assert store._wakeups.listen() is not None
        assert stat.S_IMODE(os.stat(path / "watchers").st_mode) == 0o770
        assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in (path / "watchers").iterdir())
    finally:
        store.close()


# journals spilled to local temporary files


def spill_files(pid: int | str, spill_dir: str) -> dict[str, int]:
    """The permission bits of the unlinked files ``pid`` holds open in ``spill_dir``: spills are unlinked at once."""
    found = {}
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            st = os.stat(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith(spill_dir + "/") and target.endswith(" (deleted)") and stat.S_ISREG(st.st_mode):
            found[target] = stat.S_IMODE(st.st_mode)
    return found


@pytest.mark.parametrize("mask", [0o000, 0o022], ids=lambda m: f"umask{m:04o}")
def test_a_spilled_journal_is_private(tmp_path, mask):
    spill_dir = str(tmp_path)
    with umask(mask):
        c = Contents(SPOOL_BYTES, spill_dir)
        try:
            c.write(0, os.urandom(SPOOL_BYTES + 4096))
            assert c.spilled
            found = spill_files("self", spill_dir)
            assert found, f"no spill file open in {spill_dir}"
            assert set(found.values()) == {0o600}, found
        finally:
            c.close()


def test_a_mounts_spilled_journal_is_private(mounts, tmp_path):
    """Through a mount: a rollback journal bigger than SPOOL_BYTES spills to the daemon's temporary directory."""
    with umask(0o022):
        m = mounts()
    with opendb(m / "big.sqlite") as c:
        c.execute("CREATE TABLE t(v)")
        c.execute(ROWS.format(n=1500, size=1000))  # 1.5 MB: its journal outgrows SPOOL_BYTES
    con = sqlite3.connect(m / "big.sqlite", isolation_level=None)
    try:
        con.execute("PRAGMA cache_size=100")  # SQLite writes pages out mid-transaction: the journal is synced first
        con.execute("BEGIN")
        con.execute("UPDATE t SET v = zeroblob(1000)")
        found = spill_files(m.pid, tempfile.gettempdir())
        con.execute("ROLLBACK")
    finally:
        con.close()
    assert found, f"the daemon holds no spill file in {tempfile.gettempdir()}"
    assert set(found.values()) == {0o600}, found
    m.stop()
