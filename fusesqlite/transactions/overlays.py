"""Overlays: the blocks written to a file since its last commit, read before the
store's, as a page cache would; reads of committed blocks through the block cache
and read-ahead."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from fusesqlite.file_state import FileState
from fusesqlite.inodes import Inode
from fusesqlite.pages import CorruptBlock, decode_block
from fusesqlite.transactions.base import BlockCorrupt
from fusesqlite.transactions.view import MountView

log = logging.getLogger("fusesqlite.transactions")


class Overlays(MountView):
    """Reads and writes of stored files' blocks on this mount."""

    # -- file data ---------------------------------------------------------------------
    def state(self, ino: int, rec: Inode, label: str) -> FileState:
        fs = self.files.get(ino)
        if fs is None:
            fs = self.files[ino] = FileState(ino, rec, label)
            self._view(ino, rec.dver)  # the kernel holds pages of it from now on
        return fs

    def forget_state(self, fs: FileState) -> None:
        """Drop a FileState that has no opens and nothing uncommitted."""
        if fs.opens == 0 and not fs.changed and not fs.committing and self.files.get(fs.ino) is fs:
            del self.files[fs.ino]

    async def blocks(self, fs: FileState, block_nos: Iterable[int]) -> dict[int, bytes | bytearray]:
        """Current content of blocks (overlay, then cache, then store at the snapshot).

        Blocks come from the store in a worker thread while commits and stagings
        go on; when one of those changed the file's cached blocks meanwhile, the
        loaded content may be older than theirs, so the blocks are looked up again.
        """
        out: dict[int, bytes | bytearray] = {}
        wanted = list(block_nos)
        for _ in range(3):
            missing = self._known(fs, wanted, out)
            if not missing:
                break
            loaded, settled = await self._fetch(fs, missing)
            for b, data in loaded.items():
                current = fs.dirty.get(b)
                if current is None:
                    current = fs.committing.get(b)
                out[b] = data if current is None else current
            if settled:
                break
            wanted = missing
        return out

    def _known(self, fs: FileState, block_nos: Iterable[int], out: dict[int, bytes | bytearray]) -> list[int]:
        """Put the blocks known without the store into ``out``; return the others."""
        missing = []
        hwm = max(fs.record.hwm, fs.staged_hwm)
        dirty, committing, cache, ino = fs.dirty, fs.committing, self.cache, fs.ino
        for b in block_nos:
            data = dirty.get(b)
            if data is None:
                data = committing.get(b)
            if data is None:
                data = cache.get(ino, b)
            if data is None:
                if b >= hwm:
                    data = self.zero_block
                else:
                    missing.append(b)
                    continue
            out[b] = data
        return missing

    async def _fetch(self, fs: FileState, missing: list[int]) -> tuple[dict[int, bytes], bool]:
        """Committed content of ``missing``, and whether no commit or staging changed
        the file's blocks while it was loaded."""
        gen, mark = fs.gen, self.cache.mark()
        loaded = await self.run(self._load, fs.ino, fs.label, missing, fs.read_version)
        if gen == fs.gen:
            for b, data in loaded.items():
                self.cache.fill(fs.ino, b, data, mark)
        return loaded, self.cache.unchanged_since(fs.ino, mark)

    def _load(self, ino: int, label: str, block_nos: list[int], version: int) -> dict[int, bytes]:
        values = self.volume.read_blocks(ino, block_nos, version)
        out = {}
        for b in block_nos:
            value = values.get(b)
            if value is None:
                out[b] = self.zero_block
                continue
            try:
                out[b] = bytes(decode_block(value, ino, b, self.bs))
            except CorruptBlock as e:
                log.error("event=block_corrupt path=%s ino=%d block=%d version<=%d cause=%s", label, ino, b, version, e)
                raise BlockCorrupt(f"{label}: block {b} failed its checksum") from None
        return out

    async def read(self, fs: FileState, offset: int, length: int) -> bytes | memoryview:
        end = min(offset + length, fs.size)
        if offset >= end:
            return b""
        bs = self.bs
        first, last = offset // bs, (end - 1) // bs
        self.readahead.note_read(fs, first, last, bs)
        ahead = await self.readahead.read(fs, offset, end, bs)
        if ahead is not None:
            return ahead
        content = await self.blocks(fs, range(first, last + 1))
        if first == last:
            return bytes(content[first][offset - first * bs : end - first * bs])
        # one copy: only the partial first and last blocks are sliced
        return b"".join([
            content[first][offset - first * bs :],
            *(content[b] for b in range(first + 1, last)),
            content[last][: end - last * bs],
        ])

    async def write(self, fs: FileState, offset: int, data: bytes) -> None:
        if not data:
            return
        self.written_bytes += len(data)
        if offset > fs.size:
            await self._grow(fs, offset)
        bs = self.bs
        end = offset + len(data)
        first, last = offset // bs, (end - 1) // bs
        partial_blocks = [b for b in (first, last) if max(offset, b * bs) > b * bs or min(end, (b + 1) * bs) < (b + 1) * bs]
        bases = await self.blocks(fs, dict.fromkeys(partial_blocks)) if partial_blocks else {}
        view = memoryview(data)
        for b in range(first, last + 1):
            lo, hi = max(offset, b * bs), min(end, (b + 1) * bs)
            chunk = view[lo - offset : hi - offset]
            if hi - lo == bs:
                fs.dirty[b] = bytes(chunk)
            else:
                block = fs.dirty.get(b)
                if not isinstance(block, bytearray):
                    block = bytearray(bases[b] if block is None else block)
                block[lo - b * bs : hi - b * bs] = chunk
                fs.dirty[b] = block
        fs.size = max(fs.size, end)
        # The mtime moves at the commit, not here: one new mtime per commit, not per
        # write. Where libfuse's auto_inval_data is still on (fuse_caps.py), the
        # kernel drops a file's whole page cache whenever a getattr shows a new
        # mtime, and it asks for the attributes after every write. Every write
        # passes through this mount's kernel, so its page cache is right; other
        # mounts' commits invalidate it explicitly (coherence/).
        fs.modified = True

    async def truncate(self, fs: FileState, size: int) -> None:
        if size > fs.size:
            await self._grow(fs, size)
        elif size < fs.size:
            keep = -(-size // self.bs)
            for b in [b for b in fs.dirty if b >= keep]:
                del fs.dirty[b]
            fs.size = size
        fs.modified = True  # mtime moves at the commit, as for write

    async def _grow(self, fs: FileState, size: int) -> None:
        """Extend to ``size``, zeroing what earlier, longer versions left beyond the old end."""
        bs, old = self.bs, fs.size
        if old % bs:
            b = old // bs
            block = bytearray((await self.blocks(fs, [b]))[b])
            block[old % bs :] = bytes(bs - old % bs)
            fs.dirty[b] = block
        stale_end = max([fs.record.hwm, fs.staged_hwm, *(b + 1 for b in fs.dirty), *(b + 1 for b in fs.committing)])
        for b in range(-(-old // bs), min(-(-size // bs), stale_end)):
            fs.dirty[b] = self.zero_block
        fs.size = size
