"""Many mounts of one store: commit-to-visibility latency and commits/s with one and two writing mounts.

    python3 bench/many_mounts.py [--quick] [--commits N] [--interval-ms MS] [--seconds S] [--source DIR]
                                 [--mount-args "OPTIONS"]

Two mounts, A and B, of one embedded store directory (same volume), as two hosts
sharing one FoundationDB cluster would be; the local disk (the file system
holding the store) is the reference, measured in the same run.

latency: a writer thread commits `UPDATE t SET seq=?` (autocommit) every
--interval-ms, a reader thread in the same process polls `SELECT seq FROM t`
(autocommit, a new read transaction each time) as fast as it can and records
when each seq first becomes visible. Both use time.monotonic, in one process.
Latency is from the writer's COMMIT returning to the reader first seeing that seq
(or a later one). Measured with the reader on the local disk, on the writer's
own mount A, and on the other mount B.

commits/s: processes doing `UPDATE c SET n = n + 1` in autocommit (busy_timeout
5 s, and any error retried) for --seconds: one process; two processes on one
mount (or the local disk); one process on A and one on B. Failed attempts are
counted (each is retried), and the counter is checked against the commits that
reported success. --quick: a smoke run of about 10 s.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shlex
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import install_signal_handlers, start_daemon, start_watchdog, stop_daemons  # noqa: E402
from run import CACHE, REPO, Daemon, Row, fmt, print_summary  # noqa: E402

LATENCY_TARGET_MS = 1000.0
LATENCY_AIM_MS = 100.0


# -- commit-to-visibility latency ---------------------------------------------------------


@dataclass
class Latency:
    where: str
    commits: int = 0
    seen: int = 0  # seqs the reader saw (directly or by a later one)
    skipped: int = 0  # seqs the reader never saw themselves, only a later one
    latencies_ms: list[float] = field(default_factory=list)
    polls: int = 0
    poll_s: float = 0.0
    reader_errors: Counter = field(default_factory=Counter)
    writer_errors: Counter = field(default_factory=Counter)
    writer_commit_ms: list[float] = field(default_factory=list)


def measure_latency(where: str, write_path: Path, read_path: Path, commits: int, interval_s: float) -> Latency:
    """Writer thread on write_path, reader thread on read_path (another mount's name for the same file)."""
    w = sqlite3.connect(write_path, isolation_level=None, timeout=5, check_same_thread=False)
    w.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, seq INTEGER, ts REAL)")
    w.execute("INSERT OR REPLACE INTO t VALUES (1, 0, 0)")
    wait_visible(read_path, "SELECT seq FROM t WHERE id=1", 0)

    r = sqlite3.connect(read_path, isolation_level=None, timeout=5, check_same_thread=False)
    res = Latency(where, commits=commits)
    committed = [0.0] * (commits + 1)  # monotonic time COMMIT returned, per seq
    first_seen = [0.0] * (commits + 1)
    observed: set[int] = set()
    done = threading.Event()

    def writer() -> None:
        next_at = time.monotonic()
        for seq in range(1, commits + 1):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval_s
            while True:
                t0 = time.monotonic()
                try:
                    w.execute("UPDATE t SET seq=?, ts=? WHERE id=1", (seq, time.time()))
                except sqlite3.Error as e:
                    res.writer_errors[str(e)] += 1
                    if sum(res.writer_errors.values()) >= 1000:
                        return  # give up (a dead mount): the commits left count as not seen
                    continue
                committed[seq] = time.monotonic()
                res.writer_commit_ms.append(1000 * (committed[seq] - t0))
                break

    def reader() -> None:
        last = 0
        start = time.monotonic()
        while last < commits and not done.is_set():
            try:
                row = r.execute("SELECT seq FROM t WHERE id=1").fetchone()
            except sqlite3.Error as e:
                res.reader_errors[str(e)] += 1
                continue
            now = time.monotonic()
            res.polls += 1
            seq = row[0]
            if seq > last:
                observed.add(seq)
                for s in range(last + 1, seq + 1):
                    first_seen[s] = now
                last = seq
        res.poll_s = time.monotonic() - start

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    threads[1].join()
    threads[0].join(timeout=10)  # the last commit has 10 s to become visible
    done.set()
    threads[0].join()
    w.close()
    r.close()
    for seq in range(1, commits + 1):
        if first_seen[seq] and committed[seq]:
            res.seen += 1
            res.skipped += seq not in observed
            res.latencies_ms.append(1000 * (first_seen[seq] - committed[seq]))
    return res


