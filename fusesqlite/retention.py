"""Retention: which old versions a volume keeps, and removing the rest
(``fusesqlite gc --keep DURATION``; docs/history.md, "Retention").

Every commit keeps the versions before it, so without this the store grows with every
commit. gc picks a *horizon* H, the oldest version that must stay readable: the newest
version committed at or before ``now - keep``, or older if something still reads an
older one: a live mount's oldest version in use (its registration, below), a mount of a
past version (``mount --at``), a pin (``fusesqlite pin``). Then, for every versioned
key, it keeps the versions newer than H and the newest one at or before H (what a read
at H finds), and removes the others:

- records (``i``) and directory entries (``d``): as said; where the newest at or before
  H says "removed", that goes too (a read at H then finds nothing, as it did);
- blocks (``b``): a file's blocks are read at its record's data version (``dver``),
  not at the reading version, and the blocks of a big transaction are staged at a
  version older than the commit that publishes them. So a file's blocks are kept
  against D, the oldest data version a kept record of it has (the record at H, else
  the oldest newer one): every version newer than D, and the newest at or before D. A
  file no kept record names (removed before H) loses every block at or before H; a
  file with a staging under way keeps all of its blocks;
- the log: entries older than the newest one at or before H (which stays: the oldest
  version of the volume).

The horizon is written to the store before anything is removed, and never moves
back: whoever reads an old version (a restore, a mount of a past version) checks
after reading that the horizon has not passed it.

**Mount registrations.** A mount writes ``("mount", id)`` = (oldest version it may
read, expiry, host, pid, mount point, kind) when it starts and every
``REGISTER_EVERY`` seconds; its oldest version is the lesser of its snapshot, what it
has followed, and the data versions of the files it has open. A registration that
expired (``MOUNT_TTL`` without renewal) or whose process is gone (same host) holds
nothing back, and gc removes it.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fusesqlite.history import version_text
from fusesqlite.identity import dead_here
from fusesqlite.inodes import Inode
from fusesqlite.keyspace import pack, unpack
from fusesqlite.store.base import Transaction
from fusesqlite.volume import THIS_VERSION, Volume, transact_resolved

log = logging.getLogger("fusesqlite.retention")

#: a mount renews its registration this often (seconds): one blind write, and how far
#: behind its use a registration may hold gc back
REGISTER_EVERY = 2.0
#: a registration not renewed for this long holds nothing back
MOUNT_TTL = 120.0
#: rows read per store transaction while collecting
SCAN_PAGE = 2000
#: keys removed per store transaction
CLEAR_BATCH = 2000

Progress = Callable[[str, int, int], None]


class RetentionError(ValueError):
    """A retention request that cannot be done as asked: one line."""


# -- registrations and pins ------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    mount_id: str
    oldest: int
    expiry: float
    host: str
    pid: int
    mountpoint: str
    kind: str  # "read-write", "read-only" or "at"

    def live(self, now: float) -> bool:
        return self.expiry > now and not dead_here(self.mount_id)


def register(volume: Volume, oldest: int, mountpoint: str, kind: str) -> int:
    """Write (or renew) this mount's registration; return the horizon, read in the same
    transaction (above ``oldest``: gc passed it before the registration). Idempotent."""
    value = pack((oldest, time.time() + MOUNT_TTL, socket.gethostname(), os.getpid(), mountpoint, kind))
    key, hkey = volume.ks.mount_entry(volume.author), volume.ks.horizon()

    def fn(tr: Transaction) -> int:
        tr.set(key, value)
        return _horizon(tr.get(hkey))

    return transact_resolved(volume.store, fn, "mount registration")


def unregister(volume: Volume) -> None:
    key = volume.ks.mount_entry(volume.author)
    transact_resolved(volume.store, lambda tr: tr.clear(key), "mount registration")


def registrations(volume: Volume) -> list[Registration]:
    rows = volume.store.transact(lambda tr: tr.get_range(*volume.ks.children("mount")))
    out = []
    for key, value in rows:
        oldest, expiry, host, pid, mountpoint, kind = unpack(value)
        out.append(Registration(volume.ks.parts(key)[-1], oldest, expiry, host, pid, mountpoint, kind))
    return out


def pins(volume: Volume) -> dict[str, int]:
    rows = volume.store.transact(lambda tr: tr.get_range(*volume.ks.children("pin")))
    return {volume.ks.parts(key)[-1]: unpack(value)[0] for key, value in rows}


def set_pin(volume: Volume, name: str, version: int) -> None:
    """Pin ``version`` as ``name`` (replacing a pin of that name); RetentionError if gc has
    removed it already."""
    key, hkey = volume.ks.pin(name), volume.ks.horizon()

    def fn(tr: Transaction) -> None:
        if version < _horizon(tr.get(hkey)):
            raise RetentionError("that version is older than what gc keeps (its horizon); pin a newer one")
        tr.set(key, pack((version,)))

    transact_resolved(volume.store, fn, "pin")


def clear_pin(volume: Volume, name: str) -> bool:
    key = volume.ks.pin(name)

    def fn(tr: Transaction) -> bool:
        found = tr.get(key) is not None
        tr.clear(key)
        return found

    return transact_resolved(volume.store, fn, "unpin")


def horizon(volume: Volume) -> int:
    """The oldest version gc keeps readable (0: gc has removed no version)."""
    return _horizon(volume.store.transact(lambda tr: tr.get(volume.ks.horizon())))


def _horizon(raw: bytes | None) -> int:
    return unpack(raw)[0] if raw else 0


# -- background collection: one mount at a time -----------------------------------------
#: ``mount --retention``'s default: a day of history, as Litestream keeps by default;
#: the store holds at most about a day of changes beyond the live data
DEFAULT_RETENTION = "24h"
#: how often a mount with a retention window collects (the first time a minute after it
#: starts, or COLLECT_EVERY if shorter); tests shorten it (FUSESQLITE_COLLECT_EVERY=SECONDS)
COLLECT_EVERY = float(os.environ.get("FUSESQLITE_COLLECT_EVERY", 600.0))
FIRST_COLLECT_AFTER = min(60.0, COLLECT_EVERY)


def take_turn(volume: Volume, ttl: float) -> bool:
    """Whether this mount may collect now: the volume's gc turn, taken for ``ttl`` seconds
    unless another live mount has it (two collecting at once would be safe, and twice
    the work)."""
    key = volume.ks.key("gc_turn")

    def fn(tr: Transaction) -> bool:
        raw = tr.get(key)
        if raw is not None:
            owner, expiry = unpack(raw)
            if owner != volume.author and expiry > time.time() and not dead_here(owner):
                return False
        tr.set(key, pack((volume.author, time.time() + ttl)))
        return True

    return transact_resolved(volume.store, fn, "gc turn")


def end_turn(volume: Volume) -> None:
    key = volume.ks.key("gc_turn")

    def fn(tr: Transaction) -> None:
        raw = tr.get(key)
        if raw is not None and unpack(raw)[0] == volume.author:
            tr.clear(key)

    transact_resolved(volume.store, fn, "gc turn")


# -- choosing the horizon --------------------------------------------------------------
@dataclass(frozen=True)
class Horizon:
    version: int
    #: what set it: "window", "mount MOUNT_ID", "pin NAME", or "nothing to remove"
    because: str


def choose_horizon(volume: Volume, keep_seconds: float, now: float | None = None) -> Horizon:
    """The horizon for a window of ``keep_seconds``: the newest version committed at or
    before ``now - keep_seconds``, or older where a live mount or a pin needs it."""
    now = time.time() if now is None else now
    window = None
    for entry in volume.log_newest_first():
        if entry.time <= now - keep_seconds:
            window = entry.version
            break
    if window is None:
        return Horizon(0, "nothing to remove")
    best = Horizon(window, "window")
    for r in registrations(volume):
        if r.live(now) and r.oldest < best.version:
            best = Horizon(r.oldest, f"mount {r.mount_id} at {r.mountpoint}")
    for name, version in pins(volume).items():
        if version < best.version:
            best = Horizon(version, f"pin {name}")
    return best


# -- removing what is older --------------------------------------------------------------
@dataclass
class Collected:
    horizon: int = 0
    records: int = 0
    entries: int = 0
    blocks: int = 0
    log: int = 0
    registrations: int = 0

    @property
    def keys(self) -> int:
        return self.records + self.entries + self.blocks + self.log


def collect(volume: Volume, keep_seconds: float, progress: Progress | None = None) -> tuple[Horizon, Collected]:
    """Remove what no version at or after the horizon for ``keep_seconds`` reads."""
    done = Collected()
    done.registrations = clear_dead_registrations(volume)
    chosen = choose_horizon(volume, keep_seconds)
    if chosen.version:
        collect_at(volume, chosen.version, done, progress)
        log.log(logging.INFO if done.keys else logging.DEBUG,"event=gc_history horizon=%s because=%r records=%d entries=%d blocks=%d log=%d",
                 version_text(chosen.version), chosen.because, done.records, done.entries, done.blocks, done.log)
    return chosen, done


def collect_at(volume: Volume, h: int, done: Collected | None = None, progress: Progress | None = None) -> Collected:
    """Remove what no read at version ``h`` or later needs (``h``: a version of the volume,
    which the caller made sure nothing older is read at)."""
    done = done or Collected()
    previous = _raise_horizon(volume, h)
    done.horizon = h
    if h <= previous:
        log.info("event=gc_history_nothing_new horizon=%s previous=%s", version_text(h), version_text(previous))
    stagings = {ino for ino, _, _, _ in volume.stagings()}
    dmin, done.records = _collect_records(volume, h, progress)
    done.entries = _collect_versioned(volume, "d", h, progress)
    done.blocks = _collect_blocks(volume, h, dmin, stagings, progress)
    done.log = _collect_log(volume, h)
    return done


def clear_dead_registrations(volume: Volume) -> int:
    """Remove the registrations of mounts that died (expired, or gone on this host); return how many."""
    now = time.time()
    dead = [r for r in registrations(volume) if not r.live(now)]
    for r in dead:
        key = volume.ks.mount_entry(r.mount_id)

        def fn(tr: Transaction, key: bytes = key) -> None:
            tr.clear(key)

        transact_resolved(volume.store, fn, "mount registration")
        log.info("event=registration_cleared mount=%s mountpoint=%s", r.mount_id, r.mountpoint)
    return len(dead)


def _raise_horizon(volume: Volume, h: int) -> int:
    """Write the horizon ``h`` (it never moves back); return the one before."""
    key = volume.ks.horizon()

    def fn(tr: Transaction) -> int:
        old = _horizon(tr.get(key))
        if h > old:
            tr.set(key, pack((h,)))
        return old

    return transact_resolved(volume.store, fn, "horizon")


def _rows(volume: Volume, kind: str) -> Iterator[tuple[bytes, bytes]]:
    """Every row of ``kind`` in key order, a page per store transaction."""
    begin, end = volume.ks.children(kind)
    while True:
        rows = volume.store.transact(lambda tr: tr.get_range(begin, end, limit=SCAN_PAGE))
        yield from rows
        if len(rows) < SCAN_PAGE:
            return
        begin = rows[-1][0] + b"\x00"


class _Clearer:
    """Keys to remove, cleared in batches of CLEAR_BATCH (each its own transaction: a
    clear is idempotent, and nothing reads versions older than the horizon)."""

    def __init__(self, volume: Volume, what: str, progress: Progress | None) -> None:
        self.volume, self.what, self.progress = volume, what, progress
        self.pending: list[bytes] = []
        self.count = 0

    def add(self, key: bytes) -> None:
        self.pending.append(key)
        if len(self.pending) >= CLEAR_BATCH:
            self.flush()

    def flush(self) -> int:
        keys, self.pending = self.pending, []
        if keys:
            def fn(tr: Transaction) -> None:
                for key in keys:
                    tr.clear(key)

            transact_resolved(self.volume.store, fn, f"gc of {self.what}")
            self.count += len(keys)
            if self.progress is not None:
                self.progress(f"removing old {self.what}", self.count, 0)
        return self.count


def _split(volume: Volume, key: bytes) -> tuple[tuple, int]:
    """(the versioned key's name, its version)."""
    parts = volume.ks.parts(key)
    return parts[:-1], parts[-1]


def _collect_versioned(volume: Volume, kind: str, h: int, progress: Progress | None,
                       seen: Callable[[tuple, int, bytes, bool], None] | None = None,
                       gone: Callable[[tuple], None] | None = None) -> int:
    """Remove, for every key of ``kind``, the versions older than its newest at or before
    ``h``, and that one too if it says "removed" (an empty value). ``seen(name, version,
    value, kept)`` hears of every row, ``gone(name)`` of every key left with none."""
    clear = _Clearer(volume, {"i": "records", "d": "entries"}.get(kind, kind), progress)
    name: tuple | None = None
    candidate: tuple[bytes, bytes] | None = None  # the newest row at or before h of ``name``
    later = False  # ``name`` has rows after h

    def close_name() -> None:
        # a clone keeps its removals: without them a read would find the base's row
        if candidate is not None and not candidate[1] and volume.base is None:
            clear.add(candidate[0])
            if gone is not None and name is not None and not later:
                gone(name)
        elif candidate is not None and seen is not None:
            this, version = _split(volume, candidate[0])
            seen(this, version, candidate[1], True)

    for key, value in _rows(volume, kind):
        this, version = _split(volume, key)
        if this != name:
            close_name()
            name, candidate, later = this, None, False
        if version <= h:
            if candidate is not None:
                clear.add(candidate[0])
            candidate = (key, value)
        else:
            later = True
            if seen is not None:
                seen(this, version, value, False)
    close_name()
    return clear.flush()


def _collect_records(volume: Volume, h: int, progress: Progress | None) -> tuple[dict[int, int | None], int]:
    """``_collect_versioned`` for records; also, per inode, the oldest data version a
    kept record has (None: no kept record, the file is gone at every kept version)."""
    dmin: dict[int, int | None] = {}

    def seen(name: tuple, version: int, value: bytes, at_horizon: bool) -> None:
        ino = name[-1]
        dmin.setdefault(ino, None)
        if not value:
            return
        dver = Inode.unpack(value).dver
        dver = version if dver == THIS_VERSION else dver
        current = dmin[ino]
        if at_horizon or current is None:
            dmin[ino] = dver if current is None else min(current, dver)

    # a removed inode's last key: what mounts watched of it (coherence/follow.py). Its
    # number is never given again, so nothing will change or watch it any more
    changed = _Clearer(volume, "change marks", None)
    removed = _collect_versioned(volume, "i", h, progress, seen,
                                 gone=lambda name: changed.add(volume.ks.changed(name[-1])))
    changed.flush()
    return dmin, removed


def _collect_blocks(volume: Volume, h: int, dmin: dict[int, int | None], stagings: set[int],
                    progress: Progress | None) -> int:
    """Per block, keep the versions newer than its file's oldest kept data version D and
    the newest at or before D; a file with no kept record loses its blocks at or before h."""
    clear = _Clearer(volume, "blocks", progress)
    group: tuple[int, int] | None = None
    candidate: bytes | None = None
    for key, _ in _rows(volume, "b"):
        _, ino, block_no, version = volume.ks.parts(key)
        if ino in stagings:
            continue  # a big transaction under way: its blocks carry older versions than its commit
        if (ino, block_no) != group:
            group, candidate = (ino, block_no), None
        d = dmin.get(ino)
        if d is None:
            if version <= h:
                clear.add(key)
            continue
        if version <= d:
            if candidate is not None:
                clear.add(candidate)
            candidate = key
    return clear.flush()


def _collect_log(volume: Volume, h: int) -> int:
    """Remove log entries older than the newest one at or before ``h``."""
    oldest = next(volume.log_newest_first(h), None)
    if oldest is None:
        return 0
    clear = _Clearer(volume, "log", None)
    for key, _ in _rows(volume, "log"):
        if volume.ks.last_version(key) >= oldest.version:
            break
        clear.add(key)
    return clear.flush()
