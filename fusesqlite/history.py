"""A volume's history as users name it: versions and times as text, and the log.

Every commit makes a version of the whole volume and keeps the old ones, so "the
volume at version V" is what reads as of V return (``Volume.lookup``, ``list_dir``,
``read_inode`` and the blocks at a record's ``dver`` all take a version).

A version prints as its commit's versionstamp, a decimal number (``42``; on
FoundationDB a bigger one): the order of the numbers is the order of the commits.
Versions that are no versionstamp print as ``pre-N``: the volume's creation (``pre-1``)
and the history of a volume upgraded from a format without versionstamps.

A time is ISO 8601 (``2026-12-05T14:30``, local time unless it names its zone),
relative to now (``-10min``, ``-2h``, ``-7d``), or ``@SECONDS`` since the epoch; as a
point in history it means the newest version committed at or before it. Commit times
are the committing host's clock (docs/history.md says what skew does to them).
"""
from __future__ import annotations

import datetime
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import ALL_VERSIONS, STAMPED
from fusesqlite.volume import LogEntry, Volume

#: what ``--at``, ``--since`` and ``--to`` accept, for error messages and --help
WHEN_FORMS = "a version from `fusesqlite log` (42, pre-1), an ISO 8601 time (2026-12-05T14:30), -10min, -2h, -7d or @SECONDS"
TIME_FORMS = "an ISO 8601 time (2026-12-05T14:30), -30s, -10min, -2h, -7d or @SECONDS"

_PRE = "pre-"
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)(s|sec|min|m|h|d|w)")


class HistoryError(ValueError):
    """A version or time a user named that is not one, or not in the volume: one line."""


def version_text(version: int) -> str:
    """How users see ``version`` (and type it back to ``--at``)."""
    return str(version - STAMPED) if version >= STAMPED else f"{_PRE}{version}"


def parse_version(text: str) -> int | None:
    """The version ``text`` names (``version_text``'s inverse), None if it names no version."""
    if text.isdigit():
        stamp = int(text)
        return STAMPED + stamp if 0 < stamp <= ALL_VERSIONS - STAMPED else None
    if text.startswith(_PRE) and text[len(_PRE):].isdigit():
        number = int(text[len(_PRE):])
        return number if 0 < number < STAMPED else None
    return None


def parse_time(text: str, now: float | None = None) -> float:
    """Seconds since the epoch that ``text`` names (HistoryError if it names no time)."""
    now = time.time() if now is None else now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            pass
    else:
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return when.timestamp()  # a naive time is local time
    raise HistoryError(f"{text!r} is not a time; use {TIME_FORMS}")


def time_text(seconds: float) -> str:
    """A commit time in local time, to the second, as ``parse_time`` reads it back."""
    return datetime.datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def resolve(volume: Volume, when: str) -> int:
    """The version ``when`` (a version or a time, ``WHEN_FORMS``) names in ``volume``.

    A version must be one a commit made; a time gives the newest version committed at or
    before it, read from the log newest first."""
    from fusesqlite import retention  # it reads the volume's log through this module

    version = parse_version(when)
    if version is not None:
        if volume.log_entry(version) is None:
            if version < retention.horizon(volume):
                raise HistoryError(f"version {when} of volume {volume.name!r} was removed by gc (--keep); "
                                   "see: fusesqlite log")
            raise HistoryError(f"volume {volume.name!r} has no version {when}; see: fusesqlite log")
        return version
    if not when.startswith(("-", "@")) and not when[:4].isdigit():
        raise HistoryError(f"{when!r} is neither a version nor a time; use {WHEN_FORMS}")
    moment = parse_time(when)
    first = None
    for entry in volume.log_newest_first():
        if entry.time <= moment:
            return entry.version
        first = entry
    if first is None:
        raise HistoryError(f"volume {volume.name!r} has no versions")
    kept = " kept by gc" if retention.horizon(volume) else ""
    raise HistoryError(
        f"{when} ({time_text(moment)}) is before the first version{kept} of volume {volume.name!r}, "
        f"{version_text(first.version)} at {time_text(first.time)}"
    )


@dataclass(frozen=True)
class Change:
    """One version as ``fusesqlite log`` shows it."""

    version: int
    time: float
    mount: str
    #: paths of the files and directory entries it changed, as the volume names them now
    #: (a file removed since: the name the version gave it, or ``#INODE``)
    files: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "version": version_text(self.version),
            "time": datetime.datetime.fromtimestamp(self.time).astimezone().isoformat(timespec="milliseconds"),
            "unix_time": self.time,
            "mount": self.mount,
            "files": list(self.files),
        }


