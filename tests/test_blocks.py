"""The stored form of a block: what it decodes to, and what it refuses to decode.

Unit tests of the codec in pages.py; the end-to-end behaviour of a corrupt block
(EIO to the app, a log line) is in test_faults.py.
"""
from __future__ import annotations

import os
import struct
import zlib

import lz4.block
import pytest

from fusesqlite.pages import LZ4, RAW, XXH3, ZERO, CorruptBlock, _checksum, decode_block, encode_block

BS = 4096
BLOCKS = {
    "zeros": bytes(BS),
    "compressible": (b"sqlite page " * 400)[:BS],
    "incompressible": os.urandom(BS),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_round_trip(name):
    data = BLOCKS[name]
    value = encode_block(data, ino=7, block_no=3)
    assert bytes(decode_block(value, 7, 3, BS)) == data


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_a_flipped_bit_anywhere_is_refused(name):
    value = bytearray(encode_block(BLOCKS[name], ino=7, block_no=3))
    for pos in range(0, len(value), max(1, len(value) // 50)):
        damaged = bytearray(value)
        damaged[pos] ^= 0x10
        with pytest.raises(CorruptBlock):
            decode_block(bytes(damaged), 7, 3, BS)


@pytest.mark.parametrize("ino, block_no", [(8, 3), (7, 4), (3, 7), (7 + (1 << 32), 3)])
def test_a_value_under_another_blocks_key_is_refused(ino, block_no):
    value = encode_block(BLOCKS["incompressible"], ino=7, block_no=3)
    with pytest.raises(CorruptBlock):
        decode_block(value, ino, block_no, BS)


def test_values_written_with_crc32_still_decode():
    """Stores written before the checksum became xxh3 carry crc32 in kinds without the XXH3 bit."""
    ino, block_no = 7, 3
    for kind, data in ((RAW, BLOCKS["incompressible"]), (ZERO, bytes(BS))):
        payload = data if kind == RAW else b""
        seed = zlib.crc32(struct.pack(">QQB", ino, block_no, kind))
        value = struct.pack(">BI", kind, zlib.crc32(payload, seed)) + payload
        assert bytes(decode_block(value, ino, block_no, BS)) == data
    data = BLOCKS["compressible"]
    payload = lz4.block.compress(data, store_size=True)
    seed = zlib.crc32(struct.pack(">QQB", ino, block_no, LZ4))
    value = struct.pack(">BI", LZ4, zlib.crc32(payload, seed)) + payload
    assert bytes(decode_block(value, ino, block_no, BS)) == data
    with pytest.raises(CorruptBlock):
        decode_block(value, ino, block_no + 1, BS)


def test_short_and_unknown_values_are_refused():
    with pytest.raises(CorruptBlock):
        decode_block(b"\x81\x00", 7, 3, BS)
    kind = XXH3 | 3  # a kind this version does not know, with a matching checksum
    value = struct.pack(">BI", kind, _checksum(kind, b"x" * 100, 7, 3)) + b"x" * 100
    with pytest.raises(CorruptBlock, match="unknown block kind"):
        decode_block(value, 7, 3, BS)
