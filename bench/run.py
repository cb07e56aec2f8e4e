"""Benchmarks: each workload on a fresh fusesqlite mount and on the local disk, same run.

    python3 bench/run.py [--quick] [--only NAME ...] [--json PATH] [--source DIR] [--simulate SPEC] [--metrics]

Each workload runs first on the local disk (the file system holding the mount's
store), then on the mount, and the summary compares them. ratio is the mount's
speed over the local disk's (for speedtest1: local time / mount time), so higher
is better and 1.0 is parity. The targets are the project's speed goals for the
embedded store; they are judged here, never in timed tests. The daemon's peak
RSS and CPU seconds per transaction are reported too. --quick shrinks every
workload for a smoke test of the harness (well under a minute). --simulate puts
the mount's store behind a simulated FoundationDB cluster (docs/simulated-store.md),
e.g. --simulate latency_ms=1,commit_ms=4: the local disk side stays as it is.
--metrics serves Prometheus metrics from every daemon and scrapes them every second.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/tmp/fusesqlite-bench-cache")  # inputs worth keeping between runs
SCRAPE_EVERY = 1.0  # seconds between scrapes of a daemon's /metrics (--metrics)
MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    """Sizes of the workloads: defaults for a full run (~5 min), smaller with --quick."""

    seconds: float = 5.0  # each timed loop
    scan_mb: int = 200  # cold_scan database size
    speedtest_size: int = 200  # speedtest1 --size: ~12 s on the local disk
    copy_mb: int = 64  # bulk_copy file size


QUICK = Config(seconds=1.0, scan_mb=16, speedtest_size=10, copy_mb=16)


@dataclass
class Side:
    """Where a workload runs, and how to make its caches cold (returns a note on what was done)."""

    name: str
    root: Path
    make_cold: Callable[[], str]


@dataclass
class Measure:
    value: float
    unit: str
    higher_is_better: bool = True  # rates; False for elapsed times
    txns: int = 0  # write transactions committed, for the daemon's CPU per transaction
    note: str = ""
    parts: dict[str, float] = field(default_factory=dict)  # seconds per step, where the workload has steps


class Skip(Exception):
    """The workload cannot run on this machine; the message is the one-line reason."""


class PartialFailure(RuntimeError):
    """The workload failed after some of its steps: their times still compare with the other side."""

    def __init__(self, message: str, parts: dict[str, float]) -> None:
        super().__init__(message)
        self.parts = parts


Workload = Callable[[Side, Config], Measure]


#: timed runs of the small-transaction workload per side, median reported: single
#: 5-second runs of the mount ranged from 588 to 795 commits/s within one hour (where
#: the kernel placed the app and the daemon decides much, docs/benchmarks.md)
SMALL_TXN_RUNS = 3


def small_write_txns(side: Side, cfg: Config) -> Measure:
    """Autocommit INSERTs, default journal mode and synchronous: commits per second."""
    db = sqlite3.connect(side.root / "writes.sqlite")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    rates, total = [], 0
    for _ in range(SMALL_TXN_RUNS):
        n, start = 0, time.monotonic()
        deadline = start + cfg.seconds
        while time.monotonic() < deadline:
            db.execute("INSERT INTO t(v) VALUES (?)", ("x" * 100,))
            db.commit()
            n += 1
        rates.append(n / (time.monotonic() - start))
        total += n
    db.close()
    runs = ", ".join(f"{r:.0f}" for r in rates)
    return Measure(sorted(rates)[len(rates) // 2], "commits/s", txns=total, note=f"median of {runs}")


def point_selects(side: Side, cfg: Config) -> Measure:
    """Warm point SELECTs in autocommit (each its own read transaction): queries per second."""
    path = side.root / "reads.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    with db:
        db.executemany("INSERT INTO t(v) VALUES (?)", (("v" * 200,) for _ in range(20_000)))
    db.close()
    db = sqlite3.connect(path)
    rng = random.Random(1)
    for i in range(1, 20_001):  # warm
        db.execute("SELECT v FROM t WHERE id=?", (i,)).fetchone()
    n, start = 0, time.monotonic()
    deadline = start + cfg.seconds
    while time.monotonic() < deadline:
        db.execute("SELECT v FROM t WHERE id=?", (rng.randint(1, 20_000),)).fetchone()
        n += 1
    elapsed = time.monotonic() - start
    db.close()
    return Measure(n / elapsed, "queries/s")


@functools.cache
def built_binary(script_name: str, what: str) -> Path:
    """A binary built once into CACHE by bench/<script_name> (from a Debian source package)."""
    script = Path(__file__).with_name(script_name)
    r = subprocess.run(["sh", str(script), str(CACHE)], capture_output=True, text=True)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise Skip(f"cannot build {what} ({script.name}): {why}")
    return Path(r.stdout.strip().splitlines()[-1])


def speedtest1_binary() -> Path:
    """SQLite's speedtest1, built once from Debian's source package (bench/build_speedtest1.sh)."""
    return built_binary("build_speedtest1.sh", "speedtest1")


def speedtest1(side: Side, cfg: Config) -> Measure:
    """SQLite's speedtest1 (big and small transactions, scans, index builds, updates, VACUUM): total seconds."""
    binary = speedtest1_binary()
    start = time.monotonic()
    r = subprocess.run(
        [str(binary), "--size", str(cfg.speedtest_size), "speedtest1.db"],
        cwd=side.root, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - start
    # stdout: " 200 - VACUUM......   0.200s" per step; a failing step has no time and its error is on stderr.
    steps = [m for line in r.stdout.splitlines() if (m := re.match(r"\s*(\d+) - (.*?)\.{3,}\s*([\d.]+s)?", line))]
    parts = {f"{m[1]} {m[2]}": float(m[3][:-1]) for m in steps if m[3]}
    if r.returncode != 0:
        at = f" at step {steps[-1][1]} {steps[-1][2]}" if steps and not steps[-1][3] else ""
        error = " | ".join(r.stderr.split("\n")[:2]).strip(" |")
        raise PartialFailure(f"speedtest1 exit {r.returncode}{at}: {error}", parts)
    return Measure(elapsed, "s", higher_is_better=False, parts=parts)


def bulk_copy(side: Side, cfg: Config) -> Measure:
    """cp of an incompressible file into the directory: MiB/s (includes the commit at close)."""
    src = cached_file(f"random-{cfg.copy_mb}m.bin", lambda p: p.write_bytes(os.urandom(cfg.copy_mb * MiB)))
    start = time.monotonic()
    subprocess.run(["cp", src, side.root / "copy.bin"], check=True)
    subprocess.run(["sync", "-f", side.root / "copy.bin"], check=True)
    return Measure(cfg.copy_mb / (time.monotonic() - start), "MiB/s")


#: cold scans per side, median reported: the local disk's own cold scan ranged from
#: 570 to 2,390 MiB/s between runs on the 2-vCPU VM (its host caches what the
#: guest drops), so one scan made the ratio a lottery
SCAN_RUNS = 3


def cold_scan(side: Side, cfg: Config) -> Measure:
    """Full table scan reading every page, with cold caches (fresh daemon, page cache dropped): MiB/s.

    The database is built once on the local disk (cached between runs) and copied
    in with cp: the same bytes on both sides, and no time spent building it again.
    """
    return _cold_query(side, cfg, "scan", build_scan_db, "SELECT count(*), sum(length(v)) FROM t", cfg.scan_mb * 1024)


def cold_count(side: Side, cfg: Config) -> Measure:
    """``SELECT count(*)`` of a table whose rows are bigger than a page, cold: MiB of the
    database per second. It reads the table's b-tree pages only, about one page in five,
    scattered between the rows' overflow pages: no sequential read-ahead helps it."""
    return _cold_query(side, cfg, "count", build_count_db, "SELECT count(*), 0 FROM t", _count_rows(cfg.scan_mb))


def _cold_query(side: Side, cfg: Config, name: str, build: Callable[..., None], query: str, rows: int) -> Measure:
    src = cached_file(f"{name}-{cfg.scan_mb}m.sqlite", functools.partial(build, mb=cfg.scan_mb))
    dst = side.root / f"{name}.sqlite"
    subprocess.run(["cp", src, dst], check=True)
    speeds, notes = [], set()
    for _ in range(SCAN_RUNS):
        notes.add(side.make_cold())
        start = time.monotonic()
        db = sqlite3.connect(dst)
        seen, _ = db.execute(query).fetchone()
        db.close()
        elapsed = time.monotonic() - start
        if seen != rows:
            raise RuntimeError(f"{name} saw {seen} rows, expected {rows}")
        speeds.append(dst.stat().st_size / MiB / elapsed)
    runs = ", ".join(f"{v:.0f}" for v in speeds)
    return Measure(sorted(speeds)[len(speeds) // 2], "MiB/s", note=f"{'; '.join(sorted(notes))}; median of {runs}")


def _count_rows(mb: int) -> int:
    return mb * 1024 // 10  # rows of 10 KB: two overflow pages each, beside a share of a leaf page


def build_count_db(path: Path, mb: int) -> None:
    """Rows of 10,000 random bytes (4 KiB pages: most of each in overflow pages): about mb MiB."""
    _random_rows(path, _count_rows(mb), 10_000)


def build_scan_db(path: Path, mb: int) -> None:
    """mb*1024 rows of 1000 random bytes (no overflow pages, incompressible): about mb MiB."""
    _random_rows(path, mb * 1024, 1000)


def _random_rows(path: Path, rows: int, size: int) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        db.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?)"
            " INSERT INTO t(v) SELECT randomblob(?) FROM c",
            (rows, size),
        )
    db.close()


def cached_file(name: str, make: Callable[[Path], object]) -> Path:
    """CACHE/name, made by make(tmp path) on first use and renamed into place whole."""
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        make(tmp)
        tmp.rename(path)
    return path


WORKLOADS: dict[str, Workload] = {
    "point_selects": point_selects,
    "small_write_txns": small_write_txns,
    "speedtest1": speedtest1,
    "bulk_copy": bulk_copy,
    "cold_scan": cold_scan,
    "cold_count": cold_count,
}

# Minimum ratio (mount speed / local speed) each workload should reach on the embedded store.
TARGETS: dict[str, float] = {
    "point_selects": 0.8,
    "small_write_txns": 0.5,
    "speedtest1": 0.5,  # total time at most 2x the local disk's
    "cold_scan": 0.3,
}


def fsync_round_trip_us(path: Path, calls: int = 2000, rounds: int = 5) -> float:
    """Median over ``rounds`` of the microseconds one fsync(2) of ``path`` takes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                os.fsync(fd)
            times.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        os.close(fd)
    return sorted(times)[rounds // 2]


def round_trips_by_placement(path: Path, daemon_pid: int) -> str:
    """fsync round trips with this thread and the daemon's main thread (its request
    loop) on one CPU, then on two. Left to itself the scheduler keeps whichever
    placement it started with, so an unpinned figure is either of the two."""
    cpus = sorted(os.sched_getaffinity(0))
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(daemon_pid)
    out = []
    try:
        for label, other in (("same CPU", cpus[0]), ("two CPUs", cpus[-1])):
            if label == "two CPUs" and len(cpus) < 2:
                break
            os.sched_setaffinity(0, {cpus[0]})
            os.sched_setaffinity(daemon_pid, {other})
            out.append(f"{fsync_round_trip_us(path):.1f} us on {label}")
    finally:
        os.sched_setaffinity(0, mine)
        try:
            os.sched_setaffinity(daemon_pid, theirs)
        except ProcessLookupError:
            pass
    return ", ".join(out)


@contextlib.contextmanager
def c_mount(command: list[str], mnt: Path) -> Iterator[tuple[Path, int]]:
    """A C FUSE file system mounted on mnt (command gets mnt appended) for the
    duration; yields (mnt, pid). Unmounted, and its process gone, afterwards."""
    mnt.mkdir()
    proc = subprocess.Popen([*command, str(mnt)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{Path(command[0]).name} did not mount")
            time.sleep(0.02)
        yield mnt, proc.pid
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def fuse_round_trips(work: Path, daemon: Daemon) -> str:
    """The cost of one FUSE request: an fsync that does no work, answered by a C file
    system on libfuse's own loop (bench/fuse_floor.c: the floor any FUSE file system
    pays here) and by the mount (a journal's fsync: in memory, no store call)."""
    assert daemon.proc is not None
    (daemon.mountpoint / "round_trip").mkdir()
    ours = round_trips_by_placement(daemon.mountpoint / "round_trip" / "x.db-journal", daemon.proc.pid)
    binary = CACHE / "fuse_floor"
    source = Path(__file__).with_name("fuse_floor.c")
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                               check=True).stdout.split()
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source), *flags], capture_output=True, text=True,
                       check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", "") or str(e)).strip().splitlines()[-1:]
        return f"fusesqlite {ours}; C floor not measured (cannot build {source.name}: {' '.join(why)})"
    try:
        with c_mount([str(binary), "-f"], work / "floor") as (floor_mnt, pid):
            floor = round_trips_by_placement(floor_mnt / "f", pid)
    except RuntimeError as e:
        return f"fusesqlite {ours}; C floor not measured ({e})"
    return f"C floor (bench/fuse_floor.c) {floor}; fusesqlite {ours}"


