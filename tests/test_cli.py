"""The command line: clean one-line errors, signals, the store default, volumes."""
from __future__ import annotations

import ctypes.util
import os
import signal
import subprocess
import sys

import pytest
from helpers import PY, REPO, child_env, force_unmount, fusesqlite_cmd, is_mounted, opendb, run_cli

pytestmark = pytest.mark.timeout(60)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    __tracebackhide__ = True
    err = r.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert r.returncode != 0, f"expected failure, got exit 0; stderr={err!r}"
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("fusesqlite: error:"), f"stderr does not start with 'fusesqlite: error:': {err!r}"
    assert "usage:" not in err.lower(), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def mp(tmp_path):
    """An empty mountpoint; unmounted afterwards should a command that ought to fail have mounted it."""
    d = tmp_path / "mp"
    d.mkdir()
    yield d
    if is_mounted(d):
        force_unmount(d)


def expect_error(*args, **kw) -> subprocess.CompletedProcess:
    """run_cli for a command that must fail quickly (a foreground mount would never return)."""
    __tracebackhide__ = True
    kw.setdefault("timeout", 20)
    try:
        return run_cli(*args, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"'fusesqlite {' '.join(map(str, args))}' did not fail: still running after {kw['timeout']} s "
                    f"(it probably mounted)", pytrace=False)


def test_help():
    r = run_cli("mount", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--store", "--volume", "--debug"):
        assert opt in r.stdout


def test_mountpoint_missing(tmp_path):
    mp = tmp_path / "nope"
    r = expect_error("mount", mp, "--store", tmp_path / "store")
    assert_one_line_error(r, "does not exist")
    assert not mp.exists()


def test_mountpoint_not_a_directory(tmp_path):
    mp = tmp_path / "file"
    mp.write_text("x")
    r = expect_error("mount", mp, "--store", tmp_path / "store")
    line = assert_one_line_error(r)
    assert "not a directory" in line.lower(), line


def test_mountpoint_not_empty(tmp_path, mp):
    (mp / "something").write_text("x")
    r = expect_error("mount", mp, "--store", tmp_path / "store")
    assert_one_line_error(r, "not empty")
    assert not is_mounted(mp)


def test_already_mounted(mounts, tmp_path):
    m = mounts()
    r = expect_error("mount", m.mountpoint, "--store", tmp_path / "store2")
    assert_one_line_error(r, "already mounted")
    # the first mount is unharmed
    (m / "f").write_bytes(b"ok")
    assert (m / "f").read_bytes() == b"ok"
    assert m.alive()
    m.stop()


@pytest.mark.usefixtures("root_only")
def test_dev_fuse_unavailable(tmp_path, mp):
    store = tmp_path / "store"
    cmd = " ".join(
        ["mount -t tmpfs none /dev && exec"] + [f"'{a}'" for a in fusesqlite_cmd("mount", mp, "--store", store)]
    )
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd],
                       capture_output=True, text=True, timeout=30, env=child_env(), cwd=str(REPO))
    if r.stderr.startswith("unshare:") or r.stderr.startswith("mount:"):
        pytest.skip(f"cannot unshare: {r.stderr}")
    assert_one_line_error(r, "/dev/fuse")


def test_fusermount3_missing(tmp_path, mp):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # a wrapper, not a symlink: a symlinked venv python would lose its venv (pyvenv.cfg lookup)
    wrapper = bindir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    r = expect_error("mount", mp, "--store", tmp_path / "store", python=str(bindir / "python3"),
                env=child_env(path=str(bindir)))
    assert_one_line_error(r, "fusermount3")
    assert not is_mounted(mp)


def test_store_unwritable(tmp_path, mp):
    bad = tmp_path / "regular-file"
    bad.write_text("x")
    store = f"{bad}/sub"
    r = expect_error("mount", mp, "--store", store)
    assert_one_line_error(r, store)
    assert not is_mounted(mp)


def test_store_unwritable_etc_hostname(tmp_path, mp):
    if not os.path.isfile("/etc/hostname"):
        pytest.skip("no /etc/hostname")
    r = expect_error("mount", mp, "--store", "/etc/hostname/sub")
    assert_one_line_error(r, "/etc/hostname/sub")


