"""Garbage collection: stagings left by mounts that died before their commit point, and
call keys (volume.Attempts) that no retry can need any more.
"""
from __future__ import annotations

import logging
import time

from fusesqlite.identity import dead_here
from fusesqlite.store.base import StoreError
from fusesqlite.volume import CALL_KEEP_SECONDS, Volume

log = logging.getLogger("fusesqlite.gc")

#: a staging whose owner has not written for this long is presumed dead (another host)
STAGING_TIMEOUT = 120.0


def staging_abandoned(owner: str, heartbeat: float, me: str, timeout: float = STAGING_TIMEOUT) -> bool:
    if owner == me:
        return False
    return dead_here(owner) or time.time() - heartbeat > timeout


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


def reclaim_calls(volume: Volume, keep: float = CALL_KEEP_SECONDS) -> int:
    """Remove call keys older than ``keep`` seconds (of dead mounts, or of calls given up
    with their result unknown); return how many."""
    removed = volume.clear_calls(time.time() - keep)
    if removed:
        log.info("event=calls_reclaimed count=%d", removed)
    return removed


def remove_own_stagings(volume: Volume) -> None:
    """Remove every staging a command (``volume.author``) began: also one whose
    beginning landed just as Ctrl-C interrupted it, before the command had its version.
    What fails stays for gc (``--staging-timeout``)."""
    try:
        mine = [(ino, version) for ino, version, owner, _ in volume.stagings() if owner == volume.author]
        for ino, version in mine:
            volume.cleanup_staging(ino, version)
    except StoreError as e:
        log.warning("event=staging_left owner=%s cause=%s", volume.author, e)
