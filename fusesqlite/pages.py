"""Blocks as stored: lz4-compressed, checksummed, and a bounded cache of decoded ones.

A stored block value is ``kind (1 byte) | crc32 (4 bytes) | payload``. The crc
covers the kind, the payload and the block's identity (inode and block number), so
a damaged value or a value under the wrong key is caught before it reaches an app.
"""
from __future__ import annotations

import struct
import zlib
from collections import OrderedDict

import lz4.block

RAW = 0  # payload is the block itself (incompressible data)
LZ4 = 1  # payload is an lz4 block with its size prefix
ZERO = 2  # no payload: a block of zeros (holes made by truncate-and-grow)

_HEADER = struct.Struct(">BI")
_IDENTITY = struct.Struct(">QQ")


class CorruptBlock(Exception):
    """A stored block failed its checksum or cannot be decoded."""


def _crc(kind: int, payload: bytes, ino: int, block_no: int) -> int:
    seed = zlib.crc32(_IDENTITY.pack(ino, block_no) + bytes((kind,)))
    return zlib.crc32(payload, seed)


def encode_block(data: bytes, ino: int, block_no: int) -> bytes:
    """Store form of one block (``data`` is exactly one block long)."""
    if not data.strip(b"\0"):
        kind, payload = ZERO, b""
    else:
        packed = lz4.block.compress(data, store_size=True)
        kind, payload = (LZ4, packed) if len(packed) < len(data) else (RAW, bytes(data))
    return _HEADER.pack(kind, _crc(kind, payload, ino, block_no)) + payload


def decode_block(value: bytes, ino: int, block_no: int, block_size: int) -> bytes:
    """The block's bytes, or ``CorruptBlock``: wrong bytes are never returned."""
    if len(value) < _HEADER.size:
        raise CorruptBlock(f"value of {len(value)} bytes is shorter than a block header")
    kind, crc = _HEADER.unpack_from(value)
    payload = value[_HEADER.size :]
    if _crc(kind, payload, ino, block_no) != crc:
        raise CorruptBlock("checksum mismatch")
    if kind == ZERO:
        return bytes(block_size)
    if kind == RAW:
        data = payload
    elif kind == LZ4:
        try:
            data = lz4.block.decompress(payload)
        except Exception as e:  # lz4 raises a bare LZ4BlockError/ValueError
            raise CorruptBlock(f"lz4: {e}") from None
    else:
        raise CorruptBlock(f"unknown block kind {kind}")
    if len(data) != block_size:
        raise CorruptBlock(f"decoded {len(data)} bytes, expected {block_size}")
    return data


class BlockCache:
    """LRU of decoded committed blocks, bounded in bytes.

    Holds only blocks as of the mount's current snapshot; whoever moves the
    snapshot or commits a block updates or drops the entries it changes.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self._lru: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, ino: int, block_no: int) -> bytes | None:
        key = (ino, block_no)
        data = self._lru.get(key)
        if data is not None:
            self._lru.move_to_end(key)
        return data

    def put(self, ino: int, block_no: int, data: bytes) -> None:
        key = (ino, block_no)
        old = self._lru.pop(key, None)
        if old is not None:
            self.used -= len(old)
        if len(data) > self.capacity:
            return
        self._lru[key] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, evicted = self._lru.popitem(last=False)
            self.used -= len(evicted)

    def drop_inode(self, ino: int) -> None:
        for key in [k for k in self._lru if k[0] == ino]:
            self.used -= len(self._lru.pop(key))