@pytest.mark.parametrize("spec", ["fdb:", "fdb:{cluster}"])
def test_fdb_client_library_missing(tmp_path, mp, spec):
    if ctypes.util.find_library("fdb_c"):
        pytest.skip("libfdb_c is installed")
    cluster = tmp_path / "fdb.cluster"
    cluster.write_text("test:test@127.0.0.1:4500\n")
    spec = spec.format(cluster=cluster)
    r = expect_error("mount", mp, "--store", spec)
    assert_one_line_error(r, "libfdb_c")
    assert not is_mounted(mp)


def test_unknown_command():
    r = expect_error("frobnicate")
    assert_one_line_error(r)


def test_unknown_option(tmp_path, mp):
    r = expect_error("mount", mp, "--store", tmp_path / "store", "--no-such-option")
    assert_one_line_error(r)


@pytest.mark.parametrize("option", ["--busy-poll-us=-1", "--busy-poll-us=soon", "--memory-mb=0"])
def test_a_bad_number_is_one_line(tmp_path, mp, option):
    r = expect_error("mount", mp, "--store", tmp_path / "store", option)
    assert_one_line_error(r, option.split("=")[0].lstrip("-"))


def test_store_from_environment(mounts, tmp_path):
    store = tmp_path / "envstore"
    store.mkdir()
    m = mounts(store=store, pass_store=False, env_extra={"FUSESQLITE_STORE": str(store)})
    with opendb(m / "e.sqlite") as c:
        c.execute("CREATE TABLE t(v)")
        c.execute("INSERT INTO t VALUES ('env')")
    m.stop()
    assert os.path.exists(store / "store.sqlite"), os.listdir(store)
    # the same store, now given explicitly, has the data
    m2 = mounts(mountpoint=m.mountpoint, store=store)
    with opendb(m2 / "e.sqlite") as c:
        assert c.execute("SELECT v FROM t").fetchall() == [("env",)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_0(mounts, sig):
    m = mounts()
    assert m.wait_log("event=mounted", 5), f"no event=mounted line:\n{m.log_text()}"
    (m / "f").write_bytes(b"x" * 10000)
    m.stop(sig)  # asserts exit 0 and that the mountpoint is gone
    assert not os.listdir(m.mountpoint)
    m = mounts.remount(m)
    assert (m / "f").read_bytes() == b"x" * 10000


def test_logs_go_to_stderr_and_foreground(mounts):
    m = mounts(split_output=True)
    assert m.wait_log("event=mounted", 5), f"no event=mounted on stderr; stdout was: {m.stdout_text()!r}"
    assert "event=mounted" not in m.stdout_text()
    assert m.alive()  # stays in the foreground: the process we started is the daemon
    m.stop()
    assert sum("event=mounted" in line for line in m.log_text().splitlines()) == 1


def test_debug_flag_logs_more(mounts, tmp_path):
    texts = []
    for debug in (False, True):
        m = mounts(store=tmp_path / f"store-{debug}", debug=debug)
        for i in range(3):
            (m / f"f{i}").write_bytes(b"x" * i)
        m.stop()
        texts.append(m.log_text())
    assert "event=mounted" in texts[1]
    assert len(texts[1].splitlines()) > len(texts[0].splitlines()), texts


def test_volumes_are_independent(mounts, tmp_path):
    store = tmp_path / "shared-store"
    a = mounts(store=store, volume="alpha")
    with opendb(a / "x.sqlite") as c:
        c.execute("CREATE TABLE t(v)")
        c.execute("INSERT INTO t VALUES ('alpha')")
    a.stop()
    b = mounts(store=store, volume="beta")
    assert os.listdir(b.mountpoint) == []
    b.stop()
    a2 = mounts.remount(a)
    with opendb(a2 / "x.sqlite") as c:
        assert c.execute("SELECT v FROM t").fetchall() == [("alpha",)]


def test_top_level_help():
    r = subprocess.run([PY, "-m", "fusesqlite", "--help"], capture_output=True, text=True, timeout=30,
                       env=child_env(), cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert "mount" in r.stdout
