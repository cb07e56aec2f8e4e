"""State shared by every kind of file: handles, names for log lines, attributes."""
from __future__ import annotations

import errno
import logging
import os
import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3
import trio

from fusesqlite.coherence import WATCH_LIMIT, Coherence
from fusesqlite.file_state import FileState
from fusesqlite.fs.transient import TransientFile, TransientFiles
from fusesqlite.inodes import NAME_MAX, ROOT_INO, Inode, is_transient_name
from fusesqlite.store.base import StoreError
from fusesqlite.transactions import Transactions

if TYPE_CHECKING:
    from fusesqlite.own_mount import OwnMount

log = logging.getLogger("fusesqlite.fs")

#: the kernel may cache attributes and entries this long; every change goes
#: through this mount's kernel, which updates its caches itself
ATTR_TIMEOUT = 1.0
#: the kernel's page: what notify_store fills at a time
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: how long the kernel may remember that a journal name does not exist
NEGATIVE_TIMEOUT = 60.0
#: ... and that a stored name does not exist
STORED_NEGATIVE_TIMEOUT = 0.5
#: longest a failed commit's reply waits for the kernel to drop the pages it wrote
ROLLBACK_INVALIDATE_SECONDS = 1.0


@dataclass
class Handle:
    ino: int
    file: FileState | TransientFile
    #: opened by this mount's own lock proxy (coherence/): its fsync only flushes
    proxy: bool = False
    #: a journal opened through the page cache: its writes come from the kernel's write-back
    cached: bool = False


def fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise fail(errno.ENAMETOOLONG)


