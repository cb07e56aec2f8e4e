"""SQLite's rollback-journal protocol, step by step, in every journal mode and
synchronous setting: the database's writes reach the store at the journal's commit
point (deleted, truncated to zero, header zeroed) and not one request before.

Each case is a table of the requests SQLite makes for a transaction (pager.c: the
journal's header and page images, its fsyncs, the database's pages, its fsync, then
the commit point), played on the file system's operations in this process
(tests/in_process.py, no FUSE: the direct path, without the
kernel's page cache; the tests that mount cover the page cache's). After every step a
fresh view of the store reads the database: the old content up to the commit point,
the new from it on. Two transactions in a row, as a journal kept between them
(TRUNCATE, PERSIST) is reused by the second."""
from __future__ import annotations

import itertools
import os
import struct
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from in_process import CTX, JOURNAL_MAGIC, Host

from fusesqlite.fs.operations import Operations
from fusesqlite.inodes import ROOT_INO

PAGE = 4096
SECTOR = 512
DB, JOURNAL = b"app.db", b"app.db-journal"

#: (journal_mode, synchronous)
CASES = list(itertools.product(("delete", "truncate", "persist"), ("off", "normal", "full")))


def header(records: int) -> bytes:
    """A journal header as pager.c writes it (writeJournalHdr), padded to a sector."""
    return (JOURNAL_MAGIC + struct.pack(">IIIII", records, 0x5EED, 2, SECTOR, PAGE)).ljust(SECTOR, b"\0")


def page_record(number: int, content: bytes) -> bytes:
    """A page image in the journal: its number, the original content, a checksum."""
    return struct.pack(">I", number) + content + struct.pack(">I", 0)


def transaction(mode: str, sync: str, old: bytes, new: bytes) -> tuple[list[tuple], int]:
    """The requests of one transaction that changes the database's 2 pages from
    ``old`` to ``new``, and the index of the step that is its commit point."""
    images = b"".join(page_record(n + 1, old[n * PAGE:(n + 1) * PAGE]) for n in range(2))
    steps: list[tuple] = [("open_journal",), ("write_journal", 0, header(0)), ("write_journal", SECTOR, images)]
    if sync != "off":
        steps.append(("fsync_journal",))
    if sync == "full":  # the record count goes in once the images are durable, and is synced too
        steps += [("write_journal", 0, header(2)), ("fsync_journal",)]
    steps += [("write_db", 0, new[:PAGE]), ("write_db", PAGE, new[PAGE:])]
    if sync != "off":
        steps.append(("fsync_db",))
    if mode == "delete":
        steps += [("close_journal",), ("unlink_journal",)]
    elif mode == "truncate":
        steps.append(("truncate_journal",))
    else:
        steps.append(("write_journal", 0, bytes(28)))
    point = len(steps) - 1
    if mode != "delete":
        if sync == "full":
            steps.append(("fsync_journal",))
        steps.append(("close_journal",))  # locking_mode NORMAL: at the end of the transaction
    return steps, point


class Player:
    """Plays steps on one view, as one SQLite connection would."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.db_fh: int = 0
        self.journal_fh: int | None = None
        self.journal_attr: pyfuse3.EntryAttributes | None = None

    async def create_db(self, content: bytes) -> None:
        fi, _ = await self.ops.create(ROOT_INO, DB, 0o100644, os.O_RDWR, CTX)
        self.db_fh = fi.fh
        await self.ops.write(self.db_fh, 0, content)
        await self.ops.fsync(self.db_fh, False)

    async def step(self, op: str, *args: object) -> None:
        ops = self.ops
        if op == "open_journal":
            entry = await ops.lookup(ROOT_INO, JOURNAL, CTX)
            if entry.st_ino == 0:  # a negative entry: no journal yet
                fi, self.journal_attr = await ops.create(ROOT_INO, JOURNAL, 0o100644, os.O_RDWR, CTX)
            else:
                fi, self.journal_attr = await ops.open(entry.st_ino, os.O_RDWR, CTX), entry
            self.journal_fh = fi.fh
        elif op == "write_journal":
            assert self.journal_fh is not None
            await ops.write(self.journal_fh, *args)  # type: ignore[arg-type]
        elif op == "fsync_journal":
            assert self.journal_fh is not None
            await ops.fsync(self.journal_fh, False)
        elif op == "write_db":
            await ops.write(self.db_fh, *args)  # type: ignore[arg-type]
        elif op == "fsync_db":
            await ops.fsync(self.db_fh, False)
        elif op == "close_journal":
            assert self.journal_fh is not None
            await ops.flush(self.journal_fh)
            await ops.release(self.journal_fh)
            self.journal_fh = None
        elif op == "unlink_journal":
            await ops.unlink(ROOT_INO, JOURNAL, CTX)
        elif op == "truncate_journal":
            assert self.journal_fh is not None and self.journal_attr is not None
            # the kernel's SETATTR of the size alone (pyfuse3's SetattrFields cannot be made in Python)
            fields = SimpleNamespace(**{f"update_{n}": n == "size" for n in
                                        ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")})
            self.journal_attr.st_size = 0
            await ops.setattr(self.journal_attr.st_ino, self.journal_attr, fields, self.journal_fh, CTX)
        else:
            raise AssertionError(op)


@pytest.mark.parametrize(("mode", "sync"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_a_transaction_reaches_the_store_at_its_commit_point_and_not_before(host: Host, mode: str, sync: str) -> None:
    contents = [bytes([c]) * (2 * PAGE) for c in b"ABC"]
    late: list[str] = []

    async def main() -> None:
        player = Player(host.view())
        await player.create_db(contents[0])
        for old, new in itertools.pairwise(contents):
            steps, point = transaction(mode, sync, old, new)
            for i, step in enumerate(steps):
                await player.step(*step)
                seen = await host.content(DB)
                expected = new if i >= point else old
                if seen != expected:
                    late.append(f"after step {i} {step[0]}: the store has {'new' if seen == new else 'old'} "
                                f"content, expected {'new' if expected == new else 'old'} (commit point: step {point})")
        await player.ops.release(player.db_fh)

    trio.run(main)
    assert not late, late


@pytest.mark.parametrize(("mode", "sync"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_a_rolled_back_transaction_leaves_the_store_as_it_was(host: Host, mode: str, sync: str) -> None:
    """ROLLBACK after pages were spilled into the database: SQLite writes the original
    pages back from the journal, syncs the database, then ends the journal."""
    old, spilled = b"A" * (2 * PAGE), b"X" * (2 * PAGE)

    async def main() -> None:
        player = Player(host.view())
        await player.create_db(old)
        steps, point = transaction(mode, sync, old, spilled)
        for step in steps[:point]:
            await player.step(*step)
        await player.step("write_db", 0, old[:PAGE])  # playback
        await player.step("write_db", PAGE, old[PAGE:])
        if sync != "off":
            await player.step("fsync_db")
        for step in steps[point:]:
            await player.step(*step)
            assert await host.content(DB) == old, f"after {step[0]}"
        await player.ops.release(player.db_fh)

    trio.run(main)
