"""The mount's request loop (fs/request_loop.py): the task that answered a request
reads the next, and a handler that waits never stops the mount serving others."""
from __future__ import annotations

import os
import sqlite3
import time

#: a child that writes a file, fsyncs it (a store commit) and says how long it took
WRITE_AND_FSYNC = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"x" * 10000)
print("written", flush=True)
t = time.monotonic()
os.fsync(fd)
print(f"synced {time.monotonic() - t:.3f}", flush=True)
os.close(fd)
"""


def test_a_request_waiting_for_the_store_does_not_stop_the_others(mount):
    """A commit waits while another process holds the store's write lock; meanwhile
    the mount answers lookups, stats and reads at once. Done after some hundred
    requests, so that pyfuse3 has started all the tasks it may (it starts one per
    request read until then, and each could stand in for a waiting handler)."""
    m = mount
    (m / "old.bin").write_bytes(b"y" * 50000)
    (m / "new.bin").write_bytes(b"")  # a create is a commit of its own
    for i in range(300):
        assert not (m / f"missing-{i}").exists()
    store = sqlite3.connect(m.store_dir / "store.sqlite", isolation_level=None)
    store.execute("BEGIN IMMEDIATE")  # the daemon's commits now wait for it
    locked_at = time.monotonic()
    try:
        writer = m.py(WRITE_AND_FSYNC, m / "new.bin")
        assert writer.stdout.readline().strip() == "written", writer.stderr.read()
        answered = []
        for i in range(50):
            t = time.monotonic()
            assert not (m / f"other-{i}").exists()
            assert (m / "old.bin").stat().st_size == 50000
            with open(m / "old.bin", "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read through the daemon
                assert f.read() == b"y" * 50000
            answered.append(time.monotonic() - t)
        assert max(answered) < 0.5, f"requests waited behind the commit: slowest {max(answered):.2f} s"
        assert writer.poll() is None, "the fsync did not wait for the store's lock: the test proves nothing"
        time.sleep(max(0.0, 1.0 - (time.monotonic() - locked_at)))
    finally:
        store.execute("ROLLBACK")
        store.close()
    out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    waited = float(out.split()[-1])
    assert waited >= 0.8, f"fsync returned after {waited:.3f} s, before the store's lock was released"
    assert (m / "new.bin").read_bytes() == b"x" * 10000