def wait_visible(path: Path, query: str, expect: object, timeout: float = 10.0) -> None:
    """Wait until query on path returns expect (a file created on one mount, seen from another)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)  # never create it here
            try:
                row = db.execute(query).fetchone()  # None: the table is there, its row not yet
                last = row[0] if row else None
            finally:
                db.close()
            if last == expect:
                return
        except sqlite3.Error as e:
            last = e
        time.sleep(0.01)
    raise RuntimeError(f"{path}: {query} gave {last!r}, not {expect!r}, after {timeout:.0f} s; {describe(path)}")


def describe(path: Path) -> str:
    """What this mount shows of the file: inode, size, header."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as e:
        return f"stat/read: {e}"
    counter = int.from_bytes(head[24:28], "big") if len(head) >= 28 else None
    return (f"ino {st.st_ino} size {st.st_size} mtime {st.st_mtime:.3f},"
            f" header {head[:15]!r} change counter {counter}")


def pct(values: list[float], q: float) -> float:
    """q-th percentile, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def print_latency(results: list[Latency], interval_ms: float) -> None:
    print(f"\ncommit-to-visibility latency, ms (writer commits every {interval_ms:g} ms; reader polls in autocommit)")
    cols = [r.where for r in results]
    head = f"{'':<26}" + "".join(f"{c:>16}" for c in cols)
    print(head + "\n" + "-" * len(head))

    def line(label: str, values: list[str]) -> None:
        print(f"{label:<26}" + "".join(f"{v:>16}" for v in values))

    def stat(fn) -> list[str]:
        return [fmt(fn(r.latencies_ms)) if r.latencies_ms else "-" for r in results]

    line("commits", [str(r.commits) for r in results])
    line("seen by reader", [str(r.seen) for r in results])
    line("  only via a later seq", [str(r.skipped) for r in results])
    line("median", stat(statistics.median))
    line("p90", stat(lambda v: pct(v, 90)))
    line("p99", stat(lambda v: pct(v, 99)))
    line("max", stat(max))
    line("min", stat(min))
    line("writer COMMIT median", [fmt(statistics.median(r.writer_commit_ms)) if r.writer_commit_ms else "-"
                                  for r in results])
    line("reader polls/s", [fmt(r.polls / r.poll_s) if r.poll_s else "-" for r in results])
    line("reader errors", [str(sum(r.reader_errors.values())) for r in results])
    line("writer errors (retried)", [str(sum(r.writer_errors.values())) for r in results])
    for r in results:
        worst = max(r.latencies_ms) if r.latencies_ms else None
        verdict = ("NOT ALL SEEN" if r.seen < r.commits else
                   "target met" + (" and aim met" if worst is not None and pct(r.latencies_ms, 90) <= LATENCY_AIM_MS
                                   else ", aim (p90 <= 100 ms) missed")
                   if worst is not None and worst <= LATENCY_TARGET_MS else "TARGET (max <= 1 s) MISSED")
        print(f"  {r.where}: {verdict}")
        for msg, n in r.reader_errors.most_common():
            print(f"  {r.where}: reader error x{n}: {msg}")
        for msg, n in r.writer_errors.most_common():
            print(f"  {r.where}: writer error x{n}: {msg}")


# -- commits per second ---------------------------------------------------------------------


def increment_worker(label: str, path: str, start_at: float, seconds: float, out) -> None:
    """In its own process: autocommit increments until start_at + seconds; any error is counted and retried."""
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, timeout=5)
    ok, errors, commit_ms = 0, Counter(), []
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    deadline = start_at + seconds
    while (t0 := time.monotonic()) < deadline:
        try:
            db.execute("UPDATE c SET n = n + 1 WHERE id = 1")
        except sqlite3.Error as e:
            errors[str(e)] += 1
            continue
        ok += 1
        commit_ms.append(1000 * (time.monotonic() - t0))
    elapsed = time.monotonic() - start_at
    db.close()
    commit_ms.sort()
    out.put((label, ok, dict(errors), elapsed, commit_ms[len(commit_ms) // 2] if commit_ms else 0.0,
             commit_ms[-1] if commit_ms else 0.0))


@dataclass
class Throughput:
    commits: int
    rate: float  # commits/s, all processes together
    errors: Counter
    per_process: list[str]
    counter_note: str


def measure_throughput(create_path: Path, workers: list[tuple[str, Path]], seconds: float) -> Throughput:
    """One process per (label, path) of workers (names of one database on the local disk or on mounts)."""
    worker_paths = [p for _, p in workers]
    db = sqlite3.connect(create_path, isolation_level=None, timeout=5)
    db.execute("CREATE TABLE c(id INTEGER PRIMARY KEY, n INTEGER)")
    db.execute("INSERT INTO c VALUES (1, 0)")
    db.close()
    for p in set(worker_paths):  # created on the first: wait till the others see it
        try:
            wait_visible(p, "SELECT n FROM c WHERE id=1", 0)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; where it was created: {describe(create_path)}") from None
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.monotonic() + 1.0  # time for the processes to start
    procs = [ctx.Process(target=increment_worker, args=(label, str(p), start_at, seconds, out))
             for label, p in workers]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    total = sum(r[1] for r in results)
    errors: Counter = Counter()
    for r in results:
        errors.update(r[2])
    elapsed = max(r[3] for r in results)
    per_process = [f"{r[0]}: {r[1]} commits, {sum(r[2].values())} retried,"
                   f" COMMIT median {r[4]:.1f} ms max {r[5]:.0f} ms" for r in results]
    # the counter, as seen on each worker path once the last commit arrived there
    notes = []
    for p, label in {p: label for label, p in workers}.items():
        try:
            wait_visible(p, "SELECT n FROM c WHERE id=1", total, timeout=5)
            notes.append(f"ok on {label}")
        except RuntimeError as e:
            notes.append(f"COUNTER MISMATCH ({e}; commits that reported success: {total})")
    return Throughput(total, total / elapsed, errors, per_process, "counter = successful commits: " + ", ".join(notes))


def write_refusals(log_path: Path, offset: int) -> list[str]:
    """The causes of the event=write_refused lines a daemon logged after offset, numbers blanked."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [re.sub(r"\d[\d.:a-f]*", "N", line.split("cause=", 1)[-1])
            for line in text.splitlines() if "event=write_refused" in line]


