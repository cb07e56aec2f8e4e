"""Blocks as stored: lz4-compressed, checksummed, and a bounded cache of decoded ones.

A stored block value is ``kind (1 byte) | checksum (4 bytes) | payload``. The
checksum covers the kind, the payload and the block's identity (inode and block
number), so a damaged value or a value under the wrong key is caught before it
reaches an app. It is the low 32 bits of xxh3-64 seeded with the identity
(``XXH3`` set in the kind byte): a cold scan checks 50,000 blocks a second, and
crc32, which values written before it carry (and still decode), took a fifth of
the loading thread's time.
"""
from __future__ import annotations

import importlib
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Collection
from types import ModuleType
from typing import TYPE_CHECKING

import lz4.block
import xxhash

from fusesqlite import fuse_caps

_blocks: ModuleType | None = None  # FUSESQLITE_NATIVE=0: every block decoded in Python (decode_block)
if fuse_caps.native_wanted():
    _blocks = importlib.import_module("fusesqlite._blocks")

if TYPE_CHECKING:
    from fusesqlite.volume import BlockRows

RAW = 0  # payload is the block itself (incompressible data)
LZ4 = 1  # payload is an lz4 block with its size prefix
ZERO = 2  # no payload: a block of zeros (holes made by truncate-and-grow)
#: kind bit: the checksum is xxh3's, not crc32's
XXH3 = 0x80

_HEADER = struct.Struct(">BI")
_IDENTITY = struct.Struct(">QQB")  # ino, block number, kind: what a crc32 covers besides the payload
_MASK64 = (1 << 64) - 1


class CorruptBlock(Exception):
    """A stored block failed its checksum or cannot be decoded."""


def _checksum(kind: int, payload: bytes | memoryview, ino: int, block_no: int) -> int:
    if kind & XXH3:
        seed = (ino * 0x9E3779B97F4A7C15 ^ block_no * 0xC2B2AE3D27D4EB4F ^ kind) & _MASK64
        return xxhash.xxh3_64_intdigest(payload, seed) & 0xFFFFFFFF
    seed = zlib.crc32(_IDENTITY.pack(ino, block_no, kind))
    return zlib.crc32(payload, seed)


_zeros: dict[int, bytes] = {}


def _all_zero(data: bytes) -> bool:
    """A comparison with a block of zeros is one memcmp; ``bytes.strip`` calls memchr per
    byte: 14% of the daemon's CPU copying a file whose blocks were half zeros."""
    zeros = _zeros.get(len(data))
    if zeros is None:
        zeros = _zeros.setdefault(len(data), bytes(len(data)))
    return data == zeros


def encode_block(data: bytes, ino: int, block_no: int) -> bytes:
    """Store form of one block (``data`` is exactly one block long)."""
    if _all_zero(data):
        kind, payload = ZERO, b""
    else:
        packed = lz4.block.compress(data, store_size=True)
        kind, payload = (LZ4, packed) if len(packed) < len(data) else (RAW, bytes(data))
    kind |= XXH3
    return _HEADER.pack(kind, _checksum(kind, payload, ino, block_no)) + payload


def decode_block(value: bytes, ino: int, block_no: int, block_size: int) -> bytes | memoryview:
    """The block's bytes, or ``CorruptBlock``: wrong bytes are never returned.

    An incompressible block comes back as a view into ``value`` (no copy).
    """
    if len(value) < _HEADER.size:
        raise CorruptBlock(f"value of {len(value)} bytes is shorter than a block header")
    kind, checksum = _HEADER.unpack_from(value)
    payload = memoryview(value)[_HEADER.size :]
    if _checksum(kind, payload, ino, block_no) != checksum:
        raise CorruptBlock("checksum mismatch")
    kind &= ~XXH3
    if kind == ZERO:
        return bytes(block_size)
    if kind == RAW:
        data: bytes | memoryview = payload
    elif kind == LZ4:
        try:
            data = lz4.block.decompress(payload)
        except Exception as e:  # lz4 raises a bare LZ4BlockError/ValueError
            raise CorruptBlock(f"lz4: {e}") from None
    else:
        raise CorruptBlock(f"unknown block kind {kind}")
    if len(data) != block_size:
        what = "lz4: decoded" if kind == LZ4 else "raw payload of"
        raise CorruptBlock(f"{what} {len(data)} bytes, expected {block_size}")
    return data


