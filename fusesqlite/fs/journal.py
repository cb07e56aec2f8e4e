"""A rollback journal's protocol as this mount sees it: when a transaction of its
database begins, and its commit point, decided from the journal's requests alone.

SQLite's rule (pager.c): a journal is *hot*, one SQLite would play back, while it is
non-empty and its first byte is set. A transaction writes the journal's header
(setting that byte) and page images, then the database's pages; it ends when the
journal stops being hot: deleted (journal_mode DELETE), truncated to zero
(TRUNCATE), or its header zeroed (PERSIST; DELETE with locking_mode EXCLUSIVE).
That moment is the *commit point*: the daemon commits every write of the database
since the transaction began, in one store transaction, before it answers the
request that ended it (files.py).

The kernel's page cache hides part of this. A journal created through the page
cache (``cached``: files.py, "A new journal through the page cache") reaches the
daemon only when SQLite fsyncs or closes it, as a write-back: the daemon may see a
zeroed header long after SQLite zeroed it, or a journal whose whole transaction
ended before the kernel wrote any of it back. Such an end commits at SQLite's next
fsync or close of the journal, which SQLite makes before it goes on, so the app
still waits for its commit.

The states (``Journal.state``), and the events that move between them (the methods
below; each returns what the caller must do, ``Act``):

========================  ==================================================================
state                     meaning
========================  ==================================================================
``IDLE``                  no transaction of this journal's database is known here
``HOT``                   the journal is hot: the database's writes are its transaction's
``ENDED_IN_CACHE``        the kernel wrote back a zeroed header: the commit waits for
                          SQLite's next fsync or close of the journal
``UNSEEN``                written through the page cache since the last commit point: a
                          transaction may be running in the kernel's pages (SQLite
                          ends it before the daemon sees a hot header)
``KEPT``                  a page-cached handle stayed open across the commit point
                          (locking_mode EXCLUSIVE): the next transaction through it
                          starts unseen
========================  ==================================================================

While a journal is in any state but ``IDLE``, its database is *in a transaction*:
nothing but the journal's commit point commits the database (not its fsync, nor
its close, nor another process's).

The C hooks (_journal.c) answer a journal's reads, and the writes, fsyncs and
flushes this module says they may: after every event it publishes one word,
``Contents.answers`` (``Journal.answers``), and C reads nothing else of the
protocol. Each bit is given only where the event C skips could not act:

- ``ANSWER_WRITES``, while the journal's database is known (its write lease held),
  the journal is not empty, no commit waits for an fsync, and a page-cached handle's
  write would find the journal ``UNSEEN`` already; and C takes only a write that
  keeps the header's first byte set. ``written`` acts only on a header zeroed, and
  ``journal_started`` only before the database is known: a C write can make a
  journal hot, never end it, empty it, or start a transaction nobody saw start;
- ``ANSWER_FSYNCS``, unless ``ENDED_IN_CACHE`` (the one state ``synced`` commits in
  at an fsync);
- ``ANSWER_FLUSHES``, unless ``ENDED_IN_CACHE`` or the journal holds unseen bytes
  and is not hot (``synced``'s commit at a close).

C's own writes keep every bit true: they change only bytes, past a non-empty
journal's start or with the header's first byte set.
"""
from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from fusesqlite._journal import ANSWER_FLUSHES, ANSWER_FSYNCS, ANSWER_WRITES


class Contents(Protocol):
    """The journal's bytes (_journal.Contents), with the word the C hooks read."""

    size: int
    first: int
    answers: int

    def truncate(self, size: int) -> None: ...


class State(enum.Enum):
    IDLE = "idle"
    HOT = "hot"
    ENDED_IN_CACHE = "ended in the page cache"
    UNSEEN = "unseen in the page cache"
    KEPT = "kept open across a commit"


class Act(enum.Enum):
    """What an event asks of the caller (files.py)."""

    NOTHING = "nothing"
    #: commit the database's transaction now (``FileOps.commit_journal``), before answering
    COMMIT = "commit"


P = ParamSpec("P")
R = TypeVar("R")


