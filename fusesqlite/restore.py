"""``fusesqlite restore PATH --to VERSION|TIME``: a new version in which PATH is as it
was at an earlier version, made while mounts are live.

Nothing is overwritten: the restore is one more commit, and restoring to the version
it replaced undoes it. It is a commit from another host to live mounts: it takes the
write lease of every database it changes (a local writer there waits on SQLITE_BUSY
meanwhile, a transaction running there makes it wait), checks each file's data
version as any commit does (a writer that committed since fails it: run it again)
and refuses a database another mount has in WAL mode (``Volume._check_wal``). Live
mounts follow it as they follow any commit: their readers see the restored file at
their next transaction, never a mix (docs/many-mounts.md).

A file's blocks are read at its record's data version (``dver``), so the restored
record alone would show the old data only until the next write: that write's data
version would also uncover every block written in between. So the restore writes,
at its own version, the old value of every block written after the old data
version (found by a scan of the file's block keys: it costs the file's history),
and zeros for blocks that were holes then. Past one store transaction's worth, the
blocks are staged first, as a big transaction's are (``Volume.begin_staging``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fusesqlite import retention
from fusesqlite.gc import remove_own_stagings
from fusesqlite.history import normalize, version_text, walk
from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.pages import encode_block
from fusesqlite.store.base import StoreError
from fusesqlite.volume import ChangeSet, DataCommit, LeaseHeld, StaleView, Volume

log = logging.getLogger(__name__)

#: encoded block bytes a restore commits in its own transaction (all files together);
#: the files beyond are staged first
INLINE_BYTES = 1 << 20
#: block bytes per staging transaction (as a mount's big transactions: FoundationDB's advice
#: is to keep transactions under 1 MB)
STAGE_BYTES = 1 << 20
#: how long a restore waits for a database's writer on a live mount to finish
LEASE_WAIT_SECONDS = 30.0
#: a restore asks the mounts that hold its files' leases to hold their writers back
#: (``Volume.want_lease``) for this long, and gives them YIELD_SECONDS to do it
WANT_SECONDS = 2.0
YIELD_SECONDS = 0.3

#: a WAL database's log, restored with it: the database alone would lose the frames
#: that were not checkpointed then, and pair a -wal of one version with a file of another
WAL_SUFFIX = b"-wal"


class RestoreError(StoreError):
    """A restore that cannot be done as asked: one line that says what to do."""


Entry = tuple[int, Inode]  # (ino, record)
Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class _FileData:
    rec: Inode
    based_on: int
    blocks: dict[int, bytes]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.blocks.values())


@dataclass
class _Plan:
    changes: ChangeSet = field(default_factory=ChangeSet)
    data: dict[int, _FileData] = field(default_factory=dict)
    #: regular files that exist now and change: their write leases, with their data version now
    leases: dict[int, int] = field(default_factory=dict)
    #: (parent, name) of every file the restore writes, for the WAL check
    names: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Restored:
    path: str
    to: int
    #: the new version, or None when PATH was as it was then already
    version: int | None
    #: the head before the restore: ``--to`` it undoes the restore
    replaced: int
    paths: tuple[str, ...]

    def summary(self) -> str:
        if self.version is None:
            return f"{self.path} is as it was at version {version_text(self.to)} already: nothing restored"
        return (
            f"restored {self.path} to version {version_text(self.to)} as version {version_text(self.version)} "
            f"({len(self.paths)} path(s)); it replaced version {version_text(self.replaced)}: undo with "
            f"fusesqlite restore {self.path} --to {version_text(self.replaced)}"
        )


def restore(volume: Volume, path: str, to: int, *, lease_ttl: float = 10.0,
            progress: Progress | None = None) -> Restored:
    """Make ``path`` of ``volume`` as it was at version ``to``, in one new version."""
    path = normalize(path)
    deadline = time.monotonic() + LEASE_WAIT_SECONDS
    while True:
        head = volume.head()
        plan = _Planner(volume, to, head, progress).plan(path)
        if not plan.changes and not plan.data:
            return Restored(path, to, None, head, ())
        if retention.horizon(volume) > to:  # gc removed some of what the plan read
            raise RestoreError(f"version {version_text(to)} was removed by gc during the restore; pick a newer one")
        volume.wal_names = plan.names.get
        if _take_leases(volume, plan, lease_ttl, deadline):
            break
        log.info("event=restore_replanned path=%s cause=%r", path, "a live mount committed a file the restore read")
    try:
        data = {}
        inline = 0  # block bytes in the commit itself, over every file: the rest is staged
        for ino, fd in plan.data.items():
            staging = None
            if inline + fd.size > INLINE_BYTES:
                staging = volume.begin_staging(ino, volume.author)
                _stage(volume, ino, staging, fd.blocks, plan, lease_ttl, progress)
            else:
                plan.changes.blocks.update({(ino, b): v for b, v in fd.blocks.items()})
                inline += fd.size
            plan.changes.inodes[ino] = fd.rec
            data[ino] = DataCommit(fd.based_on, staging, attributes=True)
        result = volume.commit(plan.changes, data, release_leases=list(plan.leases), oldest_read=to)
    except BaseException:
        remove_own_stagings(volume)
        _release(volume, plan)
        raise
    log.info("event=restored path=%s to=%s version=%s replaced=%s paths=%d", path, version_text(to),
             version_text(result.version), version_text(head), len(plan.paths))
    return Restored(path, to, result.version, head, tuple(plan.paths))


def _take_leases(volume: Volume, plan: _Plan, ttl: float, deadline: float) -> bool:
    """Take the write leases ``plan`` needs, each on the data version the plan read; False
    (none held) if a file was committed since: a live writer went on, plan again. Once
    the restore holds a lease, that file's writers wait for it."""
    taken: list[int] = []
    now = time.time()
    held = [ino for ino in plan.leases
            if (lease := volume.lease(ino, idle=True)) is not None and lease.owner != volume.author and lease.live(now)]
    for ino in held:
        # a mount keeps its lease idle between transactions, and taking it while one runs
        # there fails that transaction (an I/O error for its app): first ask it to hold its
        # next writers back once the running transaction ends (coherence/, RESERVED proxy)
        volume.want_lease(ino, WANT_SECONDS)
    if held:
        time.sleep(YIELD_SECONDS)
    try:
        for ino, dver in sorted(plan.leases.items()):
            while True:
                try:
                    volume.acquire_lease(ino, ttl, dver)
                    break
                except LeaseHeld as e:
                    if time.monotonic() > deadline:
                        raise RestoreError(f"{_name(plan, ino)} is being written on a live mount ({e}); "
                                           "run the restore again once it is done") from None
                    time.sleep(0.1)
                except StaleView:
                    _release(volume, plan, taken)
                    if time.monotonic() > deadline:
                        raise RestoreError(f"{_name(plan, ino)} is committed on a live mount without pause; "
                                           "run the restore again once it is quieter") from None
                    return False
            taken.append(ino)
    except BaseException:
        _release(volume, plan, taken)
        raise
    return True


