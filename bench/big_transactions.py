"""Transactions without limits: a 1 GB database copied in, and 1 GB SQLite transactions, mount vs local disk.

    python3 bench/big_transactions.py [--size-mb N] [--no-update] [--source DIR]

Each workload runs on the local disk (the file system holding the store), then on
a mount with the default --memory-mb (256), in the same run, through run.py's
run_workload: times, ratio (local time / mount time: 1.0 is parity, 0.25 is 4x
slower) and the daemon's peak RSS (VmHWM, reset before each mount run), which
must stay under the daemon's memory budget.

  import      cp of a SQLite database of --size-mb MiB built on the local disk once
              (cached in /var/tmp/fusesqlite-bench-cache), then sync -f
  insert_txn  one transaction: CREATE TABLE + INSERT INTO t SELECT randomblob(1000)
              ... of --size-mb MiB into a new database (its journal stays tiny)
  update_txn  one transaction: UPDATE t SET v = randomblob(1000) over the imported
              database: every page changes, the rollback journal is --size-mb MiB
              too (--no-update skips it)

After each, untimed, the database is checked (row count and total length).
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from bench_util import install_signal_handlers, start_daemon, start_watchdog, stop_daemons  # noqa: E402
from run import CACHE, REPO, Measure, MiB, Side, build_scan_db, cached_file, fmt, print_summary  # noqa: E402


@dataclass(frozen=True)
class BigConfig:
    size_mb: int = 1024


def check(path: Path, mb: int) -> str:
    """Untimed: every row there, every byte of the values readable (a full scan)."""
    db = sqlite3.connect(path)
    try:
        rows, total = db.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
    finally:
        db.close()
    if (rows, total) != (mb * 1024, mb * 1024 * 1000):
        raise RuntimeError(f"{path.name}: {rows} rows, {total} bytes; expected {mb * 1024}, {mb * 1024 * 1000}")
    return f"{path.name} checked: {rows} rows, {path.stat().st_size / MiB:.0f} MiB"


def source_db(mb: int) -> Path:
    """The database to import: run.py's scan database (shared cache with its cold_scan), rows of 1000 random bytes."""
    return cached_file(f"scan-{mb}m.sqlite", functools.partial(build_scan_db, mb=mb))


def import_db(side: Side, cfg: BigConfig) -> Measure:
    """cp of the database into the directory, then sync -f: seconds."""
    src = source_db(cfg.size_mb)
    dst = side.root / "big.sqlite"
    start = time.monotonic()
    subprocess.run(["cp", src, dst], check=True)
    subprocess.run(["sync", "-f", dst], check=True)
    elapsed = time.monotonic() - start
    return Measure(elapsed, "s", higher_is_better=False,
                   note=f"{src.stat().st_size / MiB:.0f} MiB at {src.stat().st_size / MiB / elapsed:.0f} MiB/s; "
                        + check(dst, cfg.size_mb))


def insert_txn(side: Side, cfg: BigConfig) -> Measure:
    """CREATE TABLE and INSERT ... SELECT randomblob(1000) of size_mb MiB, one transaction: seconds."""
    dst = side.root / "txn.sqlite"
    start = time.monotonic()
    build_scan_db(dst, cfg.size_mb)  # one `with db:` transaction
    elapsed = time.monotonic() - start
    return Measure(elapsed, "s", higher_is_better=False,
                   note=f"{cfg.size_mb / elapsed:.0f} MiB/s; " + check(dst, cfg.size_mb))


def update_txn(side: Side, cfg: BigConfig) -> Measure:
    """UPDATE of every row of the imported database, one transaction (journal of the whole file): seconds."""
    dst = side.root.parent / "import" / "big.sqlite"
    if not dst.exists():
        raise RuntimeError(f"{dst} missing: the import workload failed")
    db = sqlite3.connect(dst)
    start = time.monotonic()
    try:
        with db:
            db.execute("UPDATE t SET v = randomblob(1000)")
    finally:
        db.close()
    elapsed = time.monotonic() - start
    return Measure(elapsed, "s", higher_is_better=False,
                   note=f"{cfg.size_mb / elapsed:.0f} MiB/s; " + check(dst, cfg.size_mb))