def drop_page_cache() -> str:
    """Write dirty pages and drop the OS page cache, so reads come from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"OS page cache NOT dropped ({e.strerror})"
    return "OS page cache dropped"


class Daemon:
    """A fusesqlite mount in its own process, for measuring; restartable on the same store."""

    def __init__(self, work: Path, source: Path = REPO, extra_args: tuple[str, ...] = (),
                 cpus: frozenset[int] | None = None, name: str = "mnt", scrape: bool = False) -> None:
        self.source = source  # the checkout whose fusesqlite package is run
        self.extra_args = extra_args  # more `fusesqlite mount` options
        #: serve metrics (`--metrics`, a free port each start) and scrape them every SCRAPE_EVERY
        self.scrape = scrape
        self.scrapes = 0
        self.cpus = cpus  # the daemon's CPU affinity (as taskset sets it), None: the machine's
        self.mountpoint = work / name
        self.mountpoint.mkdir()
        suffix = "" if name == "mnt" else f"-{name}"
        self.store = work / f"store{suffix}"
        self.log_path = work / f"daemon{suffix}.log"
        self.peak_mib = 0.0  # over all processes (restarts)
        self.window_peak_mib = 0.0  # since reset_peak, over processes
        self.proc_cpu_s = 0.0  # of the current process
        self.past_cpu_s = 0.0  # of earlier processes
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.past_cpu_s += self.proc_cpu_s
        self.proc_cpu_s = 0.0
        metrics: list[str] = []
        if self.scrape:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                metrics = ["--metrics", str(s.getsockname()[1])]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fusesqlite", "mount", str(self.mountpoint), "--store", str(self.store),
                 *self.extra_args, *metrics],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.source,
                preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
            )
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise SystemExit(f"fusesqlite (from {self.source}) did not mount: {' '.join(tail)}")
            time.sleep(0.05)
        if metrics:
            threading.Thread(target=self._scrape, args=(self.proc, int(metrics[1])), daemon=True).start()

    def _scrape(self, proc: subprocess.Popen[bytes], port: int) -> None:
        """What Prometheus does, more often than its default 15 s: GET /metrics every SCRAPE_EVERY."""
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                pass  # stopping
            time.sleep(SCRAPE_EVERY)

    def usage(self) -> tuple[float, float]:
        """(peak RSS in MiB, CPU seconds) of the daemon so far, over all its processes.

        A process that died takes its CPU seconds since the last call with it.
        """
        if self.alive():
            assert self.proc is not None
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.proc_cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            self.peak_mib = max(self.peak_mib, hwm / 1024)
            self.window_peak_mib = max(self.window_peak_mib, hwm / 1024)
        return self.peak_mib, self.past_cpu_s + self.proc_cpu_s

    def reset_peak(self) -> None:
        """Start a new window_peak_mib (clear_refs 5 resets VmHWM); peak_mib stays the overall peak."""
        self.usage()
        if self.alive():
            assert self.proc is not None
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5\n")
        self.window_peak_mib = 0.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def recover(self) -> None:
        """Mount again after the daemon died, so later workloads still run."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        self.start()

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def problems_since(self, offset: int) -> list[str]:
        """WARNING/ERROR/CRITICAL lines and tracebacks the daemon logged after offset."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines()
                if any(w in line for w in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback", "Error:"))]

    def restart(self) -> str:
        """Stop and mount again: a fresh process, so every cache of the daemon and the kernel's is cold."""
        self.usage()
        code = self.stop()
        if code != 0:
            raise RuntimeError(f"daemon exited {code} on SIGTERM; see {self.log_path}")
        note = drop_page_cache()
        self.start()
        return f"daemon restarted, {note}"

    def stop(self) -> int | None:
        """SIGTERM (finishes commits, unmounts); returns the exit code, None if it had to be killed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
            return None


@dataclass
class Row:
    """One workload's outcome on both sides, as printed and written to --json."""

    workload: str
    unit: str = ""
    local: float | None = None
    mount: float | None = None
    ratio: float | None = None
    target: float | None = None
    met: bool | None = None
    mount_cpu_s: float | None = None
    mount_peak_rss_mib: float | None = None
    mount_cpu_ms_per_txn: float | None = None
    c_passthrough: float | None = None  # the same workload on libfuse's C pass-through (C_PASSTHROUGH_WORKLOADS)
    one_cpu: float | None = None  # the same with the app and a mount of its own on one CPU (ONE_CPU_WORKLOADS)
    notes: list[str] = field(default_factory=list)
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> seconds per step, if it has steps


