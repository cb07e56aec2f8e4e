"""systemd's readiness protocol (sd_notify(3)) for ``Type=notify`` units
(scripts/fusesqlite@.service): the unit counts as started once the mount serves,
so units ordered after it find the files there.

Written out rather than taken from a library: the protocol is one datagram to the
socket named by ``$NOTIFY_SOCKET``, and the Python bindings of libsystemd need its
headers and a compiler on the host.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("fusesqlite.systemd")


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to the service
    manager, if one asked for it; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("event=notify_failed state=%r socket=%r cause=%s", state, address, e.strerror or e)
        return False
    return True
