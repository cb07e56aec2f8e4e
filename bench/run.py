"""Benchmarks: each workload on a fresh fusesqlite mount and on the local disk, same run.

    python3 bench/run.py [--seconds 5] [--only NAME ...]

Prints one row per workload with the rate on the local disk, on the mount, and
their ratio (mount / local; higher is better), plus the mount daemon's peak RSS
and CPU seconds. Speed targets are judged here, never in timed tests.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

Workload = Callable[[Path, float], tuple[float, str]]


def small_write_txns(root: Path, seconds: float) -> tuple[float, str]:
    """Autocommit INSERTs, default journal mode and synchronous: commits per second."""
    db = sqlite3.connect(root / "writes.sqlite")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    n, deadline = 0, time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        db.execute("INSERT INTO t(v) VALUES (?)", ("x" * 100,))
        db.commit()
        n += 1
    elapsed = time.monotonic() - start
    db.close()
    return n / elapsed, "commits/s"


def point_selects(root: Path, seconds: float) -> tuple[float, str]:
    """Warm point SELECTs in autocommit (each its own read transaction): queries per second."""
    path = root / "reads.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    with db:
        db.executemany("INSERT INTO t(v) VALUES (?)", (("v" * 200,) for _ in range(20_000)))
    db.close()
    db = sqlite3.connect(path)
    rng = random.Random(1)
    for i in range(1, 20_001):  # warm
        db.execute("SELECT v FROM t WHERE id=?", (i,)).fetchone()
    n, deadline = 0, time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        db.execute("SELECT v FROM t WHERE id=?", (rng.randint(1, 20_000),)).fetchone()
        n += 1
    elapsed = time.monotonic() - start
    db.close()
    return n / elapsed, "queries/s"


def bulk_copy(root: Path, seconds: float) -> tuple[float, str]:
    """cp of a 64 MB file into the directory: MB/s (includes the commit at close)."""
    src = Path(tempfile.gettempdir()) / "fusesqlite-bench-64m.bin"
    if not src.exists():
        src.write_bytes(os.urandom(64 << 20))
    start = time.monotonic()
    subprocess.run(["cp", src, root / "copy.bin"], check=True)
    subprocess.run(["sync", "-f", root / "copy.bin"], check=True)
    return 64 / (time.monotonic() - start), "MB/s"


WORKLOADS: dict[str, Workload] = {
    "small_write_txns": small_write_txns,
    "point_selects": point_selects,
    "bulk_copy": bulk_copy,
}


class Daemon:
    """A fusesqlite mount in its own process, for measuring."""

    def __init__(self, work: Path) -> None:
        self.mountpoint = work / "mnt"
        self.mountpoint.mkdir()
        self.log = open(work / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fusesqlite", "mount", str(self.mountpoint), "--store", str(work / "store")],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fusesqlite did not mount: see {work / 'daemon.log'}")
            time.sleep(0.05)

    def usage(self) -> tuple[float, float]:
        """(peak RSS in MiB, CPU seconds) of the daemon so far."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return peak / 1024, cpu

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each timed workload")
    ap.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), help="run only these workloads")
    args = ap.parse_args()
    names = args.only or list(WORKLOADS)
    with tempfile.TemporaryDirectory(prefix="fusesqlite-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        local = work / "local"
        local.mkdir()
        daemon = Daemon(work)
        try:
            print(f"{'workload':<20} {'local':>12} {'mount':>12} {'ratio':>7}  unit")
            for name in names:
                (local / name).mkdir()
                (daemon.mountpoint / name).mkdir()
                lrate, unit = WORKLOADS[name](local / name, args.seconds)
                mrate, _ = WORKLOADS[name](daemon.mountpoint / name, args.seconds)
                print(f"{name:<20} {lrate:>12.1f} {mrate:>12.1f} {mrate / lrate:>6.2f}x  {unit}", flush=True)
            peak, cpu = daemon.usage()
            print(f"mount daemon: peak RSS {peak:.0f} MiB, CPU {cpu:.1f} s")
        finally:
            daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
