"""Small helpers shared by the end-to-end tests (no fixtures here; see conftest.py)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

#: a daemon's affinity (MountFactory's ``cpus``) that leaves it one CPU, as ``taskset -c N`` would
ONE_CPU = frozenset({min(os.sched_getaffinity(0))})

#: every file/database written through the mount gets this page-size friendly chunk
MB = 1024 * 1024


def child_env(extra: dict[str, str] | None = None, *, path: str | None = None) -> dict[str, str]:
    """The environment for processes we start: fusesqlite importable from the checkout."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.pop("FUSESQLITE_STORE", None)
    if path is not None:
        env["PATH"] = path
    if extra:
        env.update(extra)
    return env


def fusesqlite_cmd(*args: object, python: str = PY) -> list[str]:
    return [python, "-m", "fusesqlite", *map(str, args)]


def run_cli(
    *args: object,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    python: str = PY,
) -> subprocess.CompletedProcess:
    """Run ``python -m fusesqlite ARGS`` to completion, capturing text output."""
    return subprocess.run(
        fusesqlite_cmd(*args, python=python),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env if env is not None else child_env(),
        cwd=str(REPO),
        timeout=timeout,
    )


# ---------------------------------------------------------------------------
# /proc/mounts


def _unescape_mount_field(s: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_entries() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) for every line of /proc/mounts."""
    res = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                res.append((parts[0], _unescape_mount_field(parts[1]), parts[2]))
    return res


def is_mounted(path: os.PathLike | str) -> bool:
    p = os.path.realpath(os.fspath(path))
    return any(mp == p for _, mp, _ in mount_entries())


def force_unmount(path: os.PathLike | str) -> str:
    """Unmount ``path`` however possible (fusermount3 -u, then lazily); returns what was done."""
    p = os.fspath(path)
    done = []
    for cmd in (["fusermount3", "-u", p], ["umount", p], ["fusermount3", "-uz", p], ["umount", "-l", p]):
        if not is_mounted(p):
            break
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            done.append(f"{' '.join(cmd)} -> {r.returncode} {r.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as e:
            done.append(f"{' '.join(cmd)} -> {e!r}")
    return "; ".join(done)


# ---------------------------------------------------------------------------
# SQLite


def connect(path: os.PathLike | str, *, journal_mode: str | None = None, timeout: float = 20.0) -> sqlite3.Connection:
    """An autocommit connection (explicit BEGIN/COMMIT) with a busy timeout."""
    c = sqlite3.connect(os.fspath(path), timeout=timeout, isolation_level=None)
    c.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    if journal_mode is not None:
        got = c.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert got.lower() == journal_mode.lower(), f"journal_mode={journal_mode} gave {got}"
    return c


@contextlib.contextmanager
def opendb(path: os.PathLike | str, **kw) -> Iterator[sqlite3.Connection]:
    c = connect(path, **kw)
    try:
        yield c
    finally:
        c.close()


def integrity(path: os.PathLike | str) -> str:
    with opendb(path) as c:
        return "\n".join(r[0] for r in c.execute("PRAGMA integrity_check").fetchall())


def table_digest(c: sqlite3.Connection, sql: str) -> tuple[int, str]:
    """(row count, sha256 of the repr of every row) for a query with a stable ORDER BY."""
    h = hashlib.sha256()
    n = 0
    for row in c.execute(sql):
        h.update(repr(row).encode())
        n += 1
    return n, h.hexdigest()


# ---------------------------------------------------------------------------
# processes


def run_py(code: str, *args: object, timeout: float = 60, check: bool = True, env=None) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (argv[1:] = args)."""
    r = subprocess.run(
        [PY, "-c", code, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else child_env(),
    )
    if check and r.returncode != 0:
        raise AssertionError(f"python snippet failed rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def run(cmd: Sequence[object], *, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [os.fspath(x) if isinstance(x, os.PathLike) else str(x) for x in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        **kw,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed rc={r.returncode}\nstdout:\n{r.stdout!r}\nstderr:\n{r.stderr!r}")
    return r


# ---------------------------------------------------------------------------
# files


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            h.update(chunk)
    return h.hexdigest()


def fill_until_enospc(path: os.PathLike | str) -> int:
    """Write zeros to ``path`` until the file system is full; returns bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (MB, 64 * 1024, 4096, 512, 1):
            buf = b"\0" * size
            while True:
                try:
                    n = os.write(fd, buf)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        break
                    raise
                written += n
                if n < size:
                    break
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    return written


def page_cache_bytes(path: os.PathLike | str) -> int:
    """How much of ``path`` the kernel holds in its page cache (mincore of a shared mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * (-(-size // page)))()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in vec) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_metrics(port: int) -> dict[str, float]:
    """Every sample of the endpoint, by name and labels; parsing fails on anything
    that is not the Prometheus text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples
