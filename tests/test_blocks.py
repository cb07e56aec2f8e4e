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

from fusesqlite import _blocks
from fusesqlite.keyspace import STAMPED
from fusesqlite.pages import LZ4, RAW, XXH3, ZERO, CorruptBlock, _checksum, decode_block, decode_run, encode_block

BS = 4096
BLOCKS = {
    "zeros": bytes(BS),
    "compressible": (b"sqlite page " * 400)[:BS],
    "incompressible": os.urandom(BS),
    # zero everywhere but at one end: must not be taken for a block of zeros
    "zeros_but_last_byte": bytes(BS - 1) + b"\x01",
    "zeros_but_first_byte": b"\x01" + bytes(BS - 1),
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


# -- decode_run: read-ahead's whole-run decoding (C, _blocks.c) ----------------------------
def _run(ino: int = 7, start: int = 100, count: int = 12) -> tuple[dict[int, bytes], bytes]:
    """Encoded values of a run with every kind of block and two holes, and its expected content."""
    values, expected = {}, bytearray(count * BS)
    kinds = sorted(BLOCKS)
    for i in range(count):
        if i in (2, 9):
            continue  # holes: no value, zeros
        data = BLOCKS[kinds[i % len(kinds)]] if i % 4 else os.urandom(100) + bytes(BS - 100)
        values[start + i] = encode_block(data, ino, start + i)
        expected[i * BS : (i + 1) * BS] = data
    return values, bytes(expected)


def test_decode_run_in_c_matches_the_python_codec():
    values, expected = _run()
    assert _blocks.decode_run(values, 7, 100, 12, BS) is not None  # the C path took it
    assert bytes(decode_run(values, 7, 100, 12, BS)) == expected
    for b, value in values.items():  # and block by block, as point reads decode
        assert bytes(decode_block(value, 7, b, BS)) == expected[(b - 100) * BS : (b - 99) * BS]


def test_decode_run_refuses_a_flipped_bit_anywhere():
    values, _ = _run()
    for b, value in values.items():
        for pos in range(0, len(value), max(1, len(value) // 20)):
            damaged = dict(values)
            flipped = bytearray(value)
            flipped[pos] ^= 0x04
            damaged[b] = bytes(flipped)
            with pytest.raises(CorruptBlock):
                decode_run(damaged, 7, 100, 12, BS)


def test_decode_run_refuses_values_of_another_file_or_block():
    values, _ = _run()
    with pytest.raises(CorruptBlock):
        decode_run(values, 8, 100, 12, BS)
    shifted = {b + 1: v for b, v in values.items() if b + 1 < 112}
    with pytest.raises(CorruptBlock):
        decode_run(shifted, 7, 100, 12, BS)


def test_decode_run_refuses_lz4_that_does_not_fill_the_block_despite_its_checksum():
    """A writer's bug (wrong size prefix, short payload) with a checksum made over it."""
    kind = XXH3 | LZ4
    short = lz4.block.compress(b"x" * (BS - 1), store_size=False)
    for payload in (struct.pack("<I", BS) + short, struct.pack("<I", BS - 1) + short, b"\x01\x02"):
        value = struct.pack(">BI", kind, _checksum(kind, payload, 7, 100)) + payload
        with pytest.raises(CorruptBlock, match="lz4"):
            decode_run({100: value}, 7, 100, 1, BS)


def test_decode_run_refuses_short_unknown_and_out_of_run_values():
    with pytest.raises(CorruptBlock):
        decode_run({100: b"\x81\x00"}, 7, 100, 1, BS)
    kind = XXH3 | 3
    value = struct.pack(">BI", kind, _checksum(kind, b"x" * 100, 7, 100)) + b"x" * 100
    with pytest.raises(CorruptBlock, match="unknown block kind"):
        decode_run({100: value}, 7, 100, 1, BS)
    with pytest.raises(CorruptBlock, match="not a bytes value of this run"):
        decode_run({101: encode_block(bytes(BS), 7, 101)}, 7, 100, 1, BS)


def test_decode_run_leaves_crc32_values_to_the_python_codec():
    ino, block_no, data = 7, 100, BLOCKS["incompressible"]
    seed = zlib.crc32(struct.pack(">QQB", ino, block_no, RAW))
    old = struct.pack(">BI", RAW, zlib.crc32(data, seed)) + data
    values = {block_no: old, block_no + 1: encode_block(BLOCKS["compressible"], ino, block_no + 1)}
    assert _blocks.decode_run(values, ino, block_no, 2, BS) is None
    assert bytes(decode_run(values, ino, block_no, 2, BS)) == data + BLOCKS["compressible"]


# -- decode_rows: read-ahead's loads, version choice and decoding in one C call ------------
def _volume_with_history(tmp_path):
    """A file of 8 blocks on a real embedded store: block 5 rewritten 9 times (so a
    range read over the run is cut by its row limit), block 3 a hole, the others
    written once. Returns the volume, the inode and the versions committed."""
    from fusesqlite.inodes import Inode
    from fusesqlite.store.embedded import EmbeddedStore
    from fusesqlite.volume import ChangeSet, DataCommit, Volume

    vol = Volume(EmbeddedStore(str(tmp_path / "store")), "default", author="test")
    vol.open()
    ino = vol.allocate_inodes(1)[0]
    rec = Inode(mode=0o100644, uid=0, gid=0, nlink=1, size=8 * BS, hwm=8)
    vol.commit(ChangeSet(inodes={ino: rec}))
    dver, versions = 0, []  # the data version the next commit is based on
    for n in range(10):
        blocks = [5] if n else [b for b in range(8) if b != 3]
        changes = ChangeSet(
            inodes={ino: rec},
            blocks={(ino, b): encode_block(os.urandom(64) + bytes(BS - 64), ino, b) for b in blocks},
        )
        dver = vol.commit(changes, {ino: DataCommit(based_on=dver, staging=None)}).version
        versions.append(dver)
    return vol, ino, versions


def test_decode_rows_reads_every_version_as_read_blocks_does(tmp_path):
    from fusesqlite.pages import decode_rows

    vol, ino, versions = _volume_with_history(tmp_path)
    for version in [versions[0] - 1, *versions]:
        run = vol.read_run(ino, 0, 8, version)
        assert run.settled_end < 8, "the range read was not cut: the rest-by-block path is untested"
        expected = bytes(decode_run(vol.read_blocks(ino, range(8), version), ino, 0, 8, BS))
        assert bytes(decode_rows(run, ino, 0, 8, version, BS)) == expected
        for start, end in ((0, 5), (2, 7), (6, 8)):
            part = vol.read_run(ino, start, end, version)
            assert bytes(decode_rows(part, ino, start, end - start, version, BS)) == expected[start * BS : end * BS]
    run = vol.read_run(ino, 0, 8, versions[-1])
    assert versions[0] >= STAMPED  # versions are 88-bit integers: the C path compares them whole
    high, low = versions[-1] >> 64, versions[-1] & (1 << 64) - 1
    assert _blocks.decode_rows(run.rows, run.prefix_len, ino, 0, run.settled_end, high, low, BS) is not None


def test_decode_rows_refuses_damage_and_leaves_rows_it_does_not_know_to_python(tmp_path):
    from fusesqlite.pages import decode_rows

    vol, ino, versions = _volume_with_history(tmp_path)
    run = vol.read_run(ino, 0, 5, versions[-1])
    assert run.settled_end == 5 and not run.rest
    expected = bytes(decode_rows(run, ino, 0, 5, versions[-1], BS))
    key, value = run.rows[1]
    damaged = bytearray(value)
    damaged[-1] ^= 0x10
    run.rows[1] = (key, bytes(damaged))
    with pytest.raises(CorruptBlock):
        decode_rows(run, ino, 0, 5, versions[-1], BS)
    # a value with the legacy crc32 checksum: C declines, Python decodes the same bytes
    data = expected[BS : 2 * BS]
    seed = zlib.crc32(struct.pack(">QQB", ino, 1, RAW))
    run.rows[1] = (key, struct.pack(">BI", RAW, zlib.crc32(data, seed)) + data)
    high, low = versions[-1] >> 64, versions[-1] & (1 << 64) - 1
    assert _blocks.decode_rows(run.rows, run.prefix_len, ino, 0, 5, high, low, BS) is None
    assert bytes(decode_rows(run, ino, 0, 5, versions[-1], BS)) == expected
    # a key that is not (block, version) after the prefix: declined as well
    assert _blocks.decode_rows([(key + b"\x00", value)], run.prefix_len, ino, 0, 5, high, low, BS) is None
