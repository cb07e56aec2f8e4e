"""A journal's requests answered in C (``_journal.c``), end to end: SQLite's own
rollback of a hot journal written back by the kernel and read in C, big enough to
spill to a file; small transactions whose journal reaches the daemon in two writes
through the page cache, and whose journal fsyncs never reach Python. Where the
hooks must not engage (tests/native_path.py) the same, with nothing answered in C;
where they must, a mount without them fails."""
from __future__ import annotations

import os
import re
import signal

import pytest
from helpers import opendb, table_digest
from native_path import native_on

pytestmark = pytest.mark.timeout(120)

#: updates every row with a small page cache, so SQLite syncs the journal (its header
#: becomes active) and writes pages into the database before the commit; then waits
MID_TXN_UPDATE = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA cache_size=20")
c.execute("BEGIN")
c.execute("UPDATE t SET data = randomblob(1000)")
print("ready", flush=True)
time.sleep(600)
"""


def _in_c(log: str) -> tuple[int, int, int]:
    m = re.search(
        r"event=unmounted .*journal_writes_in_c=(\d+) journal_reads_in_c=(\d+) journal_syncs_in_c=(\d+)", log
    )
    assert m, "no unmount line with the journal counters in the daemon log"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_a_hot_journal_written_and_read_in_c_rolls_back(mounts):
    """On the pure-Python path (native_path.expected) the same rollback, nothing in C."""
    m = mounts()
    native = native_on(m)
    db = m / "app.sqlite"
    with opendb(db) as c:  # journal_mode DELETE, synchronous FULL: SQLite's defaults
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, data BLOB)")
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?, randomblob(1000))", [(k,) for k in range(3000)])
        c.execute("COMMIT")
        before = table_digest(c, "SELECT * FROM t ORDER BY k")

    app = m.py(MID_TXN_UPDATE, str(db))
    try:
        assert app.stdout.readline().strip() == "ready", m.log_tail()
        journal = f"{db}-journal"
        # ~3 MB of original pages: past the 1 MiB the journal keeps in memory
        assert os.path.getsize(journal) > 2 << 20
        with open(journal, "rb") as f:
            assert f.read(8) == bytes.fromhex("d9d505f920a163d7"), "the journal is not hot yet"
    finally:
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)

    with opendb(db) as c:  # plays the hot journal back
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert table_digest(c, "SELECT * FROM t ORDER BY k") == before
    assert not os.path.exists(f"{db}-journal")

    m.stop()
    writes, reads, _ = _in_c(m.log_text())
    if not native:
        assert (writes, reads) == (0, 0), "journal requests answered in C with the hooks off"
        return
    # SQLite wrote 3 pieces per journaled page (number, page, checksum), some 2,400
    # writes: the kernel sent them as far fewer large ones, all but the first in C;
    # the rollback (a journal opened again: direct_io) read every piece back in C
    assert 0 < writes < 700, writes
    assert reads > 700, reads


def test_small_transactions_journal_reaches_the_daemon_in_two_writes_and_commits_still_land(mounts):
    m = mounts()
    native = native_on(m)
    db = m / "app.sqlite"
    n = 50
    with opendb(db) as c:  # journal_mode DELETE, synchronous FULL
        c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
        for k in range(n):
            c.execute("INSERT INTO t VALUES (?, ?)", (k, f"row {k}"))
    m.stop()
    writes, _, syncs = _in_c(m.log_text())
    if not native:  # the pure-Python path: every request reaches Python
        assert (writes, syncs) == (0, 0), "journal requests answered in C with the hooks off"
    else:
        # each autocommit: SQLite writes its new journal 8 times (the header, 3 pieces
        # for each of 2 pages, the header with its magic) and fsyncs it twice. Through
        # the page cache that is one write back at each fsync: the first (the transaction's
        # start) for Python, the second answered in C, as are both fsyncs. The close is
        # Python's: the journal was unseen and not hot at Python's last event, and the
        # header C wrote since does not change the word Python published (fs/journal.py)
        assert syncs >= 2 * n, syncs
        assert n <= writes < 2 * n, writes
    m = mounts.remount(m, stop=False)
    with opendb(m / "app.sqlite") as c:
        assert c.execute("SELECT count(*), sum(k) FROM t").fetchone() == (n, n * (n - 1) // 2)
