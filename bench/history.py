"""History and retention: what the store costs, and how fast gc, log, export and import go.

    python3 bench/history.py [--db-mb N] [--txns N] [--log-versions N] [--source DIR]

On one mount of a fresh embedded store (under /var/tmp):

  store/live     a database of --db-mb MiB (1,000-byte random rows), then --txns
                 single-row UPDATE transactions: the store's bytes on disk (store and
                 WAL) per byte of the database, before and after `gc --keep 0s`, and
                 after `gc --keep 0s --vacuum`
  gc             the versions gc removed per second
  export/import  `fusesqlite export` of the database and `fusesqlite import` of a
                 directory holding a copy of it, in MB/s, against `cp` of the same
                 file from and to the mount
  log            `fusesqlite log --json` and `log --limit 20` on a volume of
                 --log-versions versions (made with one small commit each, directly
                 on the store: the log does not care how they were made)

  clone          `fusesqlite clone` of the volume: the command, and the store
                 transaction that makes the clone (its size does not depend on the
                 volume's)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import install_signal_handlers, start_daemon, start_watchdog, stop_daemons  # noqa: E402
from run import REPO, Daemon  # noqa: E402

MB = 1_000_000


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.iterdir() if p.is_file() and p.name.startswith("store.sqlite"))


def cli(source: Path, *args: object) -> tuple[float, str]:
    """Run ``fusesqlite ARGS`` from ``source``; (seconds, stdout). Fails the benchmark on an error."""
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fusesqlite", *map(str, args)], cwd=source, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    took = time.monotonic() - start
    if r.returncode != 0:
        raise SystemExit(f"fusesqlite {' '.join(map(str, args))} failed: {r.stderr.strip()}")
    return took, r.stdout


def timed(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    subprocess.run(["sync"], check=True)
    return time.monotonic() - start


def build(db: Path, mb: int, txns: int) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    rows = mb * 1000
    con.executemany("INSERT INTO t(v) VALUES (randomblob(1000))", ([] for _ in range(rows)))
    con.commit()
    for i in range(txns):
        con.execute("UPDATE t SET v = randomblob(1000) WHERE id = ?", (1 + (i * 7919) % rows,))
        con.commit()
    con.close()


def log_volume(source: Path, store: Path, versions: int) -> None:
    """A volume 'log' with ``versions`` versions, committed directly on the store."""
    code = (
        "import sys\n"
        "from fusesqlite.inodes import ROOT_INO, Inode\n"
        "from fusesqlite.store import open_store\n"
        "from fusesqlite.volume import ChangeSet, Volume\n"
        "v = Volume(open_store(sys.argv[1]), 'log', author='bench:1:log')\n"
        "v.open()\n"
        "ino = v.allocate_inodes(1)[0]\n"
        "f = Inode(mode=0o100644, uid=0, gid=0, nlink=1)\n"
        "v.commit(ChangeSet(inodes={ino: f}, dirents={(ROOT_INO, b'f'): ino}))\n"
        "for i in range(int(sys.argv[2]) - 1):\n"
        "    v.commit(ChangeSet(inodes={ino: f._replace(mtime_ns=i)}))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(store), str(versions)], cwd=source, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db-mb", type=int, default=100, help="database size in MB (default 100)")
    ap.add_argument("--txns", type=int, default=10_000, help="single-row UPDATE transactions (default 10,000)")
    ap.add_argument("--log-versions", type=int, default=100_000, help="versions of the log volume (default 100,000)")
    ap.add_argument("--source", type=Path, default=REPO, help="the checkout whose fusesqlite runs (default: this one)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="fusesqlite-history-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    start_watchdog(3600, daemons)
    results: dict[str, float] = {}
    try:
        d = start_daemon(work / "a", args.source, daemons)
        where = ["--store", d.store]
        db = d.mountpoint / "app.db"
        start = time.monotonic()
        build(db, args.db_mb, args.txns)
        results["build_s"] = time.monotonic() - start
        live = db.stat().st_size
        results["db_mb"] = live / MB
        results["store_per_live_before"] = store_bytes(d.store) / live
        time.sleep(2.5)  # the mount's registration (every 2 s) catches up with its last commit
        took, out = cli(args.source, "gc", *where, "--keep", "0s")
        removed = int(out.split("removed ")[2].split(" record")[0])
        results["gc_s"] = took
        results["gc_versions_per_s"] = removed / took
        results["store_per_live_after_gc"] = store_bytes(d.store) / live
        took, _ = cli(args.source, "gc", *where, "--keep", "0s", "--vacuum")
        results["vacuum_s"] = took
        results["store_per_live_after_vacuum"] = store_bytes(d.store) / live

        out_dir = work / "out"
        out_dir.mkdir()
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        took, _ = cli(args.source, "export", *where, "/app.db", out_dir / "exported.db")
        results["export_mb_s"] = live / MB / took
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        results["cp_from_mount_mb_s"] = live / MB / timed(["cp", str(db), str(out_dir / "copied.db")])
        src = work / "src"
        src.mkdir()
        shutil.copy(out_dir / "copied.db", src / "copy.db")
        took, _ = cli(args.source, "import", *where, src, "/imported")
        results["import_mb_s"] = live / MB / took
        results["cp_to_mount_mb_s"] = live / MB / timed(["cp", str(src / "copy.db"), str(d.mountpoint / "cp.db")])
        if (out_dir / "exported.db").read_bytes() != (out_dir / "copied.db").read_bytes():
            raise SystemExit("the exported database differs from the one cp read from the mount")

        took, out = cli(args.source, "clone", "default", "copy", "--store", d.store)
        results["clone_s"] = took  # the whole command: most of it is starting Python
        results["clone_commit_ms"] = float(out.split(" in ")[1].split(" ms")[0])
        log_volume(args.source, d.store, args.log_versions)
        took, out = cli(args.source, "log", *where, "--volume", "log", "--json")
        results["log_versions"] = len(json.loads(out))
        results["log_all_s"] = took
        took, _ = cli(args.source, "log", *where, "--volume", "log", "--limit", "20")
        results["log_limit_20_s"] = took
    finally:
        notes = stop_daemons(daemons, "a")
        shutil.rmtree(work, ignore_errors=True)
    for note in notes:
        print(note, file=sys.stderr)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:,.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