def run_workload(name: str, local: Side, mount: Side, daemon: Daemon, cfg: Config) -> Row:
    """Local disk first, then the mount; failures become notes, never end the run."""
    row = Row(name, target=TARGETS.get(name))
    fn = WORKLOADS[name]
    results: dict[str, Measure] = {}
    for side in (local, mount):
        (side.root / name).mkdir()
        here = Side(side.name, side.root / name, side.make_cold)
        offset, (_, cpu0) = daemon.log_size(), daemon.usage()
        if side is mount:
            daemon.reset_peak()
        try:
            results[side.name] = m = fn(here, cfg)
            if m.note:
                row.notes.append(f"{side.name}: {m.note}")
        except Skip as e:
            row.notes.append(f"skipped: {e}")
            return row
        except Exception as e:  # noqa: BLE001 - a failing workload is a finding to report
            row.notes.append(f"{side.name} FAILED: {type(e).__name__}: {e}")
            row.steps[side.name] = getattr(e, "parts", {})
        else:
            row.steps[side.name] = results[side.name].parts
        if side is mount:
            row.mount_cpu_s = daemon.usage()[1] - cpu0
            row.mount_peak_rss_mib = daemon.window_peak_mib
            row.notes += [f"daemon: {line}" for line in daemon.problems_since(offset)]
            if not daemon.alive():
                row.notes.append(f"daemon DIED (exit {daemon.proc.returncode}); mounted again")
                daemon.recover()
    if "local" in results:
        row.local, row.unit = results["local"].value, results["local"].unit
    if "mount" in results:
        m = results["mount"]
        row.mount, row.unit = m.value, m.unit
        if m.txns and row.mount_cpu_s is not None:
            row.mount_cpu_ms_per_txn = 1000 * row.mount_cpu_s / m.txns
        if row.local:
            row.ratio = m.value / row.local if m.higher_is_better else row.local / m.value
    if row.steps.get("local") and row.steps.get("mount"):
        row.notes.append(compare_steps(row.steps["local"], row.steps["mount"]))
    if row.target is not None:
        row.met = row.ratio is not None and row.ratio >= row.target
    if name in C_PASSTHROUGH_WORKLOADS:
        on_c_passthrough(row, fn, local.root.parent, cfg)
    if name in ONE_CPU_WORKLOADS:
        on_one_cpu(row, fn, local.root.parent, daemon, cfg)
    return row


