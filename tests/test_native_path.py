"""The native path's switch and fences (fusesqlite/fuse_caps.py, _fuse_init.c), and a
mount point left stale by a daemon that died: real mounts, real daemons."""
from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess

import pytest
from helpers import REPO, child_env, fusesqlite_cmd, opendb
from native_path import expected, native_on

from fusesqlite import fuse_caps

pytestmark = pytest.mark.timeout(120)


def _native_objects(pid: int) -> set[str]:
    """fusesqlite's C modules mapped into a process, by module name."""
    with open(f"/proc/{pid}/maps") as f:
        return set(re.findall(r"fusesqlite/(_\w+)\.cpython", f.read()))


def _small_transactions(m, n: int = 20) -> None:
    with opendb(m / "app.db") as c:
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        for k in range(n):
            c.execute("INSERT INTO t VALUES (?, randomblob(3000))", (k,))
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("SELECT count(*) FROM t").fetchone() == (n,)


def _counters(log: str) -> dict[str, int]:
    line = [ln for ln in log.splitlines() if "event=unmounted" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(journal_\w+_in_c|busy_polls_\w+)=(\d+)", line)}


def test_the_switch_runs_the_pure_python_path_with_no_c_of_the_hooks_or_blocks_loaded(mounts):
    """FUSESQLITE_NATIVE=0: the mount works, logs the one line that says so, answers
    nothing in C and loads neither _fuse_init (the hooks) nor _blocks (decoding)."""
    m = mounts(env_extra={fuse_caps.NATIVE_ENV: "0"})
    assert not native_on(m)
    assert "cause='FUSESQLITE_NATIVE=0'" in m.log_text(), m.log_tail()
    assert not {"_fuse_init", "_blocks"} & _native_objects(m.pid)
    _small_transactions(m)
    m.stop()
    assert set(_counters(m.log_text()).values()) == {0}, _counters(m.log_text())
    m = mounts.remount(m)
    with opendb(m / "app.db") as c:
        assert c.execute("SELECT count(*), sum(length(v)) FROM t").fetchone() == (20, 20 * 3000)


def test_the_hooks_engage_where_tested_even_when_the_suite_runs_with_them_off(mounts):
    """FUSESQLITE_NATIVE=1 in the daemon, whatever this run's own setting: on a tested
    libfuse and pyfuse3 the hooks are on (native_path.expected), else the fallback."""
    m = mounts(env_extra={fuse_caps.NATIVE_ENV: "1"})
    on = native_on(m)
    assert on == expected({fuse_caps.NATIVE_ENV: "1"})[0]
    assert ({"_fuse_init", "_blocks"} <= _native_objects(m.pid)) == on
    _small_transactions(m)
    m.stop()
    if on:
        assert _counters(m.log_text())["journal_syncs_in_c"] > 0


def test_an_untested_pyfuse3_gets_the_pure_python_path_and_one_line_that_says_so(mounts, tmp_path):
    """pyfuse3's metadata says 9.9.0 (a release the hooks were not tested with): the
    hooks are not even loaded, the mount works, and the log names the version."""
    fake = tmp_path / "fake-dist"
    info = fake / "pyfuse3-9.9.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pyfuse3\nVersion: 9.9.0\n")
    pythonpath = os.pathsep.join([str(fake), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    m = mounts(env_extra={fuse_caps.NATIVE_ENV: "1", "PYTHONPATH": pythonpath})
    log = m.log_text()
    off = [ln for ln in log.splitlines() if "event=native_off" in ln]
    assert len(off) == 1 and "pyfuse3 9.9.0 is not a version the hooks were tested with" in off[0], m.log_tail()
    assert "_fuse_init" not in _native_objects(m.pid)
    _small_transactions(m)
    m.stop()
    assert _counters(m.log_text())["journal_syncs_in_c"] == 0


def test_a_stale_mount_point_is_refused_with_the_command_that_clears_it(mounts):
    """A daemon killed with SIGKILL (as a crash would) leaves its mount point stale
    ("Transport endpoint is not connected"): mounting there again fails at once with
    one line that gives the command; after it, the mount works and the data is there."""
    m = mounts()
    _small_transactions(m)
    m.kill9()
    with pytest.raises(OSError) as stale:
        os.stat(m.mountpoint)
    assert stale.value.errno == errno.ENOTCONN
    again = subprocess.run(fusesqlite_cmd("mount", m.mountpoint, *m.where), env=child_env(),
                           cwd=REPO, capture_output=True, text=True, timeout=60, start_new_session=True)
    assert again.returncode != 0, f"mounting on a stale mount point succeeded:\n{again.stderr}"
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "stale mount" in lines[0], again.stderr
    command = re.search(r"fusermount3 -u \S+", lines[0])
    assert command, lines[0]
    subprocess.run(shlex.split(command[0]), check=True, timeout=30)
    os.stat(m.mountpoint)  # an empty directory again
    m = mounts.remount(m)
    with opendb(m / "app.db") as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (20,)
    os.kill(m.pid, signal.SIGTERM)
    assert m.proc.wait(30) == 0