WORKLOADS = {"import": import_db, "insert_txn": insert_txn, "update_txn": update_txn}


def default_memory_mb(source: Path) -> int:
    """The mount's default --memory-mb, from the checkout the daemon runs (run.py's Daemon passes no options)."""
    sys.path.insert(0, str(source))
    try:
        from fusesqlite.cli import build_parser
    finally:
        sys.path.remove(str(source))
    return build_parser().parse_args(["mount", "MOUNTPOINT"]).memory_mb


def du_mib(path: Path) -> float:
    r = subprocess.run(["du", "-sm", "--dereference-args", str(path)], capture_output=True, text=True)
    return float(r.stdout.split()[0]) if r.returncode == 0 and r.stdout else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="database and transaction size in MiB (default 1024)")
    ap.add_argument("--no-update", action="store_true", help="skip update_txn")
    ap.add_argument("--timeout", type=float, default=3600, help="kill the mount and stop after this many seconds")
    ap.add_argument("--source", type=Path, default=REPO, metavar="DIR",
                    help="run the daemon from this checkout's fusesqlite package (default: this repo)")
    args = ap.parse_args()
    cfg = BigConfig(args.size_mb)
    names = [n for n in WORKLOADS if not (args.no_update and n == "update_txn")]
    run.WORKLOADS.update(WORKLOADS)  # so run.py's run_workload runs them (in memory: run.py is not changed)
    install_signal_handlers()
    budget_mb = default_memory_mb(args.source.resolve())

    started = time.monotonic()
    t0 = time.monotonic()
    src = source_db(cfg.size_mb)  # before any timing
    print(f"source database {src} ({src.stat().st_size / MiB:.0f} MiB, ready in {time.monotonic() - t0:.0f} s);"
          f" load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", flush=True)

    daemons: list[run.Daemon] = []
    rows: list[run.Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fusesqlite-big-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "local").mkdir()
        watchdog = start_watchdog(args.timeout, daemons)
        try:
            daemon = start_daemon(work / "m", args.source.resolve(), daemons)
            local = Side("local", work / "local", run.drop_page_cache)
            mount = Side("mount", daemon.mountpoint, daemon.restart)
            print(f"size {cfg.size_mb} MiB; mount {daemon.mountpoint} (default --memory-mb {budget_mb});"
                  f" local disk {work / 'local'}", flush=True)
            for name in names:
                t0 = time.monotonic()
                row = run.run_workload(name, local, mount, daemon, cfg)
                rows.append(row)
                print(f"{name:<12} local {fmt(row.local):>8} s  mount {fmt(row.mount):>8} s"
                      f"  peak RSS {fmt(row.mount_peak_rss_mib)} MiB  ({time.monotonic() - t0:.0f} s)", flush=True)
            peak_mib, cpu_s = daemon.usage()
            notes.append(f"store on disk after the run: {du_mib(daemon.store):.0f} MiB"
                         f" (local directory: {du_mib(work / 'local'):.0f} MiB)")
            notes.append(f"load average {os.getloadavg()[0]:.2f}")
        finally:
            watchdog.cancel()
            notes += stop_daemons(daemons, "M")
            if daemons and daemons[0].log_path.exists():
                CACHE.mkdir(parents=True, exist_ok=True)
                shutil.copy(daemons[0].log_path, CACHE / "big-transactions-daemon.log")

    print(f"\n{cfg.size_mb} MiB: times in seconds")
    print_summary(rows, peak_mib, cpu_s)
    print("for these times, ratio = local time / mount time (1/ratio: how many times slower the mount is)")
    over = [r.workload for r in rows if r.mount_peak_rss_mib is not None and r.mount_peak_rss_mib > budget_mb]
    print(f"memory budget (--memory-mb default) {budget_mb} MiB: peak RSS {peak_mib:.0f} MiB over the run; "
          + (f"OVER the budget in: {', '.join(over)}" if over else "under it in every workload"))
    for n in notes:
        print(n)
    print(f"daemon log: {CACHE / 'big-transactions-daemon.log'}; total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
