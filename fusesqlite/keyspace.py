"""Where each piece of a volume lives in the store's ordered keyspace.

Everything a reader can see is versioned: inode records, directory entries and
blocks all end in the volume version that wrote them, so "the value at version
v" is one reverse range read with limit 1 ending at v, old versions stay readable
until garbage collection, and time travel needs no new layout. An empty value is
a tombstone.

    (prefix, 'meta')                         -> volume format and block size
    (prefix, 'head')                         -> latest committed version
    (prefix, 'next_ino')                     -> next free inode number
    (prefix, 'log', version)                 -> (unix time, author, inodes, entries, lease events)
    (prefix, 'changed', ino)                 -> (version,): the last version whose log entry names
                                                ``ino`` (its record or lease, or an entry in it):
                                                what a mount watches of the files and
                                                directories it holds (coherence/follow.py)
    (prefix, 'lease', ino)                   -> (mount id, expiry): the one mount writing a database
    (prefix, 'wal', parent, name)            -> (mount id, expiry): the one mount with database
                                                `name` in WAL mode (its -shm open there); every
                                                commit of `name` or `name-wal` reads it
    (prefix, 'i', ino, version)              -> inode record (see inodes.py)
    (prefix, 'd', parent, name, version)     -> child inode number
    (prefix, 'cd', parent, name)             -> child inode number at the head version: the
                                                directory as it is now (live entries only), so
                                                listing costs its entries, not its history
    (prefix, 'b', ino, block_no, version)    -> block (see pages.py)
    (prefix, 'call', mount id, call number)  -> (unix time, version) of a call that wrote a
                                                version, for its retries to find (volume.Attempts)
    (prefix, 'staging', ino, version)        -> (mount id, heartbeat time) of a staged transaction
    (prefix, 'stg', ino, version, block_no)  -> b'' : which blocks a staging wrote (for cleanup)

A file's blocks are read at its record's data version, not at the snapshot:
blocks staged at a newer version stay invisible until a commit points the record
at them (docs/architecture.md, "Transactions beyond the store's limits").

Keys are FoundationDB tuple-layer encodings (pure Python, needs no client library),
which order integers numerically and keep each tuple's children after it.

Versions come from the store: a commit's version is ``STAMPED`` plus its versionstamp
(store.Stamp) as an integer, so commits need no counter that every writer of the
volume would read and conflict on, and versions still grow in commit order. The
tuple layer encodes an integer in [2**80, 2**88) as ``1d 0b`` and 11 bytes, the
first of them ``01``: the stamp's 10 bytes end the encoding, at a place the commit
knows, and the store fills them in (``Keyspace.stamped``). Smaller versions (1, the
volume's creation, and those of volumes made before versionstamps) sort before every
stamped one.
"""
from __future__ import annotations

from fdb import tuple as fdbtuple

pack = fdbtuple.pack
unpack = fdbtuple.unpack

#: the version of a commit is this plus its versionstamp (store.Stamp) as an integer
STAMPED = 1 << 80
#: a version above every version: "the latest version" of a versioned key
ALL_VERSIONS = (1 << 88) - 1
_STAMPED_CODE = b"\x1d\x0b"  # the tuple layer's positive integer of 11 bytes
#: how a key built with version ``STAMPED`` ends: the stamp's 10 bytes are the zeros
_STAMP_PLACEHOLDER = _STAMPED_CODE + b"\x01" + bytes(10)


def stamped_version(stamp: bytes) -> int:
    """The version of the commit whose versionstamp is ``stamp``."""
    return STAMPED + int.from_bytes(stamp, "big")


#: the whole project lives under this first tuple element, so a FoundationDB
#: cluster can hold other data beside it
ROOT = "fusesqlite"

_packed_names: dict[str, bytes] = {}  # the few kinds of key ("b", "i", "lease", ...)


def _pack_one(part: object) -> bytes:
    """``pack((part,))``, directly for what keys are made of: non-negative integers
    (type code 0x14 + byte count, then big-endian bytes), stamped versions, and the
    kinds of key."""
    if type(part) is int and 0 <= part < 1 << 63:
        if part == 0:
            return b"\x14"
        n = (part.bit_length() + 7) // 8
        return bytes((0x14 + n,)) + part.to_bytes(n, "big")
    if type(part) is int and STAMPED <= part <= ALL_VERSIONS:
        return _STAMPED_CODE + part.to_bytes(11, "big")
    if type(part) is str:
        packed = _packed_names.get(part)
        if packed is None:
            packed = pack((part,))
            if len(_packed_names) < 64:
                _packed_names[part] = packed
        return packed
    return pack((part,))


