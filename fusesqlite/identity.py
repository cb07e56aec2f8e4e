"""Who a mount is, and whether it is still alive.

A mount id is ``host:pid:random``. On the same host a dead owner is known at
once (its process is gone); elsewhere only by time (leases expire, stagings go
quiet).
"""
from __future__ import annotations

import os
import socket
import uuid


def new_mount_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def dead_here(owner: str) -> bool:
    """True only if ``owner`` is a mount of this host whose process is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fusesqlite" not in f.read()
    except OSError:
        return True