#: workloads also run with the application and a mount of its own pinned to one CPU
#: (`taskset -c N` on both, as README's "Small transactions on one CPU" advises):
#: this VM pays ~15 us per wake-up of an idle CPU, and there the mount commits
#: small transactions on its event loop (docs/decisions/2026-11-24-commit-on-a-worker-thread.md)
ONE_CPU_WORKLOADS = {"small_write_txns"}


def on_one_cpu(row: Row, fn: Workload, work: Path, daemon: Daemon, cfg: Config) -> None:
    """Run the workload on a second mount pinned to the last CPU, from this process pinned
    there too; compared with the local disk's unpinned run (its best). Becomes a note."""
    cpus = os.sched_getaffinity(0)
    cpu = max(cpus)
    if len(cpus) < 2:
        row.notes.append("one-CPU run: not measured (this process has one CPU already)")
        return
    pinned = Daemon(work, daemon.source, daemon.extra_args, cpus=frozenset({cpu}), name="mnt-one-cpu",
                    scrape=daemon.scrape)
    try:
        (pinned.mountpoint / "w").mkdir()
        os.sched_setaffinity(0, {cpu})
        try:
            m = fn(Side("one-cpu", pinned.mountpoint / "w", pinned.restart), cfg)
        finally:
            os.sched_setaffinity(0, cpus)
    except (RuntimeError, OSError, sqlite3.Error) as e:
        row.notes.append(f"one-CPU run FAILED: {type(e).__name__}: {e}")
        return
    finally:
        pinned.stop()
    row.one_cpu = m.value
    note = f"app and mount both on CPU {cpu} (taskset -c {cpu}): {fmt(m.value)} {m.unit}"
    if row.local:
        note += f", {m.value / row.local:.2f}x the local disk (unpinned)"
    row.notes.append(note)