class Tree:
    """The volume's paths at one version: inode -> path and path -> inode, read on first
    use with one ``list_dir`` per directory."""

    def __init__(self, volume: Volume, version: int) -> None:
        self.paths: dict[int, str] = {ROOT_INO: "/"}
        self.inodes: dict[str, int] = {"/": ROOT_INO}
        self.directories: set[int] = {ROOT_INO}
        todo = [ROOT_INO]
        while todo:
            parent = todo.pop()
            prefix = self.paths[parent].rstrip("/") + "/"
            for name, ino, rec in volume.list_dir(parent, version):
                path = prefix + name.decode(errors="surrogateescape")
                self.paths[ino] = path
                self.inodes[path] = ino
                if _is_dir(rec):
                    self.directories.add(ino)
                    todo.append(ino)

    def child(self, parent: int, name: bytes) -> str:
        prefix = self.paths.get(parent, f"#{parent}").rstrip("/") + "/"
        return prefix + name.decode(errors="surrogateescape")


def walk(volume: Volume, path: str, version: int) -> tuple[int, Inode] | None:
    """(ino, record) of ``path`` (as ``normalize`` gives it) at ``version``, None if absent."""
    rec = volume.read_inode(ROOT_INO, version)
    found = None if rec is None else (ROOT_INO, rec)
    for part in path.split("/"):
        if not part:
            continue
        if found is None or not _is_dir(found[1]):
            return None
        found = volume.lookup(found[0], part.encode(errors="surrogateescape"), version)
    return found


def _is_dir(rec: Inode) -> bool:
    return stat.S_ISDIR(rec.mode)


def normalize(path: str) -> str:
    """A path inside the volume as ``Tree`` names it: absolute, no trailing slash."""
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise HistoryError(f"{path!r}: name a path inside the volume without '..'")
    return "/" + "/".join(parts)


def changes(
    volume: Volume, *, path: str | None = None, limit: int | None = None, since: float | None = None
) -> Iterator[Change]:
    """The versions that changed files (``path``'s only, if given), newest first: at most
    ``limit`` of them, none committed before ``since``. Versions that only moved a write
    lease between mounts change no file and are left out. A path the volume does not
    have fails here (HistoryError), before the first version is read."""
    head = volume.open(create=False)
    tree = Tree(volume, head)
    wanted_ino: int | None = None
    wanted_entry: tuple[int, bytes] | None = None
    if path is not None:
        path = normalize(path)
        wanted_ino = tree.inodes.get(path)
        parent_path, _, name = path.rpartition("/")
        parent = tree.inodes.get(parent_path or "/")
        if parent is not None and name:
            wanted_entry = (parent, name.encode(errors="surrogateescape"))
        if wanted_ino is None and wanted_entry is None:
            raise HistoryError(f"volume {volume.name!r} has no {path} (nor a directory that held it)")
    return _changes(volume, head, tree, path is not None, wanted_ino, wanted_entry, limit, since)


def _changes(
    volume: Volume, head: int, tree: Tree, filtered: bool, wanted_ino: int | None,
    wanted_entry: tuple[int, bytes] | None, limit: int | None, since: float | None,
) -> Iterator[Change]:
    shown = 0
    for entry in volume.log_newest_first(head):
        if since is not None and entry.time < since:
            return
        if filtered and not _touches(entry, wanted_ino, wanted_entry, tree):
            continue
        files = _files(entry, tree)
        if not files:
            continue
        yield Change(entry.version, entry.time, entry.author, files)
        shown += 1
        if limit is not None and shown >= limit:
            return


def _touches(entry: LogEntry, ino: int | None, name: tuple[int, bytes] | None, tree: Tree) -> bool:
    if ino is not None and ino in entry.inodes:
        return True
    if name is not None and name in entry.dirents:
        return True
    return ino in tree.directories and any(parent == ino for parent, _ in entry.dirents)


def _files(entry: LogEntry, tree: Tree) -> tuple[str, ...]:
    """What ``entry`` changed, by path: its directory entries, and the files (not the
    directories, whose times every create and unlink changes) it wrote."""
    out = {tree.child(parent, name) for parent, name in entry.dirents}
    for ino in entry.inodes:
        if ino in tree.directories:
            continue
        known = tree.paths.get(ino)
        if known is not None:
            out.add(known)
        elif not entry.dirents:
            out.add(f"#{ino}")
    return tuple(sorted(out))