# -- the run ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~10 s smoke run (50 commits, 1 s loops)")
    ap.add_argument("--commits", type=int, help="latency: commits (default 200, quick 50)")
    ap.add_argument("--interval-ms", type=float, default=20.0, help="latency: time between commits (default 20)")
    ap.add_argument("--seconds", type=float, help="commits/s: duration of each loop (default 5, quick 1)")
    ap.add_argument("--timeout", type=float, default=900, help="kill the mounts and stop after this many seconds")
    ap.add_argument("--source", type=Path, default=REPO, metavar="DIR",
                    help="run the daemons from this checkout's fusesqlite package (default: this repo)")
    ap.add_argument("--mount-args", default="", metavar="OPTIONS",
                    help='more `fusesqlite mount` options for both mounts, e.g. "--watch-limit 0"')
    args = ap.parse_args()
    mount_args = tuple(shlex.split(args.mount_args))
    commits = args.commits or (50 if args.quick else 200)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    install_signal_handlers()
    sys.setswitchinterval(0.0005)  # the writer and reader threads share the GIL: keep hand-overs short

    daemons: list[Daemon] = []
    stop_notes: list[str] = []
    problems: list[str] = []
    latencies: list[Latency] = []
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fusesqlite-many-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        local = work / "local"
        local.mkdir()
        watchdog = start_watchdog(args.timeout, daemons)
        try:
            a = start_daemon(work / "A", args.source.resolve(), daemons, extra_args=mount_args)
            b = start_daemon(work / "B", args.source.resolve(), daemons, store=a.store, extra_args=mount_args)
            A, B = a.mountpoint, b.mountpoint
            print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", flush=True)
            print(f"mounts: A={A} B={B} (store {a.store}); local disk: {local}; "
                  f"latency {commits} commits every {args.interval_ms:g} ms; commits/s loops {seconds:g} s", flush=True)
            offsets = [d.log_size() for d in daemons]

            interval = args.interval_ms / 1000
            for where, wdir, rdir, name in (("local", local, local, "lat-local"),
                                            ("same mount A>A", A, A, "lat-same"),
                                            ("other mount A>B", A, B, "lat-other")):
                t0 = time.monotonic()
                try:
                    res = measure_latency(where, wdir / f"{name}.sqlite", rdir / f"{name}.sqlite", commits, interval)
                except Exception as e:  # noqa: BLE001 - a finding; the rest still runs
                    problems.append(f"latency {where} FAILED: {type(e).__name__}: {e}")
                    print(problems[-1], flush=True)
                    continue
                latencies.append(res)
                med = statistics.median(res.latencies_ms) if res.latencies_ms else None
                print(f"latency {where:<16} median {fmt(med)} ms, max "
                      f"{fmt(max(res.latencies_ms) if res.latencies_ms else None)} ms, seen {res.seen}/{commits}"
                      f" ({time.monotonic() - t0:.0f} s)", flush=True)

            scenarios = {
                "local x1": (local / "n-l1.sqlite", [("local", local)]),
                "local x2": (local / "n-l2.sqlite", [("local#1", local), ("local#2", local)]),
                "A x1": (A / "n-a1.sqlite", [("A", A)]),
                "B x1": (A / "n-b1.sqlite", [("B", B)]),
                "A x2": (A / "n-a2.sqlite", [("A#1", A), ("A#2", A)]),
                "A+B": (A / "n-ab.sqlite", [("A", A), ("B", B)]),
            }
            tp: dict[str, Throughput] = {}
            usage: dict[str, tuple[float, float]] = {}  # scenario -> (peak RSS MiB, CPU s) over both daemons
            refused: dict[str, Counter] = {}
            failed: dict[str, str] = {}
            for name, (db, sides) in scenarios.items():
                t0 = time.monotonic()
                log_at = [d.log_size() for d in daemons]
                cpu0 = sum(d.usage()[1] for d in daemons)
                for d in daemons:
                    d.reset_peak()
                try:
                    tp[name] = measure_throughput(db, [(label, s / db.name) for label, s in sides], seconds)
                except Exception as e:  # noqa: BLE001 - a failing scenario is a finding; the others still run
                    failed[name] = f"{type(e).__name__}: {e}"
                    print(f"commits/s {name:<9} FAILED: {failed[name]}", flush=True)
                    continue
                cpu1 = sum(d.usage()[1] for d in daemons)  # usage() also updates window_peak_mib
                usage[name] = (max(d.window_peak_mib for d in daemons), cpu1 - cpu0)
                refused[name] = Counter()
                for dname, d, off in zip("AB", daemons, log_at):
                    refused[name].update(f"daemon {dname}: {c}" for c in write_refusals(d.log_path, off))
                print(f"commits/s {name:<9} {fmt(tp[name].rate):>8}  ({tp[name].commits} commits,"
                      f" {sum(tp[name].errors.values())} retried; {time.monotonic() - t0:.0f} s)", flush=True)

            for label, lname, mname in (("1 writer", "local x1", "A x1"),
                                        ("1 writer (on B)", "local x1", "B x1"),
                                        ("2 writers, 1 mount", "local x2", "A x2"),
                                        ("2 writing mounts", "local x2", "A+B")):
                lt, mt = tp.get(lname), tp.get(mname)
                row = Row(label, unit="commits/s", local=lt and lt.rate, mount=mt and mt.rate,
                          ratio=lt and mt and mt.rate / lt.rate)
                row.notes += [f"{side} ({n}) FAILED: {failed[n]}" for side, n in (("local", lname), ("mount", mname))
                              if n in failed]
                if mt is not None:
                    row.mount_peak_rss_mib, row.mount_cpu_s = usage[mname]
                    row.mount_cpu_ms_per_txn = 1000 * row.mount_cpu_s / mt.commits if mt.commits else None
                for side, t, n in (("local", lt, lname), ("mount", mt, mname)):
                    if t is None:
                        continue
                    row.notes.append(f"{side} ({n}): {t.commits} commits, {sum(t.errors.values())} failed and retried;"
                                     f" {t.counter_note}")
                    row.notes += [f"{side} ({n}):   {p}" for p in t.per_process]
                    row.notes += [f"{side} ({n}):   error x{k}: {msg}" for msg, k in t.errors.most_common()]
                row.notes += [f"mount ({mname}): {k} event=write_refused: {c}" for c, k in refused.get(mname, Counter()).most_common()]
                rows.append(row)
            for name, d, off in zip("AB", daemons, offsets):
                problems += [f"daemon {name}: {line}" for line in d.problems_since(off)]
                if not d.alive():
                    problems.append(f"daemon {name} DIED (exit {d.proc.returncode})")
            print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
            peak = max(d.usage()[0] for d in daemons)
            cpu = sum(d.usage()[1] for d in daemons)
        finally:
            watchdog.cancel()
            stop_notes = stop_daemons(daemons, "AB")
            CACHE.mkdir(parents=True, exist_ok=True)
            for name, d in zip("AB", daemons):
                if getattr(d, "log_path", None) and d.log_path.exists():
                    shutil.copy(d.log_path, CACHE / f"many-mounts-{name}.log")

    print_latency(latencies, args.interval_ms)
    print("\ncommits per second: autocommit `UPDATE c SET n = n + 1`, busy_timeout 5 s, errors retried"
          f" ({seconds:g} s each); 'local' is the same number of processes on the local disk")
    print_summary(rows, peak, cpu)
    print("RSS, CPU: over both daemons (peak of either, CPU summed)")
    for line in problems + stop_notes:
        print(line)
    print(f"daemon logs: {CACHE}/many-mounts-A.log, many-mounts-B.log; total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
