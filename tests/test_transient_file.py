"""A transient file's contents against a plain bytearray model, below and beyond the
point where they spill from memory to a temporary file."""
from __future__ import annotations

import itertools
import random
import stat

from fusesqlite import _journal
from fusesqlite.fs import transient
from fusesqlite.fs.journal import Act, Journal, State
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


def journal_in(tf: TransientFile, header: bytes | None, database: int | None, ended: bool, unseen: bool,
               kept: bool, cached_opens: int) -> Journal:
    """``tf``'s journal with these bytes and flags, its word for C published as an event would."""
    journal = tf.journal
    journal.truncated(0)
    if header is not None:
        tf.write(0, header + bytes(27) + b"images")
    journal.database = database
    journal.ended_in_cache, journal.unseen, journal.kept_open = ended, unseen, kept
    journal.cached_opens = cached_opens
    tf.data.answers = journal.answers
    return journal


def flags(journal: Journal) -> tuple:
    return (journal.database, journal.ended_in_cache, journal.unseen, journal.kept_open, journal.cached_opens)


def test_c_answers_only_requests_whose_python_event_would_do_nothing():
    """For every combination of a journal's bytes and flags, and every write, fsync and
    flush the kernel can send: where C answers (its own decision, ``_journal.answers``,
    from the one word Python publishes), the Python handler it skips would have
    committed nothing, taken no lease and left every flag as it was. So C never
    answers a commit point nor starts a transaction unseen (fs/journal.py)."""
    tf = TransientFile(1, 1, b"x.db-journal", stat.S_IFREG | 0o644, 0, 0)
    fh = 1 << 40  # no handle of a mount: this test's own registration
    assert _journal.register(fh, tf.data)
    answered = 0
    try:
        combos = itertools.product((None, b"\0", b"\xd9"), (None, 42), *[(False, True)] * 3, (0, 1))
        for combo in combos:
            header, database, ended, unseen, kept, cached_opens = combo
            requests: list[tuple] = [("fsync", c) for c in (False, True)] + [("flush", c) for c in (False, True)]
            requests += [("write", off, byte, c) for off in (0, 512) for byte in (0, 0xD9) for c in (False, True)]
            for request in requests:
                cached = request[-1]
                if cached and not cached_opens:
                    continue  # a write-back or sync through the page cache needs a page-cached handle
                journal = journal_in(tf, header, database, ended, unseen, kept, cached_opens)
                before = flags(journal)
                if request[0] == "write":
                    _, off, byte, _ = request
                    data = bytes([byte]) * 28
                    if not _journal.answers(fh, "write", off, data):
                        continue
                    was = journal.hot
                    # files.py's write: journal_started (a lease) unless the transaction's database is known
                    assert was or journal.database is not None, (combo, request)
                    tf.write(off, data)
                    assert journal.written(off, was, cached) is Act.NOTHING, (combo, request)
                else:
                    if not _journal.answers(fh, request[0]):
                        continue
                    if cached:  # files.py hands only a page-cached handle's fsync and flush to the journal
                        assert journal.synced(closing=request[0] == "flush") is Act.NOTHING, (combo, request)
                assert flags(journal) == before, (combo, request)
                answered += 1
        assert answered > 100  # C answers most of them: the check above is not vacuous
        idle = journal_in(tf, None, None, False, False, False, 0)
        assert idle.answers == _journal.ANSWER_FSYNCS | _journal.ANSWER_FLUSHES
        assert not _journal.answers(fh, "write", 512, b"x" * 28)
    finally:
        _journal.unregister(fh)
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
