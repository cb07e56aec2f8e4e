"""SQLite's rollback-journal protocol, step by step, in every journal mode,
synchronous setting and locking mode: the database's writes reach the store at the
journal's commit point (deleted, truncated to zero, header zeroed) and not one
request before.

Each case is a table of the requests SQLite makes for a transaction (pager.c: the
journal's header and page images, its fsyncs, the database's pages, its fsync, then
the commit point), played on the file system's operations in this process
(tests/in_process.py, no FUSE). After every step a fresh view of the store reads the
database: the old content up to the commit point, the new from it on. Two
transactions in a row, as a journal kept between them (TRUNCATE, PERSIST, or any
mode with locking_mode EXCLUSIVE, which keeps the journal open) is reused by the
second; then the connection closes.

Each table is played along four paths the daemon serves:

- ``python``: every request to Python, no page cache (``FUSESQLITE_NATIVE=0``);
- ``c``: no page cache, and the requests C answers (``_journal.answers``, C's own
  decision from the word Python published) given to C instead of Python
  (``--no-writeback-cache``);
- ``cache``: the kernel's writeback cache, modelled (``PageCache``): writes to a
  page-cached file wait in memory until SQLite fsyncs or closes it, or the daemon
  asks for every dirty page (syncfs), and then come as write-backs of whole pages;
  C answers what it would (the default mount);
- ``eager``: the same, but the kernel writes each dirty page back at once.

Through the page cache a commit point that zeroes the header reaches the daemon at
the journal's next fsync or close, which SQLite makes before it goes on, except with
locking_mode EXCLUSIVE and synchronous OFF (no fsync, no close): there the commits
land at the connection's close (README, "Current limits")."""
from __future__ import annotations

import itertools
import os
import struct
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from in_process import CTX, JOURNAL_MAGIC, Host

from fusesqlite import _journal
from fusesqlite.fs.operations import Operations
from fusesqlite.inodes import ROOT_INO

PAGE = 4096
SECTOR = 512
DB, JOURNAL = b"app.db", b"app.db-journal"

PATHS = ("python", "c", "cache", "eager")
#: (journal_mode, synchronous, locking_mode, path)
CASES = list(itertools.product(("delete", "truncate", "persist"), ("off", "normal", "full"),
                               ("normal", "exclusive"), PATHS))
IDS = ["-".join(case) for case in CASES]


def header(records: int, sync: str) -> bytes:
    """A journal header as pager.c writes it (writeJournalHdr), padded to a sector:
    with synchronous=FULL its magic stays zero until the page images are synced."""
    magic = bytes(8) if sync == "full" and records == 0 else JOURNAL_MAGIC
    return (magic + struct.pack(">IIIII", records, 0x5EED, 2, SECTOR, PAGE)).ljust(SECTOR, b"\0")


def page_record(number: int, content: bytes) -> bytes:
    """A page image in the journal: its number, the original content, a checksum."""
    return struct.pack(">I", number) + content + struct.pack(">I", 0)


def transaction(mode: str, sync: str, exclusive: bool, first: bool, old: bytes, new: bytes) -> tuple[list[tuple], int]:
    """The requests of one transaction that changes the database's 2 pages from
    ``old`` to ``new`` (``first``: the connection's first, which opens the journal in
    EXCLUSIVE locking mode too), and the index of SQLite's commit point."""
    images = b"".join(page_record(n + 1, old[n * PAGE:(n + 1) * PAGE]) for n in range(2))
    steps: list[tuple] = [("open_journal",)] if first or not exclusive else []
    steps += [("write_journal", 0, header(0, sync)), ("write_journal", SECTOR, images)]
    if sync != "off":
        steps.append(("fsync_journal",))
    if sync == "full":  # the record count goes in once the images are durable, and is synced too
        steps += [("write_journal", 0, header(2, sync)), ("fsync_journal",)]
    steps += [("write_db", 0, new[:PAGE]), ("write_db", PAGE, new[PAGE:])]
    if sync != "off":
        steps.append(("fsync_db",))
    # pager_end_transaction: TRUNCATE truncates (and syncs at FULL); PERSIST, and any
    # mode but TRUNCATE in EXCLUSIVE locking mode, zeroes the header (zeroJournalHdr,
    # synced unless OFF); DELETE closes and deletes
    if mode == "truncate":
        steps.append(("truncate_journal",))
        point = len(steps) - 1
        if sync == "full":
            steps.append(("fsync_journal",))
    elif mode == "persist" or exclusive:
        steps.append(("write_journal", 0, bytes(28)))
        point = len(steps) - 1
        if sync != "off":
            steps.append(("fsync_journal",))
    else:
        steps += [("close_journal",), ("unlink_journal",)]
        point = len(steps) - 1
    if mode != "delete" and not exclusive:
        steps.append(("close_journal",))  # locking_mode NORMAL: at the end of the transaction
    return steps, point


def closing(mode: str, exclusive: bool) -> list[tuple]:
    """The connection's close: the journal SQLite kept open, then (DELETE mode) removed."""
    steps: list[tuple] = [("close_journal",)] if exclusive else []
    if exclusive and mode == "delete":
        steps.append(("unlink_journal",))
    return steps + [("close_db",)]


