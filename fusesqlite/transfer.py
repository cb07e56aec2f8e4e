"""``fusesqlite export`` and ``fusesqlite import``: files between a volume and a local
directory (docs/history.md, "Export and import").

Export writes a version's files as a mount of that version serves them (contents,
sizes, modes, times; owners when run as root), into a new directory beside the
destination that is renamed into place at the end, so an interrupted export leaves
no half-written tree. It registers as a reader of its version for its duration
(retention.py), so gc keeps what it reads.

Import puts a local tree into the volume as one commit: the files' blocks are staged
first (``Volume.begin_staging``, 1 MiB a transaction, so the memory used is one chunk
whatever the size), then one commit publishes every file and directory entry at once:
live mounts see the whole tree appear, or nothing. An interrupted import removes its
stagings (gc reclaims those of a killed one), and nothing of it is visible.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fusesqlite import retention
from fusesqlite.gc import remove_own_stagings
from fusesqlite.history import normalize, version_text, walk
from fusesqlite.inodes import Inode
from fusesqlite.pages import decode_rows, encode_block
from fusesqlite.store.base import StoreError
from fusesqlite.volume import ChangeSet, DataCommit, Volume

log = logging.getLogger("fusesqlite.transfer")

#: blocks read per store transaction by export, and staged per transaction by import (1 MiB)
CHUNK_BLOCKS = 256

Progress = Callable[[str, int, int], None]


class TransferError(StoreError):
    """An export or import that cannot be done as asked: one line that says what to do."""


# -- export ----------------------------------------------------------------------------
@dataclass
class Exported:
    files: int = 0
    directories: int = 0
    bytes: int = 0


def export(volume: Volume, path: str, dest: str, version: int, progress: Progress | None = None) -> Exported:
    """Write ``path`` of ``volume`` at ``version`` (a file or a directory) to ``dest``,
    which must not exist yet."""
    path = normalize(path)
    if os.path.lexists(dest):
        raise TransferError(f"{dest} exists; name a new path (export never writes over files)")
    collected = retention.register(volume, version, f"export to {dest}", "export")
    try:
        if collected > version:
            raise TransferError(f"version {version_text(version)} was removed by gc meanwhile")
        top = walk(volume, path, version)
        if top is None:
            raise TransferError(f"volume {volume.name!r} has no {path} at version {version_text(version)}")
        parent = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(parent):
            raise TransferError(f"{parent} is not a directory; create it first")
        tmp = os.path.join(parent, f".{os.path.basename(dest)}.fusesqlite-export-{os.getpid()}")
        done = Exported()
        total = _tree_bytes(volume, top, version)
        writer = _Exporter(volume, version, done, total, progress)
        try:
            writer.entry(top[0], top[1], tmp)
            if retention.horizon(volume) > version:  # gc ignored the registration: it expired
                raise TransferError(f"version {version_text(version)} was removed by gc during the export")
            os.rename(tmp, dest)
        except BaseException:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        return done
    finally:
        retention.unregister(volume)


def _tree_bytes(volume: Volume, top: tuple[int, Inode], version: int) -> int:
    ino, rec = top
    if not rec.is_dir:
        return rec.size if rec.is_reg else 0
    return sum(_tree_bytes(volume, (i, r), version) for _, i, r in volume.list_dir(ino, version))


class _Exporter:
    def __init__(self, volume: Volume, version: int, done: Exported, total: int, progress: Progress | None) -> None:
        self.volume, self.version, self.done, self.total, self.progress = volume, version, done, total, progress
        self.root = os.geteuid() == 0
        self.renewed = time.monotonic()

    def entry(self, ino: int, rec: Inode, target: str) -> None:
        if rec.is_dir:
            os.mkdir(target, 0o700)
            self.done.directories += 1
            for name, child, child_rec in self.volume.list_dir(ino, self.version):
                self.entry(child, child_rec, os.path.join(target, os.fsdecode(name)))
        elif rec.is_reg:
            self._file(ino, rec, target)
            self.done.files += 1
        elif stat.S_ISLNK(rec.mode):
            os.symlink(os.fsdecode(rec.target), target)
        else:  # a FIFO or device node: as the mount shows it
            os.mknod(target, rec.mode, rec.rdev)
        self._attributes(rec, target)

    def _file(self, ino: int, rec: Inode, target: str) -> None:
        bs = self.volume.block_size
        blocks = -(-rec.size // bs)
        with open(target, "wb") as f:
            for first in range(0, blocks, CHUNK_BLOCKS):
                count = min(CHUNK_BLOCKS, blocks - first)
                run = self.volume.read_run(ino, first, first + count, rec.dver)
                data = decode_rows(run, ino, first, count, rec.dver, bs)
                f.write(data[: rec.size - first * bs] if first + count == blocks else data)
                self.done.bytes += min(count * bs, rec.size - first * bs)
                self._tick()
            f.truncate(rec.size)

    def _attributes(self, rec: Inode, target: str) -> None:
        if self.root:
            os.chown(target, rec.uid, rec.gid, follow_symlinks=False)
        if not stat.S_ISLNK(rec.mode):
            os.chmod(target, stat.S_IMODE(rec.mode))
        os.utime(target, ns=(rec.atime_ns, rec.mtime_ns), follow_symlinks=False)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress("exporting", self.done.bytes, self.total)
        if time.monotonic() - self.renewed > retention.REGISTER_EVERY:
            retention.register(self.volume, self.version, "export", "export")
            self.renewed = time.monotonic()


# -- import ----------------------------------------------------------------------------
@dataclass
class Imported:
    version: int = 0
    files: int = 0
    directories: int = 0
    bytes: int = 0


@dataclass
class _Plan:
    changes: ChangeSet = field(default_factory=ChangeSet)
    data: dict[int, DataCommit] = field(default_factory=dict)
    stagings: dict[int, int] = field(default_factory=dict)


def import_tree(volume: Volume, source: str, dest: str = "/", progress: Progress | None = None) -> Imported:
    """Put what ``source`` (a local directory) holds into the volume's directory ``dest``
    (made if missing, its parent must exist), as one commit. Names that exist in
    ``dest`` already are refused before anything is written."""
    if not os.path.isdir(source):
        raise TransferError(f"{source} is not a directory")
    dest = normalize(dest)
    head = volume.head()
    plan = _Plan()
    done = Imported()
    target = walk(volume, dest, head)
    if target is None:
        parent_path, _, name = dest.rpartition("/")
        parent = walk(volume, parent_path or "/", head)
        if parent is None or not parent[1].is_dir:
            raise TransferError(f"{parent_path} is not a directory of the volume; create it first")
        ino = volume.allocate_inodes(1)[0]
        st = os.stat(source)
        rec = Inode.new(stat.S_IFDIR, st.st_mode, st.st_uid, st.st_gid, nlink=2)
        key = (parent[0], name.encode(errors="surrogateescape"))
        plan.changes.inodes[ino] = rec
        plan.changes.dirents[key] = ino
        plan.changes.expect[key] = None
        _links(volume, plan, parent[0], +1, head)
        target = (ino, rec)
        done.directories += 1
    elif not target[1].is_dir:
        raise TransferError(f"{dest} is not a directory of the volume")
    else:
        for name in sorted(os.listdir(source)):
            if volume.lookup(target[0], os.fsencode(name), head) is not None:
                raise TransferError(f"{dest.rstrip('/')}/{name} exists in the volume; import into a new directory")
    total = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(source) for f in fs)
    try:
        _Importer(volume, plan, done, total, progress).directory(source, target[0])
        done.version = volume.commit(plan.changes, plan.data).version
    except BaseException:
        remove_own_stagings(volume)
        raise
    log.info("event=imported source=%s dest=%s version=%s files=%d bytes=%d", source, dest,
             version_text(done.version), done.files, done.bytes)
    return done


def _links(volume: Volume, plan: _Plan, parent: int, delta: int, head: int) -> None:
    rec = plan.changes.inodes.get(parent) or volume.read_inode(parent, head)
    assert rec is not None
    plan.changes.inodes[parent] = rec._replace(nlink=rec.nlink + delta)


#: encoded bytes an import puts in its commit itself (small files); the rest is staged
INLINE_BYTES = 1 << 20
#: how often an import refreshes its stagings' heartbeats (gc.STAGING_TIMEOUT is 120 s)
HEARTBEAT_SECONDS = 30.0


class _Importer:
    def __init__(self, volume: Volume, plan: _Plan, done: Imported, total: int, progress: Progress | None) -> None:
        self.volume, self.plan, self.done, self.total, self.progress = volume, plan, done, total, progress
        self.inos: Iterator[int] = iter(())
        self.inline = 0
        self.beat = time.monotonic()

    def _ino(self) -> int:
        ino = next(self.inos, None)
        if ino is None:
            self.inos = iter(self.volume.allocate_inodes())
            ino = next(self.inos)
        return ino

    def directory(self, source: str, parent: int) -> None:
        subdirs = 0
        with os.scandir(source) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                ino = self._ino()
                key = (parent, os.fsencode(entry.name))
                if stat.S_ISDIR(st.st_mode):
                    self.plan.changes.inodes[ino] = _record(st, nlink=2)
                    self.directory(entry.path, ino)
                    subdirs += 1
                    self.done.directories += 1
                elif stat.S_ISREG(st.st_mode):
                    self._file(entry.path, ino, st)
                    self.done.files += 1
                elif stat.S_ISLNK(st.st_mode):
                    target = os.fsencode(os.readlink(entry.path))
                    self.plan.changes.inodes[ino] = _record(st)._replace(size=len(target), target=target)
                else:
                    log.warning("event=import_skipped path=%s cause=%r", entry.path, "not a file, directory or link")
                    continue
                self.plan.changes.dirents[key] = ino
                self.plan.changes.expect[key] = None
        if subdirs:
            _links(self.volume, self.plan, parent, subdirs, self.volume.head())

    def _file(self, path: str, ino: int, st: os.stat_result) -> None:
        """Small files go in the commit itself while INLINE_BYTES last; the others are staged."""
        bs = self.volume.block_size
        blocks = -(-st.st_size // bs)
        staging = None
        with open(path, "rb") as f:
            for first in range(0, blocks, CHUNK_BLOCKS):
                chunk = f.read(CHUNK_BLOCKS * bs)
                encoded = {}
                for i in range(0, len(chunk), bs):
                    block = chunk[i : i + bs]
                    encoded[first + i // bs] = encode_block(block + bytes(bs - len(block)), ino, first + i // bs)
                size = sum(len(v) for v in encoded.values())
                if staging is None and blocks <= CHUNK_BLOCKS and self.inline + size <= INLINE_BYTES:
                    self.plan.changes.blocks.update({(ino, b): v for b, v in encoded.items()})
                    self.inline += size
                else:
                    if staging is None:
                        staging = self.plan.stagings[ino] = self.volume.begin_staging(ino, self.volume.author)
                    self.volume.stage_blocks(ino, staging, encoded, self.volume.author)
                self.done.bytes += len(chunk)
                self._tick()
        self.plan.changes.inodes[ino] = _record(st)._replace(size=st.st_size, hwm=blocks)
        self.plan.data[ino] = DataCommit(0, staging)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress("importing", self.done.bytes, self.total)
        if time.monotonic() - self.beat > HEARTBEAT_SECONDS:  # the stagings of files done are still in use
            for ino, staging in self.plan.stagings.items():
                self.volume.stage_blocks(ino, staging, {}, self.volume.author)
            self.beat = time.monotonic()


def _record(st: os.stat_result, nlink: int = 1) -> Inode:
    return Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, nlink=nlink, size=0, atime_ns=st.st_atime_ns,
                 mtime_ns=st.st_mtime_ns, ctime_ns=time.time_ns())