def decode_run(values: dict[int, bytes], ino: int, start: int, count: int, block_size: int) -> bytearray:
    """Blocks ``start .. start + count - 1`` decoded into one buffer (absent: zeros).

    For read-ahead, which loads hundreds of blocks at once: one buffer and one
    call instead of a bytes object and a call per block, in C with the GIL
    released (``_blocks.c``; values with a crc32 checksum take the Python path).
    """
    if _blocks is not None:
        try:
            buf = _blocks.decode_run(values, ino, start, count, block_size)
        except ValueError as e:
            raise CorruptBlock(str(e)) from None
        if buf is not None:
            return buf
    buf = bytearray(count * block_size)
    view = memoryview(buf)
    for block_no, value in values.items():
        if not start <= block_no < start + count or not isinstance(value, bytes):
            raise CorruptBlock(f"block {block_no}: not a bytes value of this run")
        pos = (block_no - start) * block_size
        view[pos : pos + block_size] = decode_block(value, ino, block_no, block_size)
    return buf


def decode_rows(run: BlockRows, ino: int, start: int, count: int, version: int, block_size: int) -> bytearray:
    """``decode_run`` of a run read with ``Volume.read_run``: the choice of each block's
    version and the decoding in one C call (``_blocks.c``), Python where it declines."""
    if _blocks is None:
        return decode_run(run.values(version), ino, start, count, block_size)
    settled = min(count, run.settled_end - start)
    try:
        buf = _blocks.decode_rows(run.rows, run.prefix_len, ino, start, settled, version >> 64,
                                  version & 0xFFFF_FFFF_FFFF_FFFF, block_size)
    except ValueError as e:
        raise CorruptBlock(str(e)) from None
    if buf is None:
        return decode_run(run.values(version), ino, start, count, block_size)
    if settled < count:  # the range read's limit cut the run: the rest was read block by block
        buf.extend(decode_run(run.rest, ino, start + settled, count - settled, block_size))
    return buf


class BlockCache:
    """LRU of decoded committed blocks, bounded in bytes.

    Holds only blocks as of the mount's current snapshot; whoever moves the
    snapshot or commits a block updates or drops the entries it changes
    (``put``, ``drop_inode``). Blocks loaded from the store go in with ``fill``
    instead: a load runs in a thread while commits and stagings go on, so a
    fill is refused when its file's entries changed after the load began
    (``mark``) -- it would put older content back over newer.
    """

    #: files whose last change is remembered exactly; beyond it older fills are all refused
    CHANGES_KEPT = 4096

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self._lru: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._clock = 0  # counts changes; a mark is its value when a load begins
        self._changed: dict[int, int] = {}  # ino -> clock at its last change
        self._floor = 0  # fills marked before this are refused (_changed was cleared)
        self._blocks: Counter[int] = Counter()  # ino -> blocks held: the files a mount must follow
        self.hits = self.misses = 0  # for metrics.py

    def get(self, ino: int, block_no: int) -> bytes | None:
        key = (ino, block_no)
        data = self._lru.get(key)
        if data is not None:
            self._lru.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return data

    def mark(self) -> int:
        """Taken before loading blocks from the store; ``fill`` and ``unchanged_since`` check it."""
        return self._clock

    def unchanged_since(self, ino: int, mark: int) -> bool:
        """No ``put`` or ``drop_inode`` touched ``ino`` since ``mark`` was taken."""
        return mark >= self._floor and self._changed.get(ino, -1) < mark

    def fill(self, ino: int, block_no: int, data: bytes, mark: int) -> bool:
        """Cache a block loaded from the store, unless the file changed since ``mark``."""
        if not self.unchanged_since(ino, mark):
            return False
        self._insert(ino, block_no, data)
        return True

    def put(self, ino: int, block_no: int, data: bytes) -> None:
        """The block's new committed (or staged) content."""
        self._changed_now(ino)
        self._insert(ino, block_no, data)

    def drop_inode(self, ino: int) -> None:
        self._changed_now(ino)
        if self._blocks.pop(ino, 0):
            for key in [k for k in self._lru if k[0] == ino]:
                self.used -= len(self._lru.pop(key))

    def inodes(self) -> Collection[int]:
        """The files it holds blocks of."""
        return self._blocks.keys()

    def _changed_now(self, ino: int) -> None:
        if len(self._changed) >= self.CHANGES_KEPT and ino not in self._changed:
            self._changed.clear()
            self._floor = self._clock
        self._changed[ino] = self._clock
        self._clock += 1

    def _insert(self, ino: int, block_no: int, data: bytes) -> None:
        key = (ino, block_no)
        old = self._lru.pop(key, None)
        if old is not None:
            self.used -= len(old)
            self._forget(ino)
        if len(data) > self.capacity:
            return
        self._lru[key] = data
        self._blocks[ino] += 1
        self.used += len(data)
        while self.used > self.capacity:
            (gone, _), evicted = self._lru.popitem(last=False)
            self.used -= len(evicted)
            self._forget(gone)

    def _forget(self, ino: int) -> None:
        """One block of ``ino`` left."""
        left = self._blocks[ino] - 1
        if left:
            self._blocks[ino] = left
        else:
            del self._blocks[ino]