class FsBase(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_acl = False

    def __init__(
        self, tx: Transactions, mountpoint: str, own_mount: OwnMount, *, lease_seconds: float = 10.0,
        follow: bool = True, read_only: bool = False, writeback_cache: bool = True, watch_limit: int = WATCH_LIMIT,
    ) -> None:
        super().__init__()
        self.tx = tx
        tx.on_rollback = self.rolled_back
        self.mountpoint = mountpoint.encode()
        self.read_only = read_only
        #: read by pyfuse3 at the kernel handshake
        self.enable_writeback_cache = self.writeback_cache = writeback_cache
        #: files another mount changed while open here: with the writeback cache the
        #: kernel keeps its own size and times of them until the last local close
        self.stale_in_kernel: set[int] = set()
        #: databases whose transaction is being committed (FileOps.commit_journal)
        self.committing: set[int] = set()
        #: what this daemon does to its own mount (opens, locks, syncfs: never itself)
        self.own_mount = own_mount
        #: other mounts: leases, following their commits, SQLite's locks here
        self.coherence = Coherence(tx, self, own_mount, lease_seconds, follow=follow, watch_limit=watch_limit)
        self.transient = TransientFiles()
        self.handles: dict[int, Handle] = {}
        #: directory inode -> (the snapshot it was read at, its entries), for readdir's next chunk
        self.listings: dict[int, tuple[int, list[tuple[int, bytes, int, Inode]]]] = {}
        self._next_fh = 1
        #: last known (parent, name) of each inode: finds a database's journal, names files in logs
        self.names: dict[int, tuple[int, bytes]] = {}
        #: requests answered, by operation (metrics.py)
        self.requests: Counter[str] = Counter()
        # the commits' WAL check (Volume._check_wal) names this mount's files through it
        tx.volume.wal_names = self.names.get

    # -- handles and names -------------------------------------------------------------
    def new_handle(self, ino: int, file: FileState | TransientFile, proxy: bool = False, cached: bool = False) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(ino, file, proxy=proxy, cached=cached)
        return fh

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise fail(errno.EBADF)
        return h

    def child_path(self, parent: int, name: bytes) -> str:
        return self.path(parent).rstrip("/") + "/" + name.decode(errors="replace")

    def known_inodes(self) -> Collection[int]:
        """Every inode this mount named to the kernel (it keeps no count of the kernel's
        references: an inode the kernel forgot stays, and is followed needlessly)."""
        return self.names.keys()

    def abs_path(self, ino: int) -> bytes | None:
        """Where ``ino`` is on this host, if this mount knows it."""
        parts: list[bytes] = []
        while ino != ROOT_INO and len(parts) < 64:
            known = self.names.get(ino)
            if known is None:
                return None
            ino, name = known
            parts.append(name)
        return b"/".join([self.mountpoint.rstrip(b"/"), *reversed(parts)])

    def writable(self, ctx: pyfuse3.RequestContext) -> None:
        """A read-only mount refuses changes (its own lock proxy may still open files read-write).

        The kernel names the calling thread, not the process: the proxy's opens come
        from a thread of the own-mount helper process (one per request), so the
        thread is looked for there. Refused, the proxy could take no lock, and moves
        would run under readers' feet.
        """
        if self.read_only and not self._own_thread(ctx.pid):
            raise fail(errno.EROFS)

    def _own_thread(self, tid: int) -> bool:
        """``tid`` is a thread of this daemon or of its own-mount helper."""
        pids = ["self"]
        helper = getattr(self, "own_mount", None)
        if helper is not None:
            pids.append(str(helper.process.pid))
        return any(os.path.exists(f"/proc/{pid}/task/{tid}") for pid in pids)

    def path(self, ino: int) -> str:
        """Best-effort path inside the volume, for log lines."""
        parts: list[str] = []
        while ino != ROOT_INO and len(parts) < 64:
            known = self.names.get(ino)
            if known is None:
                parts.append(f"<ino {ino}>")
                break
            ino, name = known
            parts.append(name.decode(errors="replace"))
        return "/" + "/".join(reversed(parts))

    # -- attributes --------------------------------------------------------------------
    def entry(self, ino: int, rec: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        # Transient files too: where one changes behind the kernel's back (a failed
        # commit empties its journal while unlink reports the error) the kernel is told
        # (FileOps.transient_failed).
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = rec.mode
        e.st_nlink = rec.nlink
        e.st_uid = rec.uid
        e.st_gid = rec.gid
        e.st_rdev = rec.rdev
        e.st_size = rec.size
        e.st_blksize = self.tx.bs
        e.st_blocks = -(-rec.size // 512)
        e.st_atime_ns = rec.atime_ns
        e.st_mtime_ns = rec.mtime_ns
        e.st_ctime_ns = rec.ctime_ns
        return e

    @staticmethod
    def negative_entry(name: bytes, cacheable: bool = True) -> pyfuse3.EntryAttributes:
        """"No such file", which the kernel may remember: long for journals (only this
        mount creates them), briefly for stored names (another mount may create one,
        and its invalidation can cross this answer on its way to the kernel)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        if cacheable:
            e.entry_timeout = NEGATIVE_TIMEOUT if is_transient_name(name) else STORED_NEGATIVE_TIMEOUT
        else:
            e.entry_timeout = 0.0
        return e

    async def record(self, ino: int) -> Inode:
        tf = self.transient.by_ino.get(ino)
        if tf is not None:
            return tf.record()
        rec = await self.tx.record(ino)
        if rec is None:
            raise fail(errno.ENOENT)
        return rec

    async def child(self, parent: int, name: bytes) -> tuple[int, Inode | None, TransientFile | None] | None:
        """What ``name`` in ``parent`` is: (ino, stored record or None, transient file or None)."""
        if is_transient_name(name):  # never in the store: no store round trip
            tf = self.transient.get(parent, name)
            return None if tf is None else (tf.ino, None, tf)
        found = await self.tx.lookup(parent, name)
        if found is None:
            return None
        self.names[found[0]] = (parent, name)
        self.coherence.known(found[0])
        return found[0], found[1], None

    async def resolve(self, path: bytes) -> int | None:
        """Inode of an absolute path on this mount (None if elsewhere or missing)."""
        prefix = self.mountpoint.rstrip(b"/") + b"/"
        if not path.startswith(prefix):
            return None
        ino = ROOT_INO
        for part in path[len(prefix):].split(b"/"):
            if not part:
                continue
            found = await self.child(ino, part)
            if found is None:
                return None
            ino = found[0]
        return ino

    # -- kernel cache ------------------------------------------------------------------
    def invalidate(self, ino: int) -> None:
        """Drop the kernel's cached pages and attributes of ``ino``.

        From a separate thread: the kernel may wait on locks held by the request
        being served, so notifying from the handler itself can deadlock.
        """

        threading.Thread(target=_moved_in_kernel, args=(ino, 0, b""), name="invalidate", daemon=True).start()

    async def rolled_back(self, ino: int) -> None:
        """A failed commit reverted ``ino``: the kernel's pages of it still hold what the
        failed transaction wrote, and SQLite's next transaction (an app retrying at once)
        would read them, and could commit on top of them. So they go before the failure
        is reported. Waited for at most ROLLBACK_INVALIDATE_SECONDS: from a write
        request, the kernel may wait for that very request (a dirty page's write-back);
        the invalidation then ends on its own once the request is answered."""
        with trio.move_on_after(ROLLBACK_INVALIDATE_SECONDS):
            await trio.to_thread.run_sync(_moved_in_kernel, ino, 0, b"", abandon_on_cancel=True)
        self.coherence.reverted(ino)

    async def moved(self, ino: int, rec: Inode | None) -> None:
        """This mount's view of ``ino`` moved to another mount's commit: bring the kernel along.

        Its cached pages and attributes go. With the writeback cache the kernel keeps
        its own size and times of a regular file while it holds the inode, whatever
        getattr says: a file that grew is told its new end (its last page is stored
        in the kernel's cache), and the inode is forgotten (its entry invalidated)
        so that the kernel reads size and times afresh, at once if nothing here has
        it open, else at the last local close. Meanwhile SQLite is right either way:
        it takes a database's size from its header, which only has to fit the file.
        """
        tail, at = b"", 0
        if self.writeback_cache and rec is not None and rec.is_reg and rec.size:
            at = (rec.size - 1) // PAGE_SIZE * PAGE_SIZE
            fs = self.tx.files.get(ino) or FileState(ino, rec, self.path(ino))
            try:
                tail = bytes(await self.tx.read(fs, at, rec.size - at))
            except StoreError as e:
                log.warning("event=tail_read_failed ino=%d cause=%s", ino, e)
        await trio.to_thread.run_sync(_moved_in_kernel, ino, at, tail)
        if self.writeback_cache:
            open_here = self.tx.files.get(ino)
            if open_here is not None and open_here.opens:
                self.stale_in_kernel.add(ino)
            else:
                self.forget_in_kernel(ino)

    def forget_in_kernel(self, ino: int) -> None:
        """Make the kernel look ``ino`` up afresh (its next lookup reads size and times)."""
        self.stale_in_kernel.discard(ino)
        known = self.names.get(ino)
        if known is not None:
            self.invalidate_entry(*known)

    @staticmethod
    def invalidate_entry(parent: int, name: bytes) -> None:
        """Another mount changed ``name`` in ``parent``: the kernel must ask again."""
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


def _moved_in_kernel(ino: int, at: int, tail: bytes) -> None:
    """Drop the kernel's pages and attributes of ``ino``, then store ``tail`` at ``at``
    (which sets the kernel's size to at least its end). In a worker thread: the
    kernel may wait on requests this loop serves."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
        if tail:
            pyfuse3.notify_store(ino, at, tail)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTCONN):
            log.warning("event=invalidate_failed ino=%d cause=%s", ino, e)