#: workloads also run on libfuse's C pass-through file system, the yardstick for what
#: any FUSE file system reaches on this machine: it forwards each request to a local
#: directory, no store, no journal handling, kernel caches as fusesqlite has them
C_PASSTHROUGH_WORKLOADS = {"small_write_txns"}
C_PASSTHROUGH_OPTIONS = "writeback,cache=always,timeout=1"


def on_c_passthrough(row: Row, fn: Workload, work: Path, cfg: Config) -> None:
    """Run the workload on bench/build_passthrough_ll.sh's binary; the outcome becomes a note."""
    try:
        binary = built_binary("build_passthrough_ll.sh", "libfuse's passthrough_ll")
        (work / "c-passthrough-source").mkdir()
        with c_mount([str(binary), "-f", "-o", f"source={work / 'c-passthrough-source'},{C_PASSTHROUGH_OPTIONS}"],
                     work / "c-passthrough") as (mnt, _):
            m = fn(Side("c-passthrough", mnt, lambda: ""), cfg)
    except (Skip, RuntimeError, OSError, sqlite3.Error) as e:
        row.notes.append(f"C pass-through not measured: {e}")
        return
    row.c_passthrough = m.value
    parts = [f"libfuse's C pass-through (example/passthrough_ll -o {C_PASSTHROUGH_OPTIONS}, no store): "
             f"{fmt(m.value)} {m.unit}"]
    if row.local:
        parts.append(f"{m.value / row.local:.2f}x the local disk")
    if row.mount:
        parts.append(f"the mount does {row.mount / m.value:.2f}x of it")
    row.notes.append(", ".join(parts))


