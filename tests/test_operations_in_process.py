"""The file system's operations built in this process on an embedded store in a
temporary directory, with no FUSE and no kernel: what each request does to the store,
in milliseconds. The kernel's side (its caches, SQLite's own calls) is the tests that
mount; these pin down the commit points themselves."""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import trio
from in_process import CTX, JOURNAL_MAGIC, Host

from fusesqlite.inodes import ROOT_INO


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def test_a_plain_files_writes_commit_at_its_close(host: Host) -> None:
    async def main() -> None:
        ops = host.view()
        fi, _ = await ops.create(ROOT_INO, b"notes.txt", 0o100644, os.O_RDWR, CTX)
        await ops.write(fi.fh, 0, b"hello")
        # the name is committed at the create, the bytes at the close
        assert await host.content(b"notes.txt") == b""
        await ops.release(fi.fh)
        assert await host.content(b"notes.txt") == b"hello"

    run(main)


def test_a_database_commits_when_its_journal_is_deleted_and_not_before(host: Host) -> None:
    """journal_mode=DELETE: the journal's unlink is the commit point of every write to
    the database since the journal began, all of them in one version."""
    async def main() -> None:
        ops = host.view()
        db, _ = await ops.create(ROOT_INO, b"app.db", 0o100644, os.O_RDWR, CTX)
        await ops.write(db.fh, 0, b"A" * 8192)
        await ops.fsync(db.fh, False)
        assert await host.content(b"app.db") == b"A" * 8192
        journal, _ = await ops.create(ROOT_INO, b"app.db-journal", 0o100644, os.O_RDWR, CTX)
        await ops.write(journal.fh, 0, JOURNAL_MAGIC + bytes(504))
        await ops.fsync(journal.fh, False)
        await ops.write(db.fh, 0, b"B" * 4096)
        await ops.write(db.fh, 4096, b"C" * 4096)
        await ops.fsync(db.fh, False)  # inside the transaction: no commit
        await ops.release(journal.fh)
        assert await host.content(b"app.db") == b"A" * 8192
        await ops.unlink(ROOT_INO, b"app.db-journal", CTX)
        assert await host.content(b"app.db") == b"B" * 4096 + b"C" * 4096
        await ops.release(db.fh)

    run(main)


def test_a_database_whose_journal_is_truncated_commits_then(host: Host) -> None:
    """journal_mode=TRUNCATE: the journal truncated to 0 bytes is the commit point."""
    async def main() -> None:
        ops = host.view()
        db, _ = await ops.create(ROOT_INO, b"t.db", 0o100644, os.O_RDWR, CTX)
        await ops.write(db.fh, 0, b"A" * 4096)
        await ops.fsync(db.fh, False)
        journal, attr = await ops.create(ROOT_INO, b"t.db-journal", 0o100644, os.O_RDWR, CTX)
        await ops.write(journal.fh, 0, JOURNAL_MAGIC + bytes(504))
        await ops.write(db.fh, 0, b"Z" * 4096)
        assert await host.content(b"t.db") == b"A" * 4096
        # the kernel's SETATTR of the size alone (pyfuse3's SetattrFields cannot be made in Python)
        fields = SimpleNamespace(**{f"update_{n}": n == "size" for n in
                                    ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")})
        attr.st_size = 0
        await ops.setattr(attr.st_ino, attr, fields, journal.fh, CTX)
        assert await host.content(b"t.db") == b"Z" * 4096
        await ops.release(journal.fh)
        await ops.release(db.fh)

    run(main)
