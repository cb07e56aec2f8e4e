"""Following other mounts one file at a time: a mount reads the volume's log only for
commits of what it holds (coherence/follow.py), and still sees those at once."""
from __future__ import annotations

import sqlite3
import threading
import time

import trio
from helpers import free_port, scrape_metrics
from in_process import CTX
from test_lookup_across_follow import _held
from test_many_mounts import new_counter, query, wait_for

from fusesqlite.inodes import ROOT_INO

LOG_READS = "fusesqlite_follow_log_reads_total"
FOLLOWED = "fusesqlite_followed_inodes"


def _settled(port: int) -> float:
    """The mount's log reads once they stopped moving (it followed what came before)."""
    last = scrape_metrics(port)[LOG_READS]
    while True:
        time.sleep(0.5)
        now = scrape_metrics(port)[LOG_READS]
        if now == last:
            return now
        last = now


def test_commits_of_a_database_a_mount_does_not_hold_cost_it_no_log_read(mounts):
    """B holds x.db (open, read); A commits y.db, which B never looked at, 100 times: B
    reads the log for none of them, yet follows A's next commit of x.db at once. C,
    following the whole volume (--watch-limit 0), reads the log for them again and
    again."""
    a = mounts()
    b_port, c_port = free_port(), free_port()
    b = mounts(store=a.store, extra_args=("--metrics", str(b_port)))
    c = mounts(store=a.store, extra_args=("--metrics", str(c_port), "--watch-limit", "0"))
    new_counter(a, "x.db", b, c)
    new_counter(a, "y.db")
    held = sqlite3.connect(b / "x.db", timeout=30)
    assert held.execute("SELECT v FROM counter").fetchall() == [(0,)]
    assert query(c / "x.db", "SELECT v FROM counter") == [(0,)]

    b_before, c_before = _settled(b_port), _settled(c_port)
    assert scrape_metrics(b_port)[FOLLOWED] > 0
    assert scrape_metrics(c_port)[FOLLOWED] == 0
    writer = sqlite3.connect(a / "y.db", isolation_level=None)
    for _ in range(100):
        writer.execute("UPDATE counter SET v = v + 1")
    writer.close()
    assert wait_for(lambda: query(c / "y.db", "SELECT v FROM counter") == [(100,)])
    b_after, c_after = _settled(b_port), _settled(c_port)
    assert b_after == b_before, f"B read the log {b_after - b_before:.0f} times for commits of a file it does not hold"
    assert c_after - c_before >= 5, f"C, following the whole volume, read the log {c_after - c_before:.0f} times"

    a_con = sqlite3.connect(a / "x.db", isolation_level=None)
    a_con.execute("UPDATE counter SET v = 7")
    a_con.close()
    assert wait_for(lambda: held.execute("SELECT v FROM counter").fetchall() == [(7,)]), \
        "B did not follow a commit of the database it holds"
    held.close()
    assert scrape_metrics(b_port)[LOG_READS] > b_after


def test_a_file_read_while_the_follower_moved_past_its_commit_is_read_again(host):
    """B reads file f as of its snapshot; meanwhile A commits f and B's follower, which
    held nothing of f yet, moves B's view past that commit without reading the log (it
    follows only what B holds). The record B then keeps is older than its view: the
    next round of the follower must read the log back to it and drop it (else B would
    serve f's old size and content until f's next commit)."""
    a, b = host.view(), host.view()
    read_done, go = threading.Event(), threading.Event()

    async def main() -> None:
        await b.coherence._follow_once()
        fh = (await a.create(ROOT_INO, b"f", 0o100644, 0, CTX))[0].fh
        await a.release(fh)
        await b.coherence._follow_once()  # B follows the create: the root changed
        b.tx.volume.lookup_current = _held(b.tx.volume.lookup_current, read_done, go)  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            found: list = []

            async def look() -> None:
                found.append(await b.lookup(ROOT_INO, b"f", CTX))

            nursery.start_soon(look)
            await trio.to_thread.run_sync(read_done.wait, 10)  # read as of B's snapshot: empty
            fh = (await a.open((await a.lookup(ROOT_INO, b"f", CTX)).st_ino, 2, CTX)).fh
            await a.write(fh, 0, b"hello")
            await a.release(fh)  # A's commit of f, after B's read
            await b.coherence._follow_once()  # nothing B holds changed: its view moves past A's commit
            assert b.coherence.seen >= a.tx.snapshot
            go.set()
        assert found[0].st_size == 0  # the lookup's own answer: read before
        await b.coherence._follow_once()
        rec = await b.tx.record(found[0].st_ino)
        assert rec is not None and rec.size == 5, "B kept a record older than its view"

    trio.run(main)


def test_what_a_mount_did_not_follow_is_read_as_the_store_has_it_now(host):
    """B follows only what it holds, so its view may be older than the store's for the
    rest: a first lookup or listing of a file another mount created and filled since
    must answer the store's current state, not B's view (ENOENT, or an empty file)."""
    a, b = host.view(), host.view()

    async def main() -> None:
        await b.coherence._follow_once()  # B's view: the volume before A's commits
        before = b.tx.snapshot
        fi, entry = await a.create(ROOT_INO, b"f", 0o100644, 0, CTX)
        await a.write(fi.fh, 0, b"hello")
        await a.release(fi.fh)
        assert b.tx.snapshot == before  # B has not followed A's commits
        found = await b.lookup(ROOT_INO, b"f", CTX)
        assert found.st_ino == entry.st_ino and found.st_size == 5
        listed = {name: rec.size for name, _, rec in await b.tx.list_dir(ROOT_INO)}
        assert listed == {b"f": 5}

    trio.run(main)


def test_a_move_held_up_by_a_local_reader_is_logged_while_it_waits(mounts):
    """A read transaction on B keeps A's commit from reaching B (the move waits for
    SQLite's lock): after a second B says so, once, with the file and the step, while
    it still waits; the move ends when the reader does."""
    a = mounts()
    b = mounts(store=a.store)
    new_counter(a, "x.db", b)
    reader = sqlite3.connect(b / "x.db", isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT v FROM counter").fetchall() == [(0,)]
    writer = sqlite3.connect(a / "x.db", isolation_level=None)
    writer.execute("UPDATE counter SET v = 1")
    writer.close()
    assert b.wait_log("event=move_waiting", timeout=10), "a move held up for seconds left nothing in the log"
    line = next(x for x in b.log_text().splitlines() if "event=move_waiting" in x)
    assert "x.db" in line and "step=lock" in line, line
    assert reader.execute("SELECT v FROM counter").fetchall() == [(0,)]  # one version throughout
    reader.execute("COMMIT")
    assert wait_for(lambda: query(b / "x.db", "SELECT v FROM counter") == [(1,)])
    reader.close()
    assert b.log_text().count("event=move_waiting") == 1