def compare_steps(local: dict[str, float], mount: dict[str, float]) -> str:
    """Total time over the steps both sides completed, and the steps where the mount lags most."""
    common = [k for k in local if k in mount]
    if not common:
        return "no step completed on both sides"
    lt, mt = sum(local[k] for k in common), sum(mount[k] for k in common)
    worst = sorted(common, key=lambda k: mount[k] - local[k], reverse=True)[:3]
    return (f"steps done on both sides: {len(common)} ({common[0]} .. {common[-1]}), local {lt:.2f} s,"
            f" mount {mt:.2f} s, ratio {lt / mt:.2f}x; most time lost: "
            + "; ".join(f"{k} ({local[k]:.2f} s vs {mount[k]:.2f} s)" for k in worst))


def fmt(x: float | None) -> str:
    """One decimal for big numbers, two for small ones (seconds of a quick run)."""
    return "-" if x is None else format(x, ".1f" if abs(x) >= 10 else ".2f")


def print_summary(rows: list[Row], peak_mib: float, cpu_s: float) -> None:
    head = (f"{'workload':<18} {'local':>10} {'mount':>10}  {'unit':<10} {'ratio':>6}  {'target':>6}  {'met?':<4}"
            f"  {'RSS MiB':>7} {'CPU s':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        target = "-" if r.target is None else f">={r.target:.1f}x"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        rss = "-" if r.mount_peak_rss_mib is None else f"{r.mount_peak_rss_mib:.0f}"
        print(f"{r.workload:<18} {fmt(r.local):>10} {fmt(r.mount):>10}  {r.unit:<10} {ratio:>6}  {target:>6}  {met:<4}"
              f"  {rss:>7} {fmt(r.mount_cpu_s):>6}")
    print(f"daemon, whole run: peak RSS {peak_mib:.0f} MiB, CPU {cpu_s:.1f} s", end="")
    print("".join(f"; {r.mount_cpu_ms_per_txn:.2f} ms CPU per transaction ({r.workload})"
                  for r in rows if r.mount_cpu_ms_per_txn is not None))
    print("ratio: mount speed / local speed (speedtest1: local time / mount time), higher is better;"
          " RSS, CPU: the daemon's peak RSS and CPU seconds during the workload's mount run")
    for r in rows:
        for note in r.notes:
            print(f"  {r.workload}: {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, ~1 s per workload: a smoke test")
    ap.add_argument("--seconds", type=float, help="duration of each timed loop (default 5, quick 1)")
    ap.add_argument("--scan-mb", type=int, help="cold_scan database size in MiB (default 200, quick 16)")
    ap.add_argument("--speedtest-size", type=int, help="speedtest1 --size (default 200, quick 10)")
    ap.add_argument("--only", nargs="+", choices=list(WORKLOADS), metavar="NAME",
                    help=f"run only these workloads ({', '.join(WORKLOADS)})")
    ap.add_argument("--source", type=Path, default=REPO, metavar="DIR",
                    help="run the daemon from this checkout's fusesqlite package (default: this repo)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--mount-args", default="", metavar="ARGS",
                    help="more `fusesqlite mount` options, e.g. --mount-args=--no-writeback-cache")
    ap.add_argument("--metrics", action="store_true",
                    help="serve Prometheus metrics from every daemon (mount --metrics) and scrape them every second")
    ap.add_argument("--simulate", metavar="SPEC",
                    help="the mount's store behind a simulated FoundationDB cluster (`fusesqlite mount --simulate`), "
                    "e.g. latency_ms=1,commit_ms=4")
    args = ap.parse_args()
    mount_args = shlex.split(args.mount_args) + (["--simulate", args.simulate] if args.simulate else [])
    cfg = QUICK if args.quick else Config()
    overrides = {"seconds": args.seconds, "scan_mb": args.scan_mb, "speedtest_size": args.speedtest_size}
    cfg = Config(**{**asdict(cfg), **{k: v for k, v in overrides.items() if v is not None}})
    names = [n for n in WORKLOADS if n in (args.only or WORKLOADS)]

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fusesqlite-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "local").mkdir()
        daemon = Daemon(work, args.source.resolve(), tuple(mount_args), scrape=args.metrics)
        local = Side("local", work / "local", drop_page_cache)
        mount = Side("mount", daemon.mountpoint, daemon.restart)
        try:
            print(f"{cfg}; local disk: {work / 'local'}; mount options: {shlex.join(mount_args) or '(defaults)'}"
                  + ("; --metrics, scraped every second" if args.metrics else ""), flush=True)
            round_trip = fuse_round_trips(work, daemon)
            print(f"FUSE round trip (fsync doing no work): {round_trip}", flush=True)
            for name in names:
                started = time.monotonic()
                row = run_workload(name, local, mount, daemon, cfg)
                rows.append(row)
                print(f"{name:<18} {fmt(row.local):>10} {fmt(row.mount):>10}  {row.unit:<10}"
                      f" ({time.monotonic() - started:.0f} s)", flush=True)
            peak_mib, cpu_s = daemon.usage()
        finally:
            code = daemon.stop()
            CACHE.mkdir(parents=True, exist_ok=True)
            shutil.copy(daemon.log_path, CACHE / "last-daemon.log")
    print_summary(rows, peak_mib, cpu_s)
    print(f"FUSE round trip (fsync doing no work, median of 5 x 2000): {round_trip}")
    print(f"daemon log: {CACHE / 'last-daemon.log'}" + ("" if code == 0 else f"  (daemon exit on SIGTERM: {code})"))
    if args.metrics:
        print(f"metrics: {daemon.scrapes} scrapes of the main daemon's /metrics")
    if args.json:
        args.json.write_text(json.dumps({
            "config": asdict(cfg),
            "mount_args": mount_args,
            "fuse_round_trip": round_trip,
            "daemon": {"peak_rss_mib": peak_mib, "cpu_s": cpu_s, "exit_code": code},
            "workloads": [asdict(r) for r in rows],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
