"""A transient file's contents against a plain bytearray model, below and beyond the
point where they spill from memory to a temporary file."""
from __future__ import annotations

import itertools
import random
import stat

from fusesqlite.fs import transient
from fusesqlite.fs.journal import State
from fusesqlite.fs.transient import TransientFile


def _apply(model: bytearray, op: str, offset: int, data: bytes) -> None:
    if op == "write":
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset:offset + len(data)] = data
    else:
        del model[offset:]
        model.extend(bytes(offset - len(model)))


def test_contents_match_a_model_across_the_spill(monkeypatch):
    monkeypatch.setattr(transient, "SPOOL_BYTES", 64 * 1024)  # spill within a few writes
    rng = random.Random(6)
    for _ in range(20):
        tf = TransientFile(1, 1, b"x-journal", stat.S_IFREG | 0o644, 0, 0)
        model = bytearray()
        try:
            for _ in range(60):
                op = rng.choice(["write", "write", "write", "truncate"])
                offset = rng.randrange(0, 100 * 1024)
                data = rng.randbytes(rng.randrange(1, 9000))
                _apply(model, op, offset, data)
                if op == "write":
                    tf.write(offset, data)
                else:
                    tf.data.truncate(offset)
                assert tf.size == len(model)
                assert tf.data.first == (model[0] if model else tf.data.first)
                start = rng.randrange(0, len(model) + 10)
                assert tf.read(start, 5000) == bytes(model[start:start + 5000])
            assert tf.read(0, len(model) + 1) == bytes(model)
        finally:
            tf.close()


def test_a_journal_past_the_spill_point_leaves_memory():
    tf = TransientFile(1, 1, b"big-journal", stat.S_IFREG | 0o644, 0, 0)
    try:
        chunk = b"\xd9" + bytes(4095)
        for i in range(transient.SPOOL_BYTES // 4096 + 2):
            tf.write(i * 4096, chunk)
        assert tf.data.spilled
        assert tf.read(transient.SPOOL_BYTES, 4096) == chunk
        assert tf.journal.hot
        tf.journal.truncated(0)
        assert not tf.journal.hot and tf.read(0, 10) == b""
        assert not tf.data.spilled  # an emptied journal is back in memory
    finally:
        tf.close()


def test_the_c_hook_may_answer_a_journals_writes_only_while_its_transaction_runs():
    """``Contents.started`` follows ``Journal.database`` (files.py sets it once the
    transaction took its lease, and clears it at the commit): while it is off, writes to
    a journal that is not hot reach Python, which may start a transaction or refuse one."""
    tf = TransientFile(1, 1, b"x-journal", stat.S_IFREG | 0o644, 0, 0)
    try:
        assert not tf.data.started
        tf.journal.database = 42
        assert tf.data.started and tf.journal.database == 42
        tf.journal.database = None
        assert not tf.data.started
    finally:
        tf.close()


def test_a_journal_is_in_a_transaction_exactly_when_its_state_is_not_idle():
    """``Journal.in_transaction`` (one expression, asked at every fsync and close of a
    database) and ``Journal.state`` say the same, whatever the flags."""
    tf = TransientFile(1, 1, b"x-journal", stat.S_IFREG | 0o644, 0, 0)
    try:
        journal = tf.journal
        for header, ended, unseen, kept, cached in itertools.product((None, b"\0", b"\xd9"), *[(False, True)] * 4):
            journal.truncated(0)
            if header is not None:
                tf.write(0, header + bytes(27))
            journal.ended_in_cache, journal.unseen, journal.kept_open = ended, unseen, kept
            journal.cached_opens = int(cached)
            assert journal.in_transaction == (journal.state is not State.IDLE), journal.state
    finally:
        tf.close()
