"""Read-ahead (readahead.py): forward reads served from blocks loaded ahead are
exactly the file's bytes, and never older than the file's last change, whether
another mount or this one made it."""
from __future__ import annotations

import hashlib
import mmap
import os
import random

import pytest
from helpers import MB
from test_many_mounts import wait_for

from fusesqlite.pages import BlockCache

pytestmark = pytest.mark.timeout(120)


def drop_kernel_cache(path) -> None:
    """Make the next reads of ``path`` reach the daemon (its pages are clean: written through)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_in(path, sizes: list[int]) -> bytes:
    """The whole file, read front to back with reads of the given sizes in turn."""
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        i = 0
        while chunk := f.read(sizes[i % len(sizes)]):
            out += chunk
            i += 1
    return bytes(out)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sequential_reads_after_remount_are_exact(mounts):
    m = mounts(debug=True)
    data = random.Random(6).randbytes(12 * MB + 4321)  # not a multiple of a block or a read
    with open(m / "big.bin", "wb") as f:
        f.write(data)
    m = m.factory.remount(m)
    for sizes in ([MB], [4096 * 33 + 7], [1, 4095, 131072, 65537, 3 * MB + 1]):
        drop_kernel_cache(m / "big.bin")
        assert sha(read_in(m / "big.bin", sizes)) == sha(data), f"read sizes {sizes}"
    assert "event=readahead " in m.log_text(), "the sequential reads never loaded ahead"
    # positioned reads at odd offsets, after the stream went elsewhere
    drop_kernel_cache(m / "big.bin")
    fd = os.open(m / "big.bin", os.O_RDONLY)
    try:
        for off in (5 * MB + 17, 11 * MB - 3, 7, 12 * MB):
            assert os.pread(fd, 300_001, off) == data[off : off + 300_001]
    finally:
        os.close(fd)


def direct_reads(fd: int, start: int, end: int, size: int = 256 * 1024) -> bytes:
    """Bytes ``start .. end`` read with O_DIRECT reads of ``size``: each one reaches the
    daemon as it is, past the kernel's page cache and read-ahead."""
    buf = mmap.mmap(-1, size)
    out = bytearray()
    for off in range(start, end, size):
        n = os.preadv(fd, [memoryview(buf)[: min(size, end - off)]], off)
        out += buf[:n]
    return bytes(out)


