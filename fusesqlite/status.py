"""``fusesqlite status``: what a store's volumes hold and who is using them.

Everything here is read from the store, so it shows every host's mounts: the
registrations mounts renew every 2 s (retention.py), write leases, pins, the
horizon gc keeps, stagings. The ``--json`` form is documented in docs/operating.md
and stays stable: fields are only ever added.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from fusesqlite import retention
from fusesqlite.gc import staging_abandoned
from fusesqlite.history import Tree, version_text
from fusesqlite.keyspace import ROOT, pack, unpack
from fusesqlite.store.base import Store
from fusesqlite.volume import Lease, Volume


@dataclass
class MountStatus:
    mount_id: str
    host: str
    pid: int
    mountpoint: str
    kind: str  # read-write, read-only, at (a past version), export
    version: str  # the oldest version it may read
    behind_seconds: float  # the head's commit time less that version's (0: up to date)
    last_seen_seconds_ago: float


@dataclass
class LeaseStatus:
    path: str
    holder: str
    busy: bool
    expires_in_seconds: float


@dataclass
class VolumeStatus:
    volume: str
    head: str
    head_time: float
    versions: int
    oldest: str
    oldest_time: float
    horizon: str | None
    #: a clone: "VOLUME@VERSION" it started from; None otherwise
    clone_of: str | None = None
    pins: dict[str, str] = field(default_factory=dict)
    mounts: list[MountStatus] = field(default_factory=list)
    leases: list[LeaseStatus] = field(default_factory=list)
    live_bytes: int = 0
    files: int = 0
    #: left by mounts that died, for gc: expired registrations, abandoned stagings
    leftovers: dict[str, int] = field(default_factory=dict)


@dataclass
class StoreStatus:
    store: str
    bytes_on_disk: int | None  # the embedded store's files; None on FoundationDB
    volumes: list[VolumeStatus] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


def volume_names(store: Store) -> list[str]:
    """Every volume in the store: one short read per volume (keys sort by volume name)."""
    names: list[str] = []
    begin, end = pack((ROOT,)), pack((ROOT,)) + b"\xff"
    while True:
        rows = store.transact(lambda tr: tr.get_range(begin, end, limit=1))
        if not rows:
            return names
        name = unpack(rows[0][0])[1]
        names.append(name)
        begin = pack((ROOT, name)) + b"\xff"


def store_status(store: Store, description: str, path: str | None, only: str | None = None) -> StoreStatus:
    out = StoreStatus(description, _disk_bytes(path) if path else None)
    for name in [only] if only else volume_names(store):
        out.volumes.append(volume_status(Volume(store, name)))
    return out


def _disk_bytes(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file() and e.name.startswith("store.sqlite"))


def volume_status(volume: Volume) -> VolumeStatus:
    now = time.time()
    head = volume.open(create=False)
    log = list(volume.log_newest_first())
    times = {e.version: e.time for e in log}
    newest, oldest = log[0], log[-1]
    horizon = retention.horizon(volume)
    st = VolumeStatus(
        volume=volume.name, head=version_text(head), head_time=newest.time, versions=len(log),
        oldest=version_text(oldest.version), oldest_time=oldest.time,
        horizon=version_text(horizon) if horizon else None,
        clone_of=f"{volume.base.name}@{version_text(volume.base_version)}" if volume.base is not None else None,
        pins={name: version_text(v) for name, v in sorted(retention.pins(volume).items())},
    )
    dead = 0
    for r in retention.registrations(volume):
        if not r.live(now):  # a mount that died: gone from the list, its registration is gc's
            dead += 1
            continue
        seen = max(0.0, now - (r.expiry - retention.MOUNT_TTL))
        behind = max(0.0, newest.time - _time_at(times, r.oldest))
        st.mounts.append(MountStatus(r.mount_id, r.host, r.pid, r.mountpoint, r.kind, version_text(r.oldest),
                                     round(behind, 3), round(seen, 3)))
    tree = Tree(volume, head)
    for key, value in volume.store.transact(lambda tr: tr.get_range(*volume.ks.children("lease"))):
        lease = Lease.unpack(value)
        if lease.live(now):
            ino = volume.ks.parts(key)[-1]
            st.leases.append(LeaseStatus(tree.paths.get(ino, f"#{ino}"), lease.owner, lease.busy,
                                         round(lease.expiry - now, 3)))
    for ino in tree.paths:
        if ino in tree.directories:
            continue
        rec = volume.read_inode(ino, head)
        if rec is not None and rec.is_reg:
            st.files += 1
            st.live_bytes += rec.size
    st.leftovers = {
        "expired_registrations": dead,
        "abandoned_stagings": sum(1 for _, _, owner, beat in volume.stagings()
                                  if staging_abandoned(owner, beat, "")),
    }
    return st


def _time_at(times: dict[int, float], version: int) -> float:
    """The commit time of ``version``, or of the newest logged version before it."""
    if version in times:
        return times[version]
    older = [v for v in times if v <= version]
    return times[max(older)] if older else min(times.values())


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def render(status: StoreStatus) -> str:
    """The compact human form."""
    now = time.time()
    lines = [f"store {status.store}" + (f"  {status.bytes_on_disk / 1e6:.1f} MB on disk"
                                        if status.bytes_on_disk is not None else "")]
    for v in status.volumes:
        lines.append(f"volume {v.volume}: head {v.head} ({_age(now - v.head_time)} ago), {v.versions} version(s) "
                     f"from {v.oldest} ({_age(now - v.oldest_time)} ago), {v.files} file(s), "
                     f"{v.live_bytes / 1e6:.1f} MB")
        if v.clone_of:
            lines.append(f"  a clone of {v.clone_of}")
        if v.pins:
            lines.append("  pins: " + ", ".join(f"{name}={ver}" for name, ver in v.pins.items()))
        for m in v.mounts:
            lines.append(f"  mount {m.host}:{m.pid} {m.mountpoint} {m.kind} at {m.version}, "
                         f"{m.behind_seconds:.1f}s behind, seen {_age(m.last_seen_seconds_ago)} ago")
        for lease in v.leases:
            lines.append(f"  lease {lease.path} held by {lease.holder} ({'busy' if lease.busy else 'idle'}, "
                         f"{lease.expires_in_seconds:.0f}s left)")
        left = {k: n for k, n in v.leftovers.items() if n}
        if left:
            lines.append("  waiting for gc: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in left.items()))
    return "\n".join(lines)

