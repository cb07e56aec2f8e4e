"""kill -9 of the daemon during a stream of acknowledged transactions, in every journal mode
at every synchronous setting (issue 27, contract 1: a mount behaves as a local disk).

A kill -9 of the daemon is the mount's power loss: what the kernel still holds (dirty pages of
the writeback cache, requests in flight) is gone, what the store has stays. After a remount:

- always: ``integrity_check`` is ok, no transaction is torn (its 3 rows all there or none,
  ``meta`` agrees with the rows), and the database is in a state it was in after some commit
  (the transactions present are 1..N with no gap);
- rollback journals (DELETE, TRUNCATE, PERSIST) at any synchronous setting, and WAL with
  synchronous=FULL: every transaction whose COMMIT returned is there. Without fsyncs the commit
  points are the journal's delete, truncate or header overwrite, which the file system sees;
- WAL with synchronous=NORMAL or OFF: SQLite does not fsync the -wal at COMMIT, so on a local
  disk the last acknowledged transactions may be lost at a power loss; here too, and only those
  (a suffix of the stream, never one that a previous remount already showed).

Each case runs a few rounds: start the writer, let it run a random short time, kill -9 the
daemon, remount, check. The next round continues on the recovered database. A last test
starts the stream right after another connection's close, where the mount hands the WAL over.
"""
from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import time

import pytest
from helpers import opendb
from test_crash import STREAM_WRITER, SYNC_LEVEL, _Lines, _setup_stream_db

pytestmark = pytest.mark.timeout(120)

JOURNAL_MODES = ["DELETE", "TRUNCATE", "PERSIST", "WAL"]
SYNCHRONOUS = ["OFF", "NORMAL", "FULL"]
ROUNDS = 2

#: the mount's options: the default one, and the kernel's writeback cache off (the
#: default before Linux 6.16; the same matrix again, so ``slow``)
MOUNT_OPTIONS = [
    pytest.param((), id="default"),
    pytest.param(("--no-writeback-cache",), id="no-writeback-cache", marks=pytest.mark.slow),
]


def _may_lose_last(mode: str, sync: str) -> bool:
    """Whether SQLite itself allows the last acknowledged transactions to go at a power loss."""
    return mode == "WAL" and sync != "FULL"


def _log_excerpt(text: str, n: int = 25) -> str:
    """The daemon log lines that matter after a crash: errors and commits, the last ``n``."""
    keep = [ln for ln in text.splitlines()
            if any(w in ln for w in ("ERROR", "WARNING", "commit_failed", "event=commit", "Traceback"))]
    return "\n".join(keep[-n:]) or "\n".join(text.splitlines()[-n:])


def _writer(mounts, db, mode: str, sync: str, first: int, size: int, *limit: int) -> subprocess.Popen:
    return mounts.py(STREAM_WRITER, str(db), mode, sync, str(first), str(size), str(SYNC_LEVEL[sync]),
                     *map(str, limit))


def _stream_then_kill(mounts, m, db, mode: str, sync: str, first: int, run_for: float, size: int):
    """Run the writer from txn ``first``; ``run_for`` s after its first acknowledged commit,
    kill -9 the daemon. Returns the acknowledged txn numbers and the writer's stderr."""
    w = _writer(mounts, db, mode, sync, first, size)
    out = _Lines(w.stdout)
    out.wait_for(1, 60)
    time.sleep(run_for)
    if w.poll() is not None or not out.lines:
        w.kill()
        w.wait(10)
        pytest.fail(f"{mode}/{sync}: the writer stopped before the kill (rc {w.returncode}) after "
                    f"{len(out.lines)} commits: {w.stderr.read()}\n--- daemon log ---\n{m.log_tail()}",
                    pytrace=False)
    m.kill9()
    try:
        w.wait(30)
        note = ""
    except subprocess.TimeoutExpired:
        w.kill()
        w.wait(10)
        note = " (still running 30 s after the kill; killed)"
    out.t.join(10)
    return {int(x) for x in out.lines}, w.stderr.read() + note


def _remount_and_check(mounts, m, db, acked: set[int], first: int, strict: bool, where: str, err: str):
    """Remount the killed daemon's store and check the database (``_check``); a failure
    shows the writer's error and the killed daemon's log. Returns the new mount and the
    last transaction present."""
    killed_log = m.log_text()
    m = mounts.remount(m)
    try:
        return m, _check(db, acked, first, strict, where)
    except AssertionError as e:
        raise AssertionError(f"{e}\nwriter: {err.strip()}\n--- killed daemon's log (errors, commits) ---\n"
                             f"{_log_excerpt(killed_log)}") from None