def _event(method: Callable[Concatenate[Journal, P], R]) -> Callable[Concatenate[Journal, P], R]:
    """An event: once it has moved the state, C answers what the new state allows."""

    @functools.wraps(method)
    def run(self: Journal, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._publish()

    return run


class Journal:
    """The protocol state of one journal file (every transient file has one; only a
    journal's ever leaves ``IDLE``)."""

    __slots__ = ("data", "_database", "cached_opens", "unseen", "kept_open", "ended_in_cache", "db_synced",
                 "refused")

    def __init__(self, data: Contents) -> None:
        self.data = data
        #: the database whose transaction this journal's writes belong to, once the
        #: write lease on it is taken (files.py, ``journal_started``)
        self._database: int | None = None
        #: open handles through the page cache: their writes reach the daemon at
        #: SQLite's fsync or close of the journal, not at its writes
        self.cached_opens = 0
        #: written through the page cache since the last commit point (``UNSEEN``)
        self.unseen = False
        #: a page-cached handle stayed open across the last commit point (``KEPT``)
        self.kept_open = False
        #: the kernel wrote back a zeroed header (``ENDED_IN_CACHE``)
        self.ended_in_cache = False
        #: the database was fsynced during the transaction: the kernel holds none of its
        #: pages (SQLite fsyncs the database last, unless synchronous=OFF)
        self.db_synced = False
        #: the errno of a write lease refused at the journal's create, for its first write
        self.refused: int | None = None
        self._publish()

    # -- what the state is ------------------------------------------------------------------
    @property
    def hot(self) -> bool:
        """SQLite's rule: non-empty, first byte set."""
        return self.data.size > 0 and self.data.first != 0

    @property
    def database(self) -> int | None:
        return self._database

    @database.setter
    def database(self, ino: int | None) -> None:
        self._database = ino
        self._publish()

    @property
    def answers(self) -> int:
        """The requests the C hooks may answer now (the module's docstring says why each)."""
        if self.ended_in_cache:
            return 0
        bits = ANSWER_FSYNCS
        if not (self.unseen and self.data.size > 0 and not self.hot):
            bits |= ANSWER_FLUSHES
        if self._database is not None and self.data.size > 0 and (self.unseen or not self.cached_opens):
            bits |= ANSWER_WRITES
        return bits

    def _publish(self) -> None:
        """After every event: what C answers follows the state."""
        self.data.answers = self.answers

    @property
    def state(self) -> State:
        if self.hot:
            return State.HOT
        if self.ended_in_cache:
            return State.ENDED_IN_CACHE
        if self.unseen:
            return State.UNSEEN
        if self.kept_open and self.cached_opens > 0:
            return State.KEPT
        return State.IDLE

    @property
    def in_transaction(self) -> bool:
        """Whether the database's writes may belong to an uncommitted transaction of this
        journal (any state but ``IDLE``): then nothing but the journal's own commit point
        commits them. Asked at every fsync and close of a database: one expression, not
        ``state``'s walk."""
        return self.hot or self.ended_in_cache or self.unseen or (self.kept_open and self.cached_opens > 0)

    def _ended(self, was: bool) -> Act:
        """The commit point, if the journal was in a transaction (``was``) and is neither
        hot nor waiting for a write-back's fsync now."""
        return Act.COMMIT if was and not self.hot and not self.ended_in_cache else Act.NOTHING

    # -- events -----------------------------------------------------------------------------
    @_event
    def created_cached(self) -> None:
        """Created through the page cache: what SQLite writes stays unseen until it
        fsyncs or closes the journal."""
        self.cached_opens += 1
        self.unseen = True

    def opened(self) -> None:
        """Opened again: whoever opens a journal (a new transaction, or the rollback of
        a hot one) writes its database anew, which an earlier fsync does not cover."""
        self.db_synced = False

    @_event
    def written(self, offset: int, was_hot: bool, cached: bool) -> Act:
        """The journal's bytes changed at ``offset``; ``was_hot`` before the write."""
        if cached:
            self.unseen = True
        if offset == 0 and was_hot and not self.hot:  # the header zeroed
            if cached:
                # written back by the kernel, maybe while the app already runs its next
                # transaction: commit at the journal's next fsync or close, which the
                # app waits for
                self.ended_in_cache = True
                return Act.NOTHING
            return self._ended(was_hot)
        return Act.NOTHING

    @_event
    def truncated(self, size: int) -> Act:
        was = self.in_transaction
        self.ended_in_cache = False
        self.data.truncate(size)
        return self._ended(was)

    @_event
    def synced(self, closing: bool) -> Act:
        """An fsync (``closing``: a flush) of a page-cached handle: the commit point,
        if what the kernel wrote back before it ended the transaction. That is a
        zeroed header (``ENDED_IN_CACHE``), unless SQLite started its next transaction
        since (the header is set again: it then commits with that one); at a close,
        also a journal never hot here (SQLite with synchronous=OFF ended its
        transaction before the kernel wrote back any of it)."""
        if self.hot:
            return Act.NOTHING
        if self.ended_in_cache or (closing and self.unseen and self.data.size > 0):
            self.ended_in_cache = False
            return self._ended(True)
        return Act.NOTHING

    def unlinked(self) -> Act:
        return Act.COMMIT if self.in_transaction else Act.NOTHING

    @_event
    def released(self, cached: bool, last: bool) -> None:
        """A handle closed (``last``: the journal's last one)."""
        if cached:
            self.cached_opens -= 1
            if not self.cached_opens:  # its close wrote back all there was (flush)
                self.unseen = self.kept_open = False
        if last:  # a refusal no write took belongs to no later transaction
            self.refused = None

    @_event
    def committing(self) -> tuple[int | None, bool]:
        """The commit point is being committed: the database the transaction wrote (if
        its lease was taken) and whether the database was fsynced during it; the
        journal starts over."""
        database, synced = self.database, self.db_synced
        self.database = None
        self.db_synced = False
        self.unseen = False
        self.kept_open = self.cached_opens > 0
        return database, synced
