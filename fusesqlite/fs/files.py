"""Regular files: open/read/write and the commit points.

A stored file's writes collect in its overlay. They are committed:
- for a database with an active rollback journal, only when the journal stops
  being active (deleted, truncated to zero, header zeroed): SQLite's commit point;
- otherwise (journal_mode MEMORY/OFF, WAL files, plain files) on fsync and on close.
Transient files (journals, -shm) never commit: they live in memory.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3
import trio

from fusesqlite import _journal
from fusesqlite.file_state import FileState
from fusesqlite.fs import wal
from fusesqlite.fs.base import FsBase, check_name, fail
from fusesqlite.fs.journal import Act
from fusesqlite.fs.transient import TransientFile
from fusesqlite.inodes import Inode, is_super_journal, is_transient_name, journal_target
from fusesqlite.store.base import StoreError
from fusesqlite.volume import ChangeSet, EntryChanged, LeaseHeld, StaleView

log = logging.getLogger("fusesqlite.fs")

#: how long a commit waits for the kernel to hand over its dirty pages
KERNEL_WRITEBACK_SECONDS = 10.0


class FileOps(FsBase):
    # -- commit points -----------------------------------------------------------------
    def journal_of(self, ino: int) -> TransientFile | None:
        """The active rollback journal of the database ``ino`` on this mount, if any."""
        known = self.names.get(ino)
        if known is None:
            return None
        tf = self.transient.get(known[0], known[1] + b"-journal")
        return tf if tf is not None and tf.journal.in_transaction else None

    def journal_active(self, ino: int) -> bool:
        """Whether the database ``ino`` is inside a rollback-journal transaction on this
        mount (also while that transaction is being committed)."""
        return ino in self.committing or self.journal_of(ino) is not None

    def open_file_named(self, parent: int, name: bytes) -> int | None:
        """The stored file open on this mount as ``name`` in ``parent``: SQLite holds its
        database open, so a journal finds it without a store lookup."""
        for ino, fs in self.tx.files.items():
            if fs.opens and fs.record.nlink and self.names.get(ino) == (parent, name):
                return ino
        return None

    async def commit(self, fs: FileState, reason: str) -> None:
        try:
            await self.tx.commit(fs, reason)
        except StoreError as e:
            raise fail(e.errno) from None

    async def commit_unless_in_transaction(self, fs: FileState, reason: str) -> None:
        # an unlinked file's data dies with its last handle: nothing to publish
        if fs.changed and fs.record.nlink > 0 and not self.journal_active(fs.ino):
            partner = self.wal_partner(fs)
            if partner is None:
                await self.commit(fs, reason)
            else:
                await self.commit_wal_pair(fs, partner, reason)

    def wal_partner(self, fs: FileState) -> FileState | None:
        """For a database in a WAL session here (fs/wal.py) and its -wal, both open
        here, the other one. Only the session's files pay for the look-up."""
        known = self.names.get(fs.ino)
        if known is None:
            return None
        parent, name = known
        db = wal.database_of(name, wal.WAL)
        if (parent, name if db is None else db) not in self.coherence.wal_opens:
            return None
        ino = self.open_file_named(parent, name + wal.WAL if db is None else db)
        return self.tx.files.get(ino) if ino is not None else None

    async def commit_wal_pair(self, fs: FileState, partner: FileState, reason: str) -> None:
        """Commit a WAL database and its -wal together, with what the kernel holds of both.

        A checkpoint copies frames of the -wal into the database, and the next writer
        then starts the -wal over. The store must never hold a database newer than its
        -wal (pages of frames it lacks: a reader of the -wal would mix versions) nor a
        -wal started over on a database without the pages checkpointed from it. SQLite
        orders its fsyncs so that a disk never shows either, except with
        synchronous=OFF, and the kernel's write-back follows no order at all. So each
        commit of either takes both, whole, in one store transaction: the store is then
        always as after a crash of SQLite itself, which its WAL recovery handles.
        """
        files = [fs, partner]
        await self.take_kernel_pages([f.ino for f in files])
        try:
            await self.tx.commit_many([f for f in files if f.changed], reason)
        except StoreError as e:
            raise fail(e.errno) from None

    async def commit_journal(self, tf: TransientFile, reason: str) -> None:
        """The journal ``tf`` reached its commit point (fs/journal.py): commit its
        database's transaction and end this mount's write lease on it.

        For a super-journal, that is every database whose journal it lists, in one
        store transaction: a multi-database transaction is atomic in the store too.
        """
        found_inos: list[int | None]
        writing, synced = tf.journal.committing()
        if is_super_journal(tf.name):
            targets = [journal_target(path) for path in tf.read(0, tf.size).split(b"\0")]
            found_inos = [await self.resolve(t) for t in targets if t]
        else:
            target = journal_target(tf.name)
            if writing is not None and self.names.get(writing) == (tf.parent, target):
                # the database journal_started found for this transaction, still under
                # that name: one store lookup fewer per commit
                found_inos = [writing]
            else:
                found = await self.child(tf.parent, target) if target else None
                found_inos = [found[0]] if found is not None and found[2] is None else []
        inos = [ino for ino in found_inos if ino is not None]
        self.committing.update(inos)
        try:
            for ino in inos:
                await self.coherence.promoted(ino)
            leases: list[int] | None = None
            try:
                if not synced:
                    # Before the leases end: the pages the kernel hands over include the
                    # page-cached journals' own (SQLite with synchronous=OFF never had
                    # them written back), which would otherwise look like a new
                    # transaction starting and take the lease again.
                    await self.take_kernel_pages(inos)
                leases = [ino for ino in inos if self.coherence.end_write(ino)]
                files = [fs for fs in map(self.tx.files.get, inos) if fs is not None and fs.changed]
                await self.tx.commit_many(files, reason, keep=leases)
            except (StoreError, pyfuse3.FUSEError) as e:
                if leases is None:
                    leases = [ino for ino in inos if self.coherence.end_write(ino)]
                self.coherence.kept(leases, ok=False)
                if leases:  # the failed commit changed no lease; do not make other mounts wait
                    await self.tx.commit_many([], "release lease", release=leases)
                raise fail(e.errno) from None
            self.coherence.kept(leases, ok=True)
        finally:
            self.committing.difference_update(inos)

    async def take_kernel_pages(self, inos: list[int]) -> None:
        """Have the kernel write back the pages it holds dirty before ``inos`` are
        committed (writeback cache; SQLite with synchronous=OFF does not fsync).

        By syncfs(2) of the mount, done by the own-mount helper (a daemon thread
        waiting for its own mount would hang a daemon killed meanwhile in its exit,
        for ever). Without the pages the commit would publish part of the
        transaction, so failing to get them fails it.
        """
        if not self.writeback_cache:
            return
        try:
            with trio.fail_after(KERNEL_WRITEBACK_SECONDS):
                await self.own_mount.syncfs(self.mountpoint)
        except (OSError, trio.TooSlowError) as e:
            names = ",".join(self.path(ino) for ino in inos)
            log.error("event=commit_failed path=%s reason=kernel_writeback cause=%s", names, e)
            raise fail(errno.EIO) from None

    async def journal_started(self, tf: TransientFile, offset: int) -> None:
        """A write to an inactive journal: a transaction on its database is starting.

        Take the database's write lease, which also checks that this mount's view
        of it is current; otherwise fail the write (and so the transaction).

        SQLite writes a journal's header (at offset 0) and then its pages, all
        while the journal is still inactive: only the header write starts the
        transaction. The later writes skip the store lookup of the database while
        this mount still holds its lease.
        """
        journal = tf.journal
        if offset and journal.database is not None and self.coherence.holds(journal.database):
            return
        journal.database = None
        target = journal_target(tf.name)
        if not target:
            return
        ino = self.open_file_named(tf.parent, target)
        if ino is None:
            found = await self.child(tf.parent, target)
            if found is None or found[2] is not None:
                return
            ino = found[0]
        rec = await self.record(ino)
        try:
            await self.coherence.begin_write(ino, rec.dver)
            journal.database = ino
        except (LeaseHeld, StaleView) as e:  # contention with another mount
            log.info("event=write_refused path=%s cause=%s", self.child_path(tf.parent, target), e)
            raise fail(e.errno) from None
        except StoreError as e:
            log.error(
                "event=commit_failed path=%s reason=begin_transaction cause=%s: %s",
                self.child_path(tf.parent, target), type(e).__name__, e,
            )
            raise fail(e.errno) from None

    async def act(self, tf: TransientFile, act: Act, reason: str) -> None:
        """Do what a journal's event asks (fs/journal.py); a failed commit fails the call."""
        if act is Act.COMMIT:
            try:
                await self.commit_journal(tf, reason)
            except pyfuse3.FUSEError:
                self.transient_failed(tf)
                raise

    def transient_failed(self, tf: TransientFile) -> None:
        """A call that changed ``tf`` fails: the kernel keeps the size it knew before,
        which is no longer true (a failed commit emptied the journal)."""
        self.invalidate(tf.ino)

    # -- create and open ---------------------------------------------------------------
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext):
        check_name(name)
        self.writable(ctx)
        if await self.child(parent_inode, name) is not None:
            raise fail(errno.EEXIST)
        await wal.opening(self, parent_inode, name)  # WAL on one mount at a time (fs/wal.py)
        if is_transient_name(name):
            tf = self.transient.create(parent_inode, name, mode, ctx.uid, ctx.gid)
            tf.opens += 1
            # A new rollback journal goes through the page cache (docs/architecture.md,
            # "A new journal through the page cache"): SQLite's dozen small writes reach
            # the daemon as one or two at its fsyncs.
            cached = self.writeback_cache and journal_target(name) is not None
            if cached:
                try:
                    # the write lease at the create (a direct_io journal takes it at its
                    # first write): the write-back comes only at SQLite's first fsync, or
                    # at its close
                    await self.journal_started(tf, 0)
                except pyfuse3.FUSEError as e:
                    # refused: a direct_io journal, whose first write fails with the
                    # refusal (an error of the transaction, not of the journal's open)
                    cached, tf.journal.refused = False, e.errno
            if cached:
                tf.journal.created_cached()
            return self.file_info(tf.ino, tf, cached_journal=cached), self.entry(tf.ino, tf.record())
        try:
            ino = await self.tx.new_ino()
            rec = Inode.new(stat.S_IFREG, mode, ctx.uid, ctx.gid)
            await self.commit_entry(parent_inode, name, ino, rec)
        except BaseException:
            await wal.open_failed(self, parent_inode, name)  # no handle: out of the WAL session
            raise
        self.names[ino] = (parent_inode, name)
        fs = self.tx.state(ino, rec, self.path(ino))
        fs.opens += 1
        return self.file_info(ino, fs), self.entry(ino, rec)

    async def commit_entry(self, parent: int, name: bytes, ino: int, rec: Inode) -> None:
        """A new entry and its inode, plus the parent's link count for directories."""
        changes = ChangeSet(inodes={ino: rec}, dirents={(parent, name): ino}, expect={(parent, name): None})
        await self.dir_changed(changes, parent, nlink_delta=1 if rec.is_dir else 0)
        await self.commit_meta(changes, f"create {self.child_path(parent, name)}")

    async def dir_changed(self, changes: ChangeSet, parent: int, nlink_delta: int = 0) -> None:
        """An entry of ``parent`` changes in ``changes``: its mtime and ctime move, its
        link count follows its subdirectories."""
        rec = changes.inodes.get(parent) or await self.record(parent)
        now = time.time_ns()
        changes.inodes[parent] = rec.with_(nlink=rec.nlink + nlink_delta, mtime_ns=now, ctime_ns=now)

    async def commit_meta(self, changes: ChangeSet, what: str) -> None:
        try:
            await self.tx.commit_changes(changes)
        except EntryChanged as e:  # another mount got there first: as if it had been seen
            log.info("event=namespace_conflict op=%r cause=%s", what, e)
            raise fail(e.errno) from None
        except StoreError as e:
            log.error("event=commit_failed op=%r cause=%s: %s", what, type(e).__name__, e)
            raise fail(e.errno) from None

    def file_info(
        self, ino: int, file: FileState | TransientFile, keep_cache: bool = True, proxy: bool = False,
        cached_journal: bool = False,
    ) -> pyfuse3.FileInfo:
        fh = self.new_handle(ino, file, proxy, cached_journal)
        fi = pyfuse3.FileInfo(fh=fh)
        fi.keep_cache = keep_cache  # every change passes through this mount's kernel (open_record)
        journal = isinstance(file, TransientFile) and journal_target(file.name) is not None
        # A journal opened again (TRUNCATE and PERSIST modes, a hot journal's rollback)
        # is direct_io: each of SQLite's writes is a request, so that the daemon sees a
        # header zeroed at once (PERSIST's commit point), and most are answered in C
        # (_journal.c) without reaching ``write`` below. Only a new journal (create)
        # goes through the page cache.
        fi.direct_io = journal and not cached_journal
        if journal:
            assert isinstance(file, TransientFile)
            _journal.register(fh, file.data)
        return fi

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.writable(ctx)
        app = not (flags & os.O_NONBLOCK and self._own_thread(ctx.pid))  # not the lock proxy's open
        if app:
            await wal.opening_ino(self, inode)  # WAL on one mount at a time (fs/wal.py)
        tf = self.transient.by_ino.get(inode)
        if tf is not None:
            if not tf.linked:  # unlinked, still open elsewhere, reopened (/proc/PID/fd)
                raise fail(errno.ENOENT)
            tf.opens += 1
            tf.journal.opened()
            if flags & os.O_TRUNC:
                await self.act(tf, tf.journal.truncated(0), "journal truncated")
            return self.file_info(inode, tf)
        try:
            rec, keep_cache = await self.tx.open_record(inode)
            if rec is None:
                raise fail(errno.ENOENT)
            if stat.S_ISDIR(rec.mode):
                raise fail(errno.EISDIR)
        except BaseException:
            if app:
                await wal.open_failed_ino(self, inode)  # no handle: out of the WAL session
            raise
        fs = self.tx.state(inode, rec, self.path(inode))
        fs.opens += 1
        if flags & os.O_TRUNC and fs.size:
            await self.tx.truncate(fs, 0)
        # the own-mount helper opens with O_NONBLOCK, SQLite never does: no /proc look-up per open
        proxy = bool(flags & os.O_NONBLOCK) and self._own_thread(ctx.pid)
        return self.file_info(inode, fs, keep_cache, proxy)

    # -- data ----------------------------------------------------------------------------
    # a memoryview too: pyfuse3 replies from any buffer, though its stub says bytes
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        f = self.handle(fh).file
        if isinstance(f, TransientFile):
            return f.read(off, size)
        try:
            return await self.tx.read(f, off, size)
        except StoreError as e:
            raise fail(e.errno) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handle(fh)
        f = h.file
        if isinstance(f, TransientFile):
            journal = f.journal
            was = journal.hot
            if journal.refused is not None:  # at the journal's create (above)
                refused, journal.refused = journal.refused, None
                raise fail(refused)
            # journal_started's own first test, here: a small transaction writes its
            # journal ten times, nine of them while holding the lease already (and
            # through the page cache, the first too: create took it)
            if not was and not ((off or h.cached) and journal.database is not None
                                and self.coherence.holds(journal.database)):
                await self.journal_started(f, off)
            f.write(off, buf)
            await self.act(f, journal.written(off, was, h.cached), "journal header zeroed")
            return len(buf)
        try:
            await self.tx.write(f, off, buf)
        except StoreError as e:
            raise fail(e.errno) from None
        if len(f.dirty) * self.tx.bs > self.tx.overlay_bytes:
            try:
                await self.tx.stage(f)
            except StoreError as e:
                raise fail(e.errno) from None
        return len(buf)

    async def truncate(self, ino: int, size: int, open_handle: bool) -> None:
        tf = self.transient.by_ino.get(ino)
        if tf is not None:
            await self.act(tf, tf.journal.truncated(size), "journal truncated")
            return
        rec, _ = await self.tx.open_record(ino)  # a FileState starts from this mount's view
        if rec is None:
            raise fail(errno.ENOENT)
        fs = self.tx.state(ino, rec, self.path(ino))
        try:
            await self.tx.truncate(fs, size)
        except StoreError as e:
            raise fail(e.errno) from None
        if not open_handle:  # truncate(2) on a path: nothing else will commit it
            await self.commit_unless_in_transaction(fs, "truncate")
            self.tx.forget_state(fs)

    async def flush(self, fh: int) -> None:
        h = self.handle(fh)
        f = h.file
        if isinstance(f, FileState):
            await self.commit_unless_in_transaction(f, "close")
        elif h.cached:  # SQLite's own handle, not a backup's read-only open
            await self.act(f, f.journal.synced(closing=True), "journal header zeroed")

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handle(fh)
        if h.proxy:
            # a move's write-back (own_mount._write_back): by now the kernel has sent
            # every WRITE of the file; committing them is not the proxy's call
            log.debug("event=proxy_fsync ino=%d", h.ino)
            return
        f = h.file
        if isinstance(f, FileState):
            tf = self.journal_of(f.ino)
            if tf is not None:  # the kernel just wrote back the transaction's pages
                tf.journal.db_synced = True
            await self.commit_unless_in_transaction(f, "fsync")
        elif h.cached:
            await self.act(f, f.journal.synced(closing=False), "journal header zeroed")

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        f = h.file
        if isinstance(f, TransientFile):
            _journal.unregister(fh)
            f.opens -= 1
            f.journal.released(h.cached, last=not f.opens)
            self.transient.release_if_unused(f)
            await wal.released(self, f)  # a session's last handle ends this mount's WAL ownership
            return
        assert isinstance(f, FileState)
        f.opens -= 1
        try:
            if f.opens == 0 and f.ino in self.stale_in_kernel:
                self.forget_in_kernel(f.ino)
            if f.opens == 0 and f.record.nlink == 0:
                await self.drop_unlinked(f)
                return
            try:
                await self.commit_unless_in_transaction(f, "release")
            finally:
                self.tx.forget_state(f)
        finally:
            if not h.proxy:
                await wal.released(self, f)  # likewise, after the -wal's own commit

    async def drop_unlinked(self, fs: FileState) -> None:
        """The last handle of an unlinked file is gone: its inode goes too."""
        await self.tx.rollback(fs)
        self.tx.files.pop(fs.ino, None)
        await self.commit_meta(ChangeSet(inodes={fs.ino: None}), f"drop unlinked ino {fs.ino}")
