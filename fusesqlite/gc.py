"""Garbage collection: stagings left by mounts that died before their commit point.

(Old versions will be collected here too once retention exists.)
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from fusesqlite.volume import Volume

log = logging.getLogger("fusesqlite.gc")

#: a staging whose owner has not written for this long is presumed dead (another host)
STAGING_TIMEOUT = 120.0


def new_mount_id() -> str:
    """``host:pid:random``: lets a mount on the same host tell a dead owner at once."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _alive_here(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fusesqlite" in f.read()
    except OSError:
        return False


def staging_abandoned(owner: str, heartbeat: float, me: str, timeout: float = STAGING_TIMEOUT) -> bool:
    if owner == me:
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and not _alive_here(int(pid)):
        return True
    return time.time() - heartbeat > timeout


def reclaim_stagings(volume: Volume, me: str, timeout: float = STAGING_TIMEOUT) -> tuple[int, int]:
    """Remove abandoned stagings; return (stagings, blocks) removed."""
    stagings = blocks = 0
    for ino, version, owner, heartbeat in volume.stagings():
        if staging_abandoned(owner, heartbeat, me, timeout):
            removed = volume.cleanup_staging(ino, version)
            log.info("event=staging_reclaimed ino=%d version=%d owner=%s blocks=%d", ino, version, owner, removed)
            stagings += 1
            blocks += removed
    return stagings, blocks