def _release(volume: Volume, plan: _Plan, inos: list[int] | None = None) -> None:
    inos = list(plan.leases) if inos is None else inos
    if not inos:
        return
    try:
        volume.commit(ChangeSet(), release_leases=inos)
    except StoreError as e:  # they expire (lease_ttl)
        log.warning("event=restore_lease_release_failed inos=%s cause=%s", inos, e)


def _name(plan: _Plan, ino: int) -> str:
    known = plan.names.get(ino)
    return known[1].decode(errors="replace") if known else f"inode {ino}"


def _stage(volume: Volume, ino: int, version: int, blocks: dict[int, bytes], plan: _Plan, ttl: float,
           progress: Progress | None) -> None:
    """Stage ``blocks`` in transactions of about STAGE_BYTES, renewing the leases as it goes."""
    chunk: dict[int, bytes] = {}
    size = done = 0
    total = len(blocks)
    last_renewal = time.monotonic()
    for block_no in sorted(blocks):
        chunk[block_no] = blocks[block_no]
        size += len(blocks[block_no])
        if size >= STAGE_BYTES or len(chunk) == total - done:
            volume.stage_blocks(ino, version, chunk, volume.author)
            done += len(chunk)
            chunk, size = {}, 0
            if progress is not None:
                progress(f"staging {_name(plan, ino)}", done, total)
            if time.monotonic() - last_renewal > ttl / 3:
                volume.renew_leases(list(plan.leases), ttl)
                last_renewal = time.monotonic()


