"""Directories and the namespace: lookup, listing, mkdir, unlink, rename, links.

Every namespace change is its own store commit (one new version), so it is
durable when the system call returns, as on a journalled local file system.
"""
from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import os
import stat
import time

import pyfuse3

from fusesqlite import fuse_caps
from fusesqlite.fs.base import FsBase, check_name, fail
from fusesqlite.fs.files import FileOps
from fusesqlite.inodes import NAME_MAX, ROOT_INO, TRANSIENT_BASE, Inode, is_transient_name
from fusesqlite.volume import ChangeSet

log = logging.getLogger("fusesqlite.fs")

#: directories whose last listing is kept for the calls that go on with it
LISTINGS_KEPT = 64


def listing_cookie(name: bytes) -> int:
    """A name's offset in a listing of its directory: 63 bits of a hash, above the 1 and
    2 of "." and "..". Two names of one directory share one with odds of about n²/2^64;
    a listing resumed between the two would then leave out the second."""
    return 3 + int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") % ((1 << 63) - 3)


class DirectoryOps(FileOps, FsBase):
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(name)
        if name == b".":
            return self.entry(parent_inode, await self.record(parent_inode))
        if name == b"..":
            up = self.names.get(parent_inode, (ROOT_INO, b""))[0]
            return self.entry(up, await self.record(up))
        epoch = self.coherence.epoch
        found = await self.child(parent_inode, name)
        if found is None:
            # SQLite looks for X-journal and X-wal at every read transaction. Local
            # creations drop the kernel's negative entry themselves, other mounts'
            # through coherence/, so the kernel may remember the answer -- unless
            # other mounts' changes arrived while it was being computed.
            return self.negative_entry(name, cacheable=epoch == self.coherence.epoch)
        ino, rec, tf = found
        if tf is not None:
            return self.entry(ino, tf.record())
        assert rec is not None  # a stored child comes with its record
        return self.entry(ino, rec)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(inode, await self.record(inode))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """access(2) where the kernel does not check permissions: only root reaches such
        a mount (mount.kernel_checks_permissions), and root may read and write
        anything, search any directory, and execute a file with an execute bit."""
        rec = await self.record(inode)
        if mode & os.W_OK:
            self.writable(ctx)
        return not (mode & os.X_OK and not rec.is_dir and not rec.mode & 0o111)

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        self.writable(ctx)
        if fields.update_size:
            await self.truncate(inode, attr.st_size, open_handle=fh is not None)
        tf = self.transient.by_ino.get(inode)
        if tf is not None:
            tf.rec = self._apply(tf.record(), attr, fields)
            return self.entry(inode, tf.record())
        if inode >= TRANSIENT_BASE:
            return self._gone(inode, attr, fields, ctx)
        if self.times_pending(inode, fields, attr):
            return self.entry(inode, self.tx.files[inode].live_record())
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime or fields.update_mtime:
            rec = await self.tx.record(inode)
            if rec is None:
                if fields.update_mode or fields.update_uid or fields.update_gid:
                    raise fail(errno.ENOENT)
                return self._gone(inode, attr, fields, ctx)
            fs = self.tx.files.get(inode)
            committed = fs.record if fs is not None else rec
            new = self._apply(committed, attr, fields)
            if fs is not None and fields.update_mtime:
                fs.mtime_ns = new.mtime_ns
                fs.modified = False  # earlier writes must not move it again at their commit (cp -p)
            await self.commit_meta(ChangeSet(inodes={inode: new}), f"setattr {self.path(inode)}")
        return self.entry(inode, await self.record(inode))

    def _gone(self, inode: int, attr, fields: pyfuse3.SetattrFields, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """New times for a file that no longer exists (unlinked and closed, on this mount
        or another): with the writeback cache the kernel keeps a file's times itself and
        writes them back whenever it writes the inode, also after the last close of a
        file already unlinked -- at the next syncfs(2), say. That file is gone and its
        times with it; an error here would fail that syncfs, and with it the commit of
        whichever database asked for it (a database deleted and created again under the
        same name, with synchronous=OFF)."""
        return self.entry(inode, self._apply(Inode.new(stat.S_IFREG, 0o600, ctx.uid, ctx.gid, nlink=0), attr, fields))

    def times_pending(self, ino: int, fields: pyfuse3.SetattrFields, attr: pyfuse3.EntryAttributes) -> bool:
        """A new mtime (and ctime) alone, for a file with uncommitted changes here: it
        joins them, committed with them, instead of costing a commit of its own.

        With the writeback cache the kernel keeps a file's times itself and sends
        them before every fsync and close that follows a write: a commit each
        would double the commits of a small SQLite transaction.
        """
        if fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime:
            return False
        fs = self.tx.files.get(ino)
        if not fields.update_mtime or fs is None or not (fs.changed or self.journal_active(ino)):
            return False
        fs.mtime_ns = attr.st_mtime_ns
        fs.modified = False  # the commit keeps the kernel's time, which this host shows
        return True

    @staticmethod
    def _apply(rec: Inode, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> Inode:
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IFMT(rec.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if (fields.update_uid or fields.update_gid) and not stat.S_ISDIR(rec.mode):
            # chown clears set-user-ID, and set-group-ID where group execute is set, as
            # Linux does even for root; with FUSE_HANDLE_KILLPRIV (fuse_caps) the kernel
            # leaves that to the daemon
            mode = changes.get("mode", rec.mode)
            mode &= ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
            changes["mode"] = mode
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        changes["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
        return rec.with_(**changes)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        rec = await self.record(inode)
        if not stat.S_ISLNK(rec.mode):
            raise fail(errno.EINVAL)
        return rec.target

    # -- creating entries ------------------------------------------------------------------
    async def _new_entry(self, parent: int, name: bytes, rec: Inode) -> pyfuse3.EntryAttributes:
        check_name(name)
        if is_transient_name(name) and not rec.is_reg:
            raise fail(errno.EINVAL)  # journal names are reserved for files
        if await self.child(parent, name) is not None:
            raise fail(errno.EEXIST)
        ino = await self.tx.new_ino()
        await self.commit_entry(parent, name, ino, rec)
        self.names[ino] = (parent, name)
        return self.entry(ino, rec)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext):
        self.writable(ctx)
        return await self._new_entry(parent_inode, name, Inode.new(stat.S_IFDIR, mode, ctx.uid, ctx.gid, nlink=2))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext):
        self.writable(ctx)
        return await self._new_entry(parent_inode, name, Inode.new(stat.S_IFLNK, 0o777, ctx.uid, ctx.gid, target=target))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext):
        self.writable(ctx)
        if not stat.S_ISREG(mode):
            raise fail(errno.EPERM)  # only regular files, directories and symlinks are stored
        if is_transient_name(name):
            check_name(name)
            if self.transient.get(parent_inode, name) is not None:
                raise fail(errno.EEXIST)
            tf = self.transient.create(parent_inode, name, mode, ctx.uid, ctx.gid)
            return self.entry(tf.ino, tf.record())
        return await self._new_entry(parent_inode, name, Inode.new(stat.S_IFREG, mode, ctx.uid, ctx.gid))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext):
        self.writable(ctx)
        check_name(new_name)
        if inode in self.transient.by_ino or is_transient_name(new_name):
            raise fail(errno.EPERM)  # transient files cannot gain a stored name
        rec = await self.record(inode)
        if rec.is_dir:
            raise fail(errno.EPERM)
        if await self.child(new_parent_inode, new_name) is not None:
            raise fail(errno.EEXIST)
        new = rec.with_(nlink=rec.nlink + 1, ctime_ns=time.time_ns())
        changes = ChangeSet(
            inodes={inode: self._committed(inode, new)},
            dirents={(new_parent_inode, new_name): inode},
            expect={(new_parent_inode, new_name): None},
        )
        await self.dir_changed(changes, new_parent_inode)
        await self.commit_meta(changes, f"link {self.path(inode)}")
        return self.entry(inode, new)

    def _committed(self, ino: int, rec: Inode) -> Inode:
        """``rec`` with the size and data fields as committed (pending ones stay pending)."""
        fs = self.tx.files.get(ino)
        if fs is None:
            return rec
        return rec.with_(size=fs.record.size, mtime_ns=fs.record.mtime_ns, hwm=fs.record.hwm)

    # -- removing entries ------------------------------------------------------------------
    async def _to_remove(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext):
        """The entry an unlink or rmdir removes: (ino, stored record, transient file)."""
        self.writable(ctx)
        check_name(name)
        found = await self.child(parent, name)
        if found is None:
            raise fail(errno.ENOENT)
        return found

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ino, rec, tf = await self._to_remove(parent_inode, name, ctx)
        if tf is not None:
            try:
                await self.act(tf, tf.journal.unlinked(), "journal deleted")
            except BaseException:
                # A failed commit reverted the database. The unlink failed, so the name
                # stays, as the kernel (which keeps its entry) and POSIX have it; emptied,
                # the journal is no longer hot: nobody plays back a transaction that is
                # not there. Dropping it instead left the kernel a positive entry to a
                # gone inode for up to a second: an open(O_CREAT) of it said ENOENT.
                tf.journal.truncated(0)  # no commit point: the failed commit is the transaction's end
                self.transient_failed(tf)
                raise
            self.transient.unlink(tf)
            return
        assert rec is not None
        if rec.is_dir:
            raise fail(errno.EISDIR)
        changes = ChangeSet(dirents={(parent_inode, name): None}, expect={(parent_inode, name): ino})
        self._drop_link(ino, rec, changes)
        await self.dir_changed(changes, parent_inode)
        # a -wal's unlink is checked in its own store transaction (Volume._check_wal)
        await self.commit_meta(changes, f"unlink {self.path(ino)}")
        if self.names.get(ino) == (parent_inode, name):
            del self.names[ino]

    def _drop_link(self, ino: int, rec: Inode, changes: ChangeSet) -> None:
        """One name of ``ino`` is going: its link count drops, and the inode with the last one
        unless it is open (then the last release drops it)."""
        nlink = rec.nlink - 1
        fs = self.tx.files.get(ino)
        if nlink <= 0 and (fs is None or fs.opens == 0):
            changes.inodes[ino] = None
            if fs is not None:
                self.tx.files.pop(ino, None)
        else:
            changes.inodes[ino] = self._committed(ino, rec.with_(nlink=max(nlink, 0), ctime_ns=time.time_ns()))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ino, rec, tf = await self._to_remove(parent_inode, name, ctx)
        if tf is not None or not rec.is_dir:
            raise fail(errno.ENOTDIR)
        if self.transient.in_dir(ino) or await self.tx.list_dir(ino):
            raise fail(errno.ENOTEMPTY)
        changes = ChangeSet(inodes={ino: None}, dirents={(parent_inode, name): None}, expect={(parent_inode, name): ino})
        await self.dir_changed(changes, parent_inode, nlink_delta=-1)
        await self.commit_meta(changes, f"rmdir {self.path(ino)}")
        self.names.pop(ino, None)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx) -> None:
        self.writable(ctx)
        check_name(name_old)
        check_name(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fail(errno.EINVAL)
        src = await self.child(parent_inode_old, name_old)
        if src is None:
            raise fail(errno.ENOENT)
        dst = await self.child(parent_inode_new, name_new)
        if dst is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise fail(errno.EEXIST)
        if dst is not None and dst[0] == src[0]:
            return
        src_ino, src_rec, src_tf = src
        if src_tf is not None or is_transient_name(name_new):
            # journals and -shm files live in memory; a stored name cannot point at them
            if src_tf is None or not is_transient_name(name_new) or (dst is not None and dst[2] is None):
                raise fail(errno.EXDEV)
            self.transient.move(src_tf, parent_inode_new, name_new)
            return
        assert src_rec is not None
        changes = ChangeSet(
            dirents={(parent_inode_old, name_old): None, (parent_inode_new, name_new): src_ino},
            expect={(parent_inode_old, name_old): src_ino, (parent_inode_new, name_new): dst[0] if dst else None},
        )
        if dst is not None:
            dst_ino, dst_rec, _ = dst
            assert dst_rec is not None
            if dst_rec.is_dir:
                if not src_rec.is_dir:
                    raise fail(errno.EISDIR)
                if self.transient.in_dir(dst_ino) or await self.tx.list_dir(dst_ino):
                    raise fail(errno.ENOTEMPTY)
                changes.inodes[dst_ino] = None
            elif src_rec.is_dir:
                raise fail(errno.ENOTDIR)
            else:
                self._drop_link(dst_ino, dst_rec, changes)
        # link counts of the parents follow the subdirectories they gain and lose
        replaced_dir = dst is not None and dst[1] is not None and dst[1].is_dir
        moved_dir = src_rec.is_dir and parent_inode_old != parent_inode_new
        await self.dir_changed(changes, parent_inode_old, nlink_delta=-1 if moved_dir else 0)
        await self.dir_changed(changes, parent_inode_new, nlink_delta=(1 if moved_dir else 0) - (1 if replaced_dir else 0))
        changes.inodes[src_ino] = self._committed(src_ino, src_rec.with_(ctime_ns=time.time_ns()))
        await self.commit_meta(changes, f"rename {self.path(src_ino)}")
        self.names[src_ino] = (parent_inode_new, name_new)
        fs = self.tx.files.get(src_ino)
        if fs is not None:
            fs.label = self.path(src_ino)

    # -- listing ---------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """A directory has no open state here: its listing's handle is its inode. Where the
        kernel allows, ENOSYS says so once and it sends no opendir or releasedir again
        (fuse_caps.dirs_without_open): one round trip less per small transaction, as
        SQLite opens the directory to sync it after creating each journal."""
        if fuse_caps.dirs_without_open():
            raise fail(errno.ENOSYS)
        if not (await self.record(inode)).is_dir:
            raise fail(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """``fh`` is the directory's inode (opendir). An entry's offset is a hash of its
        name (``listing_cookie``), so a listing resumed after other entries came or went
        neither skips nor repeats the rest; a listing that starts over reads the store
        again, one that goes on reuses what its start read while this mount's view has
        not moved since. After a move it reads again: the kernel makes inodes of a
        listing's records (readdirplus), and one older than a commit this mount
        applied would keep its size there (``Transactions.record``)."""
        kept = self.listings.pop(fh, None) if start_id else None
        at = self.tx.snapshot
        listing = kept[1] if kept is not None and kept[0] == at else await self._listing(fh)
        self.listings[fh] = (at, listing)
        while len(self.listings) > LISTINGS_KEPT:
            del self.listings[next(iter(self.listings))]
        for cookie, name, ino, rec in listing[bisect.bisect_right(listing, start_id, key=lambda e: e[0]):]:
            if not pyfuse3.readdir_reply(token, name, self.entry(ino, rec), cookie):
                break

    async def _listing(self, dir_ino: int) -> list[tuple[int, bytes, int, Inode]]:
        rec = await self.record(dir_ino)
        if not rec.is_dir:
            raise fail(errno.ENOTDIR)
        stored = await self.tx.list_dir(dir_ino)
        for name, ino, _ in stored:
            self.names[ino] = (dir_ino, name)
        extra = [(tf.name, tf.ino, tf.record()) for tf in self.transient.in_dir(dir_ino)]
        up = self.names.get(dir_ino, (ROOT_INO, b""))[0]
        dots = [(1, b".", dir_ino, rec), (2, b"..", up, await self.record(up))]
        return dots + sorted((listing_cookie(name), name, ino, r) for name, ino, r in stored + extra)

    async def releasedir(self, fh: int) -> None:
        """Only sent where opendir answered a handle; there is nothing to free."""

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Namespace changes are committed when they happen, so there is nothing to sync:
        ENOSYS tells the kernel so once, and it answers every later fsync of a directory
        (SQLite syncs the directory at every commit) with success itself."""
        raise fail(errno.ENOSYS)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        bs = self.tx.bs
        # a statfs of the embedded store's local directory: too quick to hand to a thread
        total, free = self.tx.volume.store.disk_space() or (1 << 50, 1 << 50)
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = total // bs
        s.f_bfree = s.f_bavail = free // bs
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = 1 << 31
        s.f_namemax = NAME_MAX
        return s

    async def forget(self, inode_list) -> None:
        """Stored inodes need no per-kernel-reference state; transient ones go at unlink."""