def test_another_mounts_change_is_never_hidden_by_read_ahead(mounts):
    a = mounts()
    b = mounts(store=a.store, debug=True)
    rng = random.Random(7)
    old = rng.randbytes(16 * MB)
    with open(a / "f.bin", "wb") as f:
        f.write(old)
    assert wait_for(lambda: os.path.getsize(b / "f.bin") == len(old), timeout=20)
    fd = os.open(b / "f.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        assert wait_for(lambda: direct_reads(fd, 0, MB) == old[:MB], timeout=20)
        assert direct_reads(fd, MB, 4 * MB) == old[MB : 4 * MB]  # a stream: b loads ahead past 5 MiB
        patch = rng.randbytes(MB + 999)
        new = old[: 5 * MB] + patch + old[5 * MB + len(patch) :]
        moves = b.log_text().count("event=moved ")
        with open(a / "f.bin", "r+b") as f:
            f.seek(5 * MB)
            f.write(patch)
        # b followed the commit (its record is read with the blocks' cache dropped; its
        # kernel keeps the old mtime while the file is open there: writeback cache) ...
        assert wait_for(lambda: b.log_text().count("event=moved ") > moves, timeout=20)
        # ... so what it loaded ahead before must not answer, neither a read elsewhere ...
        assert direct_reads(fd, 5 * MB + 4096, 5 * MB + 69632) == new[5 * MB + 4096 : 5 * MB + 69632]
        # ... nor the stream going on where it stopped
        assert sha(direct_reads(fd, 4 * MB, len(new))) == sha(new[4 * MB :])
    finally:
        os.close(fd)
    assert "event=readahead " in b.log_text(), "b never loaded ahead"
    drop_kernel_cache(b / "f.bin")
    assert sha(read_in(b / "f.bin", [MB])) == sha(new)


def test_local_overwrite_is_never_hidden_by_read_ahead(mounts):
    m = mounts(debug=True)
    rng = random.Random(8)
    data = bytearray(rng.randbytes(16 * MB))
    with open(m / "f.bin", "wb") as f:
        f.write(data)
    m = m.factory.remount(m)
    reader = os.open(m / "f.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        assert direct_reads(reader, 0, 4 * MB) == data[: 4 * MB]  # loads ahead past 6 MiB
        with open(m / "f.bin", "r+b") as w:
            patch = rng.randbytes(MB + 5)
            w.seek(5 * MB)
            w.write(patch)
            w.flush()
            data[5 * MB : 5 * MB + len(patch)] = patch
            # not committed yet: reads see the overlay
            assert direct_reads(reader, 4 * MB, 8 * MB) == data[4 * MB : 8 * MB], "uncommitted write"
        # committed (close) while the stream's next blocks were loaded already
        with open(m / "f.bin", "r+b") as w:
            patch = rng.randbytes(2 * MB)
            w.seek(9 * MB)
            w.write(patch)
            data[9 * MB : 11 * MB] = patch
        assert direct_reads(reader, 8 * MB, 12 * MB) == data[8 * MB : 12 * MB], "committed write"
        assert sha(direct_reads(reader, 0, len(data), MB)) == sha(bytes(data))
    finally:
        os.close(reader)
    assert "event=readahead " in m.log_text(), "the reads never loaded ahead"


def test_a_forward_scan_that_skips_blocks_is_read_ahead_and_exact(mounts):
    """SQLite counting the rows of a table whose rows overflow reads its b-tree leaves in
    order, skipping the overflow pages between them: the reads continue a stream, so the
    daemon loads ahead (one store round trip per chunk, not per page)."""
    m = mounts(debug=True)
    data = random.Random(9).randbytes(8 * MB)
    with open(m / "f.bin", "wb") as f:
        f.write(data)
    m = m.factory.remount(m)
    fd = os.open(m / "f.bin", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        for block in range(0, len(data) // 4096, 5):  # one block in five, front to back
            assert os.preadv(fd, [buf], block * 4096) == 4096
            assert buf[:] == data[block * 4096 : (block + 1) * 4096], block
    finally:
        os.close(fd)
    assert "event=readahead " in m.log_text(), "the strided reads never loaded ahead"


def test_block_cache_refuses_fills_older_than_a_change():
    cache = BlockCache(1 << 20)
    before = cache.mark()
    cache.put(1, 0, b"new")  # a commit or staging of file 1
    assert not cache.fill(1, 0, b"old", before)
    assert cache.get(1, 0) == b"new"
    assert cache.fill(2, 0, b"other file", before)
    after = cache.mark()
    assert cache.fill(1, 1, b"loaded after", after)
    cache.drop_inode(1)  # another mount's commit
    assert not cache.fill(1, 1, b"stale", after)
    assert cache.unchanged_since(2, before) and not cache.unchanged_since(1, after)
    # beyond CHANGES_KEPT files, fills that began before the oldest remembered change are refused
    early = cache.mark()
    for ino in range(100, 100 + BlockCache.CHANGES_KEPT + 1):
        cache.put(ino, 0, b"x")
    assert not cache.fill(3, 0, b"maybe stale", early)
    assert cache.fill(3, 0, b"fresh", cache.mark())


def test_block_cache_knows_every_file_it_holds_blocks_of():
    """The follower follows the files whose blocks the cache holds (``inodes``): a file
    left out would keep old blocks past another mount's commit. Random puts, fills,
    overwrites, evictions and drops keep ``inodes`` equal to the files of its blocks."""
    rnd = random.Random(7)
    cache = BlockCache(capacity_bytes=40 * 100)
    for _ in range(5000):
        ino, block = rnd.randrange(1, 12), rnd.randrange(8)
        op = rnd.random()
        if op < 0.45:
            cache.put(ino, block, bytes(rnd.randrange(50, 150)))
        elif op < 0.85:
            cache.fill(ino, block, bytes(rnd.randrange(50, 150)), cache.mark())
        else:
            cache.drop_inode(ino)
        assert set(cache.inodes()) == {i for i, _ in cache._lru}
        assert cache.used == sum(len(v) for v in cache._lru.values()) <= cache.capacity


@pytest.mark.usefixtures("root_only")
def test_the_kernels_read_ahead_is_raised_before_the_mount_first_answers(mount):
    """A file keeps the kernel read-ahead of the moment it was opened, and an app may
    open its database as soon as the mount answers. The daemon raised the mount's
    read-ahead from a stat of its root in the background; when that came 120 ms late,
    the benchmark's cold scan read 450 instead of 700 MiB/s. Now it is raised before
    the first request is answered: the mount fixture's own wait was that request."""
    from fusesqlite.mount import READ_AHEAD_KB

    dev = os.stat(mount.mountpoint).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == READ_AHEAD_KB