class _Planner:
    """What the restore writes: every entry under PATH as it was at ``then``, against
    what the volume holds at ``now``."""

    def __init__(self, volume: Volume, then: int, now: int, progress: Progress | None) -> None:
        self.volume = volume
        self.then = then
        self.now = now
        self.progress = progress
        self.p = _Plan()
        self.zero = bytes(volume.block_size)

    def plan(self, path: str) -> _Plan:
        if path == "/":
            root_then = self.volume.read_inode(ROOT_INO, self.then)
            root_now = self.volume.read_inode(ROOT_INO, self.now)
            assert root_then is not None and root_now is not None
            self._same(ROOT_INO, 0, b"", root_then, root_now, "/")
            return self.p
        parent_path, _, name = path.rpartition("/")
        parent = walk(self.volume, parent_path or "/", self.now)
        if parent is None or not parent[1].is_dir:
            raise RestoreError(f"{parent_path} is not a directory of the volume now: restore it first "
                               f"(fusesqlite restore {parent_path} --to {version_text(self.then)})")
        parent_then = walk(self.volume, parent_path or "/", self.then)
        then = self._lookup(parent_then, name.encode(errors="surrogateescape"), self.then)
        now = self._lookup(parent, name.encode(errors="surrogateescape"), self.now)
        if then is None and now is None:
            raise RestoreError(f"{path} exists neither now nor at version {version_text(self.then)}")
        self._entry(parent[0], name.encode(errors="surrogateescape"), then, now, path, top=True)
        if then is not None and then[1].is_reg or now is not None and now[1].is_reg:
            wal = name.encode(errors="surrogateescape") + WAL_SUFFIX
            self._entry(parent[0], wal, self._lookup(parent_then, wal, self.then),
                        self._lookup(parent, wal, self.now), path + "-wal", top=True)
        return self.p

    def _lookup(self, parent: Entry | None, name: bytes, version: int) -> Entry | None:
        return None if parent is None else self.volume.lookup(parent[0], name, version)

    def _entry(self, parent: int, name: bytes, then: Entry | None, now: Entry | None, path: str,
               top: bool = False) -> None:
        if then is not None and now is not None and then[0] == now[0]:
            self._same(then[0], parent, name, then[1], now[1], path)
            return
        if now is not None:
            self._remove(parent, name, now, path, top)
        if then is not None:
            self._create(parent, name, then, path, top)

    def _same(self, ino: int, parent: int, name: bytes, then: Inode, now: Inode, path: str) -> None:
        if then.is_dir:
            if then != now:
                self.p.changes.inodes[ino] = then
                self._touched(path)
            children_then = {n: (i, r) for n, i, r in self.volume.list_dir(ino, self.then)}
            children_now = {n: (i, r) for n, i, r in self.volume.list_dir(ino, self.now)}
            prefix = path.rstrip("/") + "/"
            for child in sorted(children_then.keys() | children_now.keys()):
                self._entry(ino, child, children_then.get(child), children_now.get(child),
                            prefix + child.decode(errors="surrogateescape"))
            return
        self.p.names[ino] = (parent, name)
        if then.is_reg and then.dver != now.dver:
            self._data(ino, then, now, path)
            return
        if _attributes(then) != _attributes(now):
            self.p.changes.inodes[ino] = then._replace(ctime_ns=time.time_ns())
            if now.is_reg:
                self.p.leases[ino] = now.dver
            self._touched(path)

    def _remove(self, parent: int, name: bytes, now: Entry, path: str, top: bool) -> None:
        ino, rec = now
        self.p.changes.dirents[(parent, name)] = None
        self.p.changes.expect.setdefault((parent, name), ino)
        self._touched(path)
        if rec.is_dir:
            prefix = path.rstrip("/") + "/"
            for child, child_ino, child_rec in self.volume.list_dir(ino, self.now):
                self._remove(ino, child, (child_ino, child_rec), prefix + child.decode(errors="surrogateescape"),
                             False)
            self.p.changes.inodes[ino] = None
            if top:
                self._parent_links(parent, -1)
            return
        self.p.names[ino] = (parent, name)
        if rec.is_reg:
            self.p.leases[ino] = rec.dver
        self.p.changes.inodes[ino] = rec._replace(nlink=rec.nlink - 1) if rec.nlink > 1 else None

    def _create(self, parent: int, name: bytes, then: Entry, path: str, top: bool) -> None:
        ino, rec = then
        self.p.changes.dirents[(parent, name)] = ino
        self.p.changes.expect.setdefault((parent, name), None)
        if rec.is_dir:
            self.p.changes.inodes[ino] = rec
            self._touched(path)
            prefix = path.rstrip("/") + "/"
            for child, child_ino, child_rec in self.volume.list_dir(ino, self.then):
                self._create(ino, child, (child_ino, child_rec), prefix + child.decode(errors="surrogateescape"),
                             False)
            if top:
                self._parent_links(parent, +1)
            return
        self.p.names[ino] = (parent, name)
        now = self.volume.read_inode(ino, self.now)  # linked elsewhere, or removed since
        if rec.is_reg:
            self._data(ino, rec, now, path)
        else:
            self.p.changes.inodes[ino] = rec
            self._touched(path)

    def _parent_links(self, parent: int, delta: int) -> None:
        """A directory made or removed under a parent the restore leaves as it is: its link count."""
        rec = self.p.changes.inodes.get(parent) or self.volume.read_inode(parent, self.now)
        assert rec is not None
        self.p.changes.inodes[parent] = rec._replace(nlink=rec.nlink + delta)

    def _data(self, ino: int, then: Inode, now: Inode | None, path: str) -> None:
        """A regular file's record and blocks as they were at ``then``'s data version."""
        bs = self.volume.block_size
        end = -(-then.size // bs)
        changed: set[int] = set()
        top = then.hwm
        for n, (block_no, version) in enumerate(self.volume.blocks_written(ino, None), 1):
            top = max(top, block_no + 1)
            if block_no < end and version > then.dver:
                changed.add(block_no)
            if self.progress is not None and n % 10_000 == 0:
                self.progress(f"reading the history of {path}", n, 0)
        old = self.volume.read_blocks(ino, changed, then.dver) if changed else {}
        blocks = {b: old.get(b) or encode_block(self.zero, ino, b) for b in changed}
        if now is not None:  # as it was then already (an earlier restore): nothing to write
            current = self.volume.read_blocks(ino, changed, now.dver) if changed else {}
            blocks = {b: v for b, v in blocks.items() if (current.get(b) or encode_block(self.zero, ino, b)) != v}
            if not blocks and _attributes(then) == _attributes(now):
                return
        rec = then._replace(hwm=max(top, now.hwm if now is not None else 0), ctime_ns=time.time_ns())
        self.p.data[ino] = _FileData(rec, now.dver if now is not None else 0, blocks)
        if now is not None:
            self.p.leases[ino] = now.dver
        self._touched(path)

    def _touched(self, path: str) -> None:
        if path not in self.p.paths:
            self.p.paths.append(path)


def _attributes(rec: Inode) -> Inode:
    """What a restore makes as it was: everything but the times of access and change,
    and where the blocks are (a restore writes the same bytes at a new data version)."""
    return rec._replace(atime_ns=0, ctime_ns=0, hwm=0, dver=0)
