"""Keys are the FoundationDB tuple layer's encodings, however Keyspace builds them."""
from __future__ import annotations

import random

from fdb import tuple as fdbtuple

from fusesqlite.keyspace import Keyspace


def test_keys_are_the_tuple_layers_packing():
    ks = Keyspace("vol")
    rng = random.Random(6)
    ints = [0, 1, 255, 256, 65535, 1 << 32, (1 << 62) + 5, (1 << 64) - 1, 1 << 64, -1, -300]
    ints += [rng.randrange(1 << rng.randrange(1, 64)) for _ in range(200)]
    names = ["b", "i", "d", "lease", "log", "staging", "stg", "head", "\x00odd", "ünï"]
    blobs = [b"", b"a.db", b"a\x00b", b"\xff\x00", bytes(rng.randrange(256) for _ in range(40))]
    for _ in range(2000):
        parts = tuple(
            rng.choice([rng.choice(ints), rng.choice(names), rng.choice(blobs)]) for _ in range(rng.randrange(1, 5))
        )
        assert ks.key(*parts) == fdbtuple.pack(("fusesqlite", "vol") + parts), parts
        assert ks.parts(ks.key(*parts)) == parts
