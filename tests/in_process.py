"""The file system's operations built in a test's own process on an embedded store in
a temporary directory: no FUSE, no kernel (test_operations_in_process.py,
test_journal_protocol.py; the ``host`` fixture is conftest.py's)."""
from __future__ import annotations

import os
from pathlib import Path

import pyfuse3

from fusesqlite.fs.operations import Operations
from fusesqlite.inodes import ROOT_INO
from fusesqlite.own_mount import OwnMount
from fusesqlite.store.embedded import EmbeddedStore
from fusesqlite.transactions import Transactions
from fusesqlite.volume import Volume

CTX = pyfuse3.RequestContext()  # uid 0, as the kernel's requests of a root-only mount
JOURNAL_MAGIC = b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7"  # a rollback journal's header starts with it


class Host:
    """One store, and fresh views of it: each ``view()`` is what a new mount would serve."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = EmbeddedStore(tmp_path / "store")
        self.mountpoint = tmp_path / "mnt"
        self.mountpoint.mkdir()
        self.own_mount = OwnMount.spawn()
        self._n = 0

    def view(self, writeback_cache: bool = False, own_mount: object = None) -> Operations:
        """A new mount's operations; ``own_mount`` stands in for the own-mount helper
        (test_journal_protocol.py's kernel model syncs its page cache there)."""
        self._n += 1
        volume = Volume(self.store, "default", author=f"view{self._n}")
        tx = Transactions(volume, cache_bytes=1 << 20, mount_id=f"view{self._n}")
        tx.snapshot = volume.open()
        helper = self.own_mount if own_mount is None else own_mount
        return Operations(tx, str(self.mountpoint), helper, writeback_cache=writeback_cache)  # type: ignore[arg-type]

    async def content(self, name: bytes) -> bytes:
        """``name``'s bytes as a new view reads them."""
        ops = self.view()
        entry = await ops.lookup(ROOT_INO, name, CTX)
        fi = await ops.open(entry.st_ino, os.O_RDONLY, CTX)
        try:
            return bytes(await ops.read(fi.fh, 0, entry.st_size))
        finally:
            await ops.release(fi.fh)

    def close(self) -> None:
        self.own_mount.stop()
        self.store.close()