def _check(db, acked: set[int], first: int, strict: bool, where: str) -> int:
    """Assert the state after a remount (see the module docstring); returns the last txn present."""
    try:
        with opendb(db) as c:
            integrity = c.execute("PRAGMA integrity_check").fetchall()
            assert integrity == [("ok",)], f"{where}: integrity_check {integrity[:10]}"
            rows = c.execute("SELECT txn, count(*), group_concat(k) FROM t GROUP BY txn ORDER BY txn").fetchall()
            last, n = c.execute("SELECT last, n FROM meta WHERE id = 1").fetchone()
            total = c.execute("SELECT count(*) FROM t").fetchone()[0]
    except sqlite3.DatabaseError as e:  # "database disk image is malformed" before integrity_check answers
        raise AssertionError(f"{where}: {type(e).__name__}: {e}") from None
    torn = [(txn, cnt, ks) for txn, cnt, ks in rows if cnt != 3]
    assert not torn, f"{where}: torn transactions (txn, rows, k's): {torn[:20]}"
    present = {txn for txn, _, _ in rows}
    top = max(present, default=0)
    assert n == total and last == top, (
        f"{where}: meta (last={last}, n={n}) disagrees with the rows (last txn {top}, {total} rows)")
    gaps = sorted(set(range(1, top + 1)) - present)
    assert not gaps, f"{where}: transactions missing before later ones (not a state after any commit): {gaps[:20]}"
    assert top >= first - 1, f"{where}: transactions {top + 1}..{first - 1}, seen after an earlier remount, are gone"
    missing = sorted(acked - present)
    if strict:
        assert not missing, (
            f"{where}: acknowledged transactions lost: {missing[:20]} (of {len(missing)}; {len(acked)} acknowledged, "
            f"last present {top})")
    # the one transaction in flight at this round's kill may be there without its acknowledgement
    # (earlier rounds' were checked then, and are part of the state the next round started from)
    extra = sorted(x for x in present - acked if x >= first)
    assert len(extra) <= 1 and all(x > max(acked) for x in extra), f"{where}: unacknowledged transactions {extra}"
    return top


@pytest.mark.parametrize("mount_args", MOUNT_OPTIONS)
@pytest.mark.parametrize("sync", SYNCHRONOUS)
@pytest.mark.parametrize("mode", JOURNAL_MODES)
def test_kill9_daemon_during_stream(mounts, mode, sync, mount_args):
    seed = int(os.environ.get("FUSESQLITE_CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    strict = not _may_lose_last(mode, sync)
    m = mounts(extra_args=mount_args)
    db = m / "modes.sqlite"
    _setup_stream_db(db, mode)
    first, all_acked = 1, set()
    for round_ in range(ROUNDS):
        run_for, size = rng.uniform(0, 0.8), rng.choice([200, 3000])
        acked, err = _stream_then_kill(mounts, m, db, mode, sync, first, run_for, size)
        where = (f"{mode}/synchronous={sync} {' '.join(mount_args) or 'default mount'} seed={seed} "
                 f"round {round_} (txn {first}.., ran {run_for:.2f} s after the first ack, size {size})")
        assert acked, f"{where}: no commit acknowledged"
        assert "writer stopped" in err, f"{where}: the writer did not see the daemon die: {err!r}"
        all_acked |= acked
        m, last = _remount_and_check(mounts, m, db, all_acked, first, strict, where, err)
        lost = sorted(x for x in acked if x > last)
        print(f"{where}: acked {min(acked)}..{max(acked)}, last present {last}, lost {len(lost)}")
        first = last + 1


def _write_and_close(db, first: int, limit: int) -> None:
    """The stream's transactions ``first``.. (``limit`` of them) at synchronous=FULL, then close."""
    with opendb(db, journal_mode="WAL") as c:
        c.execute("PRAGMA synchronous=FULL")
        for txn in range(first, first + limit):
            c.execute("BEGIN")
            for k in range(3):
                c.execute("INSERT INTO t(txn, k, data) VALUES (?, ?, randomblob(200 + abs(random() % 1500)))", (txn, k))
            c.execute("UPDATE meta SET last = ?, n = n + 3 WHERE id = 1", (txn,))
            c.execute("COMMIT")


@pytest.mark.parametrize("sync", [
    "OFF",  # no fsync ever: the hand-over's publish is the database's only commit point
    pytest.param("NORMAL", marks=pytest.mark.slow),
    pytest.param("FULL", marks=pytest.mark.slow),
])
def test_kill9_daemon_while_wal_changes_hands(mounts, sync):
    """WAL: one connection writes some transactions (synchronous=FULL) and closes (SQLite
    checkpoints and removes the -wal; the mount, at the -shm's last release,
    publishes the database and -wal before giving up the WAL); the next one starts streaming
    at once, at ``sync``, and the daemon is killed. The hand-over must not commit the database
    at some instant of the next writer's stream (mid-checkpoint, without its -wal): after the
    remount the database is consistent, as in the matrix above, and the first writer's
    transactions are all there."""
    seed = int(os.environ.get("FUSESQLITE_CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    strict = not _may_lose_last("WAL", sync)
    m = mounts(debug=True)  # its log names each commit and why: a failure's evidence
    db = m / "handover.sqlite"
    _setup_stream_db(db, "WAL")
    first, all_acked = 1, set()
    for round_ in range(5):
        limit, run_for = rng.randint(1, 40), rng.uniform(0.6, 1.2)
        where = (f"WAL/synchronous={sync} hand-over seed={seed} round {round_} "
                 f"(txn {first}.., {limit} then a stream killed {run_for:.2f} s after its first ack)")
        _write_and_close(db, first, limit)  # here, so that the stream starts right after the close
        acked = set(range(first, first + limit))
        more, err = _stream_then_kill(mounts, m, db, "WAL", sync, first + limit, run_for, 200)
        assert "writer stopped" in err, f"{where}: the writer did not see the daemon die: {err!r}"
        acked |= more
        all_acked |= acked
        m, last = _remount_and_check(mounts, m, db, all_acked, first, strict, where, err)
        assert last >= first + limit - 1, f"{where}: the first writer's (FULL, closed) transactions lost"
        print(f"{where}: acked {min(acked)}..{max(acked)}, last present {last}")
        first = last + 1