def reaches_daemon(steps: list[tuple], point: int, journal_cached: bool) -> int:
    """The step at which the daemon can see SQLite's commit point: the same step,
    unless it zeroes the header of a journal in the page cache, whose write-back (at
    any time) waits for the journal's next fsync or close (len(steps) if none comes in
    ``steps``)."""
    if not journal_cached or steps[point][0] != "write_journal":
        return point
    return next((i for i in range(point, len(steps)) if steps[i][0] in ("fsync_journal", "close_journal")),
                len(steps))


class PageCache:
    """The kernel's writeback cache of the files a player opened through it, as the
    daemon sees it: what the kernel knows of each file's bytes, and which pages are
    dirty. Written back (whole pages, lowest first, each run of contiguous pages one
    request, trimmed to the file's size) at the file's fsync or close, at a syncfs
    (``take_kernel_pages``, which reaches the own-mount helper: this object stands in
    for it), or at once (``eager``)."""

    def __init__(self, own_mount: object, eager: bool) -> None:
        self.own_mount = own_mount
        self.eager = eager
        self.player: Player | None = None
        self.files: dict[int, tuple[bytearray, set[int]]] = {}  # fh -> (bytes, dirty pages)

    def __getattr__(self, name: str) -> object:
        return getattr(self.own_mount, name)

    def open(self, fh: int) -> None:
        self.files[fh] = (bytearray(), set())

    async def write(self, fh: int, off: int, data: bytes) -> None:
        content, dirty = self.files[fh]
        if len(content) < off + len(data):
            content.extend(bytes(off + len(data) - len(content)))
        content[off:off + len(data)] = data
        dirty.update(range(off // PAGE, (off + len(data) - 1) // PAGE + 1))
        if self.eager:
            await self.write_back(fh)

    def truncate(self, fh: int, size: int) -> None:
        content, dirty = self.files[fh]
        del content[size:]
        dirty.difference_update(range((size + PAGE - 1) // PAGE, len(content) // PAGE + 2))

    async def write_back(self, fh: int) -> None:
        assert self.player is not None
        content, dirty = self.files.get(fh, (bytearray(), set()))
        while dirty:
            first = last = min(dirty)
            while last + 1 in dirty:
                last += 1
            dirty.difference_update(range(first, last + 1))
            data = bytes(content[first * PAGE:(last + 1) * PAGE])
            if data:
                await self.player.send("write", fh, first * PAGE, data)

    async def syncfs(self, mountpoint: object) -> None:
        for fh in list(self.files):
            await self.write_back(fh)


class Player:
    """Plays steps on one view, as one SQLite connection and its kernel would."""

    def __init__(self, host: Host, path: str) -> None:
        self.path = path
        self.cache = PageCache(host.own_mount, eager=path == "eager") if path in ("cache", "eager") else None
        self.ops: Operations = host.view(writeback_cache=self.cache is not None, own_mount=self.cache)
        if self.cache is not None:
            self.cache.player = self
        self.db_fh: int = 0
        self.journal_fh: int | None = None
        self.journal_attr: pyfuse3.EntryAttributes | None = None
        #: the journal was last opened through the page cache
        self.journal_cached = False
        #: requests the daemon got in C, and in Python
        self.in_c = self.in_python = 0

    def cached(self, fh: int) -> bool:
        return self.cache is not None and fh in self.cache.files

    async def send(self, op: str, fh: int, off: int = 0, data: bytes = b"") -> None:
        """A request reaching the daemon: C's where C answers it (not on the ``python`` path)."""
        if self.path != "python" and _journal.answers(fh, op, off, data):
            self.in_c += 1
            if op == "write":
                self.ops.handle(fh).file.data.write(off, data)
            return
        self.in_python += 1
        if op == "write":
            await self.ops.write(fh, off, data)
        elif op == "fsync":
            await self.ops.fsync(fh, False)
        elif op == "flush":
            await self.ops.flush(fh)
        else:
            raise AssertionError(op)

    async def write(self, fh: int, off: int, data: bytes) -> None:
        if self.cached(fh):
            assert self.cache is not None
            await self.cache.write(fh, off, data)
        else:
            await self.send("write", fh, off, data)

    async def fsync(self, fh: int) -> None:
        if self.cached(fh):
            assert self.cache is not None
            await self.cache.write_back(fh)
        await self.send("fsync", fh)

    async def close(self, fh: int) -> None:
        if self.cached(fh):
            assert self.cache is not None
            await self.cache.write_back(fh)
            del self.cache.files[fh]
        await self.send("flush", fh)
        await self.ops.release(fh)

    async def create_db(self, content: bytes) -> None:
        fi, _ = await self.ops.create(ROOT_INO, DB, 0o100644, os.O_RDWR, CTX)
        self.db_fh = fi.fh
        if self.cache is not None and not fi.direct_io:
            self.cache.open(fi.fh)
        await self.write(self.db_fh, 0, content)
        await self.fsync(self.db_fh)

    async def step(self, op: str, *args: object) -> None:
        ops = self.ops
        if op == "open_journal":
            entry = await ops.lookup(ROOT_INO, JOURNAL, CTX)
            if entry.st_ino == 0:  # a negative entry: no journal yet
                fi, self.journal_attr = await ops.create(ROOT_INO, JOURNAL, 0o100644, os.O_RDWR, CTX)
            else:
                fi, self.journal_attr = await ops.open(entry.st_ino, os.O_RDWR, CTX), entry
            self.journal_fh = fi.fh
            self.journal_cached = self.cache is not None and not fi.direct_io  # a new journal (files.py)
            if self.journal_cached:
                self.cache.open(fi.fh)
        elif op == "write_journal":
            assert self.journal_fh is not None
            await self.write(self.journal_fh, *args)  # type: ignore[arg-type]
        elif op == "fsync_journal":
            assert self.journal_fh is not None
            await self.fsync(self.journal_fh)
        elif op == "write_db":
            await self.write(self.db_fh, *args)  # type: ignore[arg-type]
        elif op == "fsync_db":
            await self.fsync(self.db_fh)
        elif op == "close_journal":
            assert self.journal_fh is not None
            await self.close(self.journal_fh)
            self.journal_fh = None
        elif op == "close_db":
            await self.close(self.db_fh)
        elif op == "unlink_journal":
            await ops.unlink(ROOT_INO, JOURNAL, CTX)
        elif op == "truncate_journal":
            assert self.journal_fh is not None and self.journal_attr is not None
            if self.cached(self.journal_fh):
                assert self.cache is not None
                self.cache.truncate(self.journal_fh, 0)
            # the kernel's SETATTR of the size alone (pyfuse3's SetattrFields cannot be made in Python)
            fields = SimpleNamespace(**{f"update_{n}": n == "size" for n in
                                        ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")})
            self.journal_attr.st_size = 0
            await ops.setattr(self.journal_attr.st_ino, self.journal_attr, fields, self.journal_fh, CTX)
        else:
            raise AssertionError(op)


@pytest.mark.parametrize(("mode", "sync", "locking", "path"), CASES, ids=IDS)
def test_a_transaction_reaches_the_store_at_its_commit_point_and_not_before(
    host: Host, mode: str, sync: str, locking: str, path: str,
) -> None:
    contents = [bytes([c]) * (2 * PAGE) for c in b"ABC"]
    exclusive = locking == "exclusive"
    late: list[str] = []

    async def main() -> None:
        player = Player(host, path)
        await player.create_db(contents[0])
        pending: list[bytes] = []  # transactions SQLite committed that the daemon cannot see yet
        for n, (old, new) in enumerate(itertools.pairwise(contents)):
            steps, point = transaction(mode, sync, exclusive, n == 0, old, new)
            seen_at = point
            for i, step in enumerate(steps):
                if i == point:  # a journal opened again is not page-cached (files.py)
                    seen_at = reaches_daemon(steps, point, player.journal_cached)
                await player.step(*step)
                expected = new if i >= seen_at else contents[n - len(pending)]
                await check(f"transaction {n + 1}, step {i} {step[0]}", expected, point)
            if seen_at == len(steps):
                pending.append(new)
        for step in closing(mode, exclusive):
            await player.step(*step)
        await check("after the close", contents[-1], -1)
        if path == "c":  # every transaction writes page images after its header
            assert player.in_c > 0, "C answered nothing: the fast path is not played"

    async def check(where: str, expected: bytes, point: int) -> None:
        seen = await host.content(DB)
        if seen != expected:
            which = {c: name for c, name in zip(contents, "ABC")}
            late.append(f"{where}: the store has {which.get(seen, '?')}, expected {which[expected]} "
                        f"(SQLite's commit point: step {point})")

    trio.run(main)
    assert not late, late


ROLLBACK_CASES = [case for case in CASES if case[2] == "normal" and case[3] in ("c", "cache")]


@pytest.mark.parametrize(("mode", "sync", "locking", "path"), ROLLBACK_CASES, ids=["-".join(c) for c in ROLLBACK_CASES])
def test_a_rolled_back_transaction_leaves_the_store_as_it_was(
    host: Host, mode: str, sync: str, locking: str, path: str,
) -> None:
    """ROLLBACK after pages were spilled into the database: SQLite writes the original
    pages back from the journal, syncs the database, then ends the journal."""
    old, spilled = b"A" * (2 * PAGE), b"X" * (2 * PAGE)

    async def main() -> None:
        player = Player(host, path)
        await player.create_db(old)
        steps, point = transaction(mode, sync, False, True, old, spilled)
        for step in steps[:point]:
            await player.step(*step)
        await player.step("write_db", 0, old[:PAGE])  # playback
        await player.step("write_db", PAGE, old[PAGE:])
        if sync != "off":
            await player.step("fsync_db")
        for step in steps[point:] + closing(mode, False):
            await player.step(*step)
            assert await host.content(DB) == old, f"after {step[0]}"

    trio.run(main)