class Keyspace:
    """Key builders for one volume."""

    __slots__ = ("volume", "prefix", "_plen")

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.prefix = pack((ROOT, volume))
        self._plen = len(self.prefix)

    def key(self, *parts: object) -> bytes:
        """``prefix + pack(parts)``, element by element: the tuple layer encodes a flat
        tuple as its elements' encodings one after the other, and its generic
        ``pack`` cost a commit more than a tenth of its time."""
        return self.prefix + b"".join([_pack_one(p) for p in parts])

    def last_version(self, key: bytes) -> int:
        """The version that ends a versioned key."""
        if key[-13:-11] == _STAMPED_CODE:
            return int.from_bytes(key[-11:], "big")
        return self.parts(key)[-1]

    @staticmethod
    def stamped(key: bytes) -> int:
        """The offset of the versionstamp in ``key``, a key built with version ``STAMPED``
        as its last part (the store puts the commit's stamp there)."""
        assert key.endswith(_STAMP_PLACEHOLDER), key
        return len(key) - 10

    def parts(self, key: bytes) -> tuple:
        """Inverse of ``key``: the tuple after the volume prefix."""
        return unpack(key[self._plen :])

    # single keys
    def meta(self) -> bytes:
        return self.key("meta")

    def head(self) -> bytes:
        return self.key("head")

    def next_ino(self) -> bytes:
        return self.key("next_ino")

    def log(self, version: int) -> bytes:
        return self.key("log", version)

    def changed(self, ino: int) -> bytes:
        return self.key("changed", ino)

    def inode(self, ino: int, version: int) -> bytes:
        return self.key("i", ino, version)

    def dirent(self, parent: int, name: bytes, version: int) -> bytes:
        return self.key("d", parent, name, version)

    def current_dirent(self, parent: int, name: bytes) -> bytes:
        return self.key("cd", parent, name)

    def block(self, ino: int, block_no: int, version: int) -> bytes:
        return self.key("b", ino, block_no, version)

    def lease(self, ino: int) -> bytes:
        return self.key("lease", ino)

    def wal_owner(self, parent: int, name: bytes) -> bytes:
        """Keyed by the database's directory entry, not its inode: a -shm and a -wal name
        their database by name, and both mounts resolve the pair alike without a lookup."""
        return self.key("wal", parent, name)

    def call(self, author: str, number: int) -> bytes:
        return self.key("call", author, number)

    def mount_entry(self, mount_id: str) -> bytes:
        """A live mount's registration: the oldest version it may still read (retention.py)."""
        return self.key("mount", mount_id)

    def pin(self, name: str) -> bytes:
        return self.key("pin", name)

    def horizon(self) -> bytes:
        """The oldest version gc keeps readable: older ones may be gone (retention.py)."""
        return self.key("horizon")

    def staging(self, ino: int, version: int) -> bytes:
        return self.key("staging", ino, version)

    def staged(self, ino: int, version: int, block_no: int) -> bytes:
        return self.key("stg", ino, version, block_no)

    # ranges: (begin, end) with begin inclusive, end exclusive
    def versions_upto(self, version: int, *parts: object) -> tuple[bytes, bytes]:
        """All versions <= ``version`` of the versioned key ``parts``."""
        return self.key(*parts), self.key(*parts, version + 1)

    def children(self, *parts: object) -> tuple[bytes, bytes]:
        """Every key that extends ``parts``."""
        p = self.key(*parts)
        return p + b"\x00", p + b"\xff"

    def blocks(self, ino: int, first: int = 0, end: int | None = None) -> tuple[bytes, bytes]:
        """Every version of blocks ``first`` .. ``end``-1 of ``ino`` (all blocks if end is None)."""
        begin = self.key("b", ino, first)
        if end is None:
            return begin, self.key("b", ino) + b"\xff"
        return begin, self.key("b", ino, end)

    @staticmethod
    def int_pair(s: bytes) -> tuple[int, int]:
        """``unpack(s)`` for the packing of two non-negative integers, e.g. the
        (block_no, version) after ``key("b", ino)`` in a block key.

        Reading a run of blocks parses one key per row, and the tuple layer's
        generic ``unpack`` costs more than reading the row; such integers (type
        codes 0x14..0x1c: byte count, then big-endian bytes) are decoded here,
        anything else by ``unpack``.
        """
        n = s[0] - 0x14
        if 0 <= n <= 8 and len(s) > n + 1:
            m = s[n + 1] - 0x14
            if 0 <= m <= 8 and len(s) == n + m + 2:
                return int.from_bytes(s[1 : n + 1], "big"), int.from_bytes(s[n + 2 :], "big")
            if len(s) == n + 14 and s[n + 1 : n + 3] == _STAMPED_CODE:  # then a stamped version
                return int.from_bytes(s[1 : n + 1], "big"), int.from_bytes(s[n + 3 :], "big")
        a, b = unpack(s)
        return a, b

    def volume_range(self) -> tuple[bytes, bytes]:
        return self.prefix, self.prefix + b"\xff"
