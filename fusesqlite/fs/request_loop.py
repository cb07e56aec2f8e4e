"""Which of pyfuse3's tasks takes the next request from /dev/fuse: the one that just answered.

pyfuse3 keeps two tasks on /dev/fuse and hands a ``trio.Lock`` from one to the
other at every request, so each request costs two task switches where one would
do. A small SQLite transaction is about 27 requests, nearly all answered without
waiting for anything; one task serving them all made 12% more of them per second
(docs/architecture.md). But one task alone would stall the mount whenever a
handler waits (a commit's fsync, a read from the store), and deadlock when the
handler waits for pages the kernel must write back through this very mount.

So: the task that answered a request reads the next one itself, first without
waiting at all if one is there (at most FAIR_STREAK in a row: then trio's
scheduler gets a pass, so that the rest of the loop is not held back by a burst
of requests). Another task is woken only when a handler
actually waits: ``run_handler`` runs each handler and reports its first yield to
the event loop. libfuse gives each task that reads a request its own buffer (up
to 1 MiB, kept while the task lives), so the tasks in use are kept few, and one
that sat idle for a while ends.

pyfuse3's Cython loop looks its ``_wait_fuse_readable`` up by name at every
request; :func:`install` replaces it. That function is private to pyfuse3, so it
is replaced only in the pyfuse3 releases this was tested with
(``fuse_caps.TESTED_PYFUSE3``) and only on the native path (it needs /dev/fuse's
descriptor from the C module ``_fuse_init``); anywhere else pyfuse3's own loop
stays, only slower, and the log says why (``event=native_off``, or
``event=request_loop_default`` when only this part is off).

Before it sleeps in epoll, the task that answered looks for the next request
for a while (``busy_poll_seconds``, 50 µs by default): with two CPUs the app
and the daemon run apart, and each sleep costs both a wake-up across CPUs
(about 15 µs each way here, an idle vCPU halts). In a burst (VACUUM's 22,000
journal writes, a big transaction's write-back) the next request nearly always
comes within that, and a VACUUM takes 0.8 s instead of 1.8 (docs/architecture.md).
It does not look while a handler waits (a commit's worker thread: its result
would wait too), nor until ``BUSY_POLL_AFTER`` requests came since a handler last
waited (small transactions, a commit every 23 requests, ran 3-12% slower with
busy polling), after a look found nothing it skips the next ``BUSY_POLL_BACKOFF``
chances (an app that thinks between requests costs one fruitless busy poll in
nine), and it yields the CPU at every look (an app on the same CPU runs first).
speedtest1 takes 12-36% less time with it.
"""
from __future__ import annotations

import logging
import os
import select
import time
import types
import weakref
from collections.abc import Coroutine
from typing import Any

import pyfuse3
import trio

from fusesqlite import fuse_caps

log = logging.getLogger("fusesqlite.fs")

#: a task idle this long while another reads ends (pyfuse3 starts new ones as needed)
IDLE_SECONDS = 10.0

#: requests read in a row without a pass through trio's scheduler, at most: in a
#: burst the rest of the event loop would otherwise wait for its end
FAIR_STREAK = 4

#: chances to busy-poll skipped after one that found no request
BUSY_POLL_BACKOFF = 8
#: requests read since a handler last waited before busy polling starts: a small
#: transaction is 23 requests and its commit waits, so it never busy polls (it only
#: lost by it); a VACUUM or a big transaction sends thousands between two waits
BUSY_POLL_AFTER = 32

_DEAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


class RequestLoop:
    """Who reads /dev/fuse: at most one task waits on it, the others park.

    Parked tasks are woken last-parked first, and tasks that never read a request
    (so have no buffer yet) only when no other is parked: the tasks in use, and
    their buffers, stay as few as the handlers waiting at once.
    """

    def __init__(self, fd: int, busy_poll_seconds: float = 0.0) -> None:
        self._fd = fd
        self._busy_poll_seconds = busy_poll_seconds
        self._skip_busy_polls = 0
        self.busy_polls_found = 0  # counts for the unmount's log line
        self.busy_polls_missed = 0
        self._handlers_waiting = 0  # handlers that yielded to trio and have not returned
        self._since_blocked = 0  # requests read since a handler last waited
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._reading = False  # a task waits for /dev/fuse to become readable
        self._parked: list[trio.lowlevel.Task] = []  # the next to wake last
        self._served: weakref.WeakSet[trio.lowlevel.Task] = weakref.WeakSet()
        self._stopped = False
        self._streak = 0  # requests read in a row without going through trio's scheduler

    def _request_waiting(self) -> bool:
        """True if reading now will not block: a request waits, or the connection is
        gone (the read then tells pyfuse3 so and its task ends)."""
        ready = self._poll.poll(0)
        if ready and ready[0][1] & _DEAD:
            self._stop()
        return bool(ready)

    async def wait(self) -> bool:
        """pyfuse3's ``_wait_fuse_readable``: True when a request can be read without
        blocking, False when this task should end."""
        task = trio.lowlevel.current_task()
        while not self._stopped:
            if self._request_waiting():
                self._streak += 1
                if self._streak <= FAIR_STREAK:
                    self._served.add(task)
                    self._since_blocked += 1
                    return True
                # a burst: let the rest of the loop run (a commit's result from its
                # worker thread, other mounts' moves) before the next request
                self._streak = 0
                await trio.lowlevel.checkpoint()
                continue
            self._streak = 0
            if self._busy_poll():
                continue
            if self._reading:
                if not await self._park(task) and self._reading and task in self._served:
                    return False  # idle for long while another task reads: end, free the buffer
                continue
            self._reading = True
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate()
                self._stop()
            finally:
                self._reading = False
        return False

    def _busy_poll(self) -> bool:
        """Look for a request for up to ``busy_poll_seconds``, yielding the CPU between
        looks; True if one came. Only in a burst: ``BUSY_POLL_AFTER`` requests since
        a handler last waited."""
        if (not self._busy_poll_seconds or self._reading or self._handlers_waiting
                or self._since_blocked < BUSY_POLL_AFTER):
            return False
        if self._skip_busy_polls:
            self._skip_busy_polls -= 1
            return False
        poll, now, yield_cpu = self._poll.poll, time.perf_counter, os.sched_yield
        end = now() + self._busy_poll_seconds
        while now() < end:
            if poll(0):
                self.busy_polls_found += 1
                return True
            yield_cpu()
        self.busy_polls_missed += 1
        self._skip_busy_polls = BUSY_POLL_BACKOFF
        return False

    async def _park(self, task: trio.lowlevel.Task) -> bool:
        """Wait to be woken (True) or for IDLE_SECONDS (False)."""
        if task in self._served:
            self._parked.append(task)
        else:
            self._parked.insert(0, task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(IDLE_SECONDS if task in self._served else float("inf")):
            await trio.lowlevel.wait_task_rescheduled(abort)
            return True
        return False

    def blocked(self) -> None:
        """A handler waits: if nobody reads /dev/fuse meanwhile, wake a task to."""
        self._handlers_waiting += 1
        self._since_blocked = 0
        if not self._reading and self._parked:
            trio.lowlevel.reschedule(self._parked.pop())

    def unblocked(self) -> None:
        """A handler that waited has returned."""
        self._handlers_waiting -= 1

    def terminate(self) -> None:
        """Stop serving: every task ends once its request is answered."""
        self._stop()
        pyfuse3.terminate()

    def _stop(self) -> None:
        self._stopped = True
        while self._parked:
            trio.lowlevel.reschedule(self._parked.pop())


_loop: RequestLoop | None = None


def install(busy_poll_seconds: float = 0.0) -> RequestLoop | None:
    """Replace pyfuse3's wait for /dev/fuse (call after pyfuse3.init); None if it stays."""
    global _loop
    _loop = None
    if fuse_caps.why_not_native() is not None:
        return None  # fuse_caps.report logs the one line that says why
    fd = fuse_caps.session_fd()
    version = getattr(pyfuse3, "__version__", "?")
    why = ("no /dev/fuse descriptor from the hooks" if fd is None
           else f"pyfuse3 {version} is not a version this was tested with" if not fuse_caps.pyfuse3_tested(version)
           else f"pyfuse3 {version} has no _wait_fuse_readable" if not hasattr(pyfuse3, "_wait_fuse_readable")
           else None)
    if why is not None:
        log.warning("event=request_loop_default cause=%r effect=slower_small_requests", why)
        return None
    assert fd is not None  # else ``why`` said so
    _loop = RequestLoop(fd, busy_poll_seconds)
    setattr(pyfuse3, "_wait_fuse_readable", _loop.wait)  # checked above: hasattr, the tested version
    log.info("event=request_loop_installed fd=%d busy_poll_us=%d", fd, round(busy_poll_seconds * 1e6))
    return _loop


def busy_polls() -> tuple[int, int]:
    """Busy polls that found a request, and that found none (for the unmount's log line)."""
    return (_loop.busy_polls_found, _loop.busy_polls_missed) if _loop is not None else (0, 0)


def terminate() -> None:
    """Stop serving requests (pyfuse3.terminate, and wake the tasks parked here)."""
    if _loop is not None:
        _loop.terminate()
    else:
        pyfuse3.terminate()


@types.coroutine
def run_handler(coro: Coroutine[Any, Any, Any]):
    """Await a handler's coroutine; at its first yield to trio, make sure another
    task reads /dev/fuse while it waits."""
    try:
        value = coro.send(None)
    except StopIteration as done:
        return done.value
    loop = _loop
    if loop is not None:
        loop.blocked()
    try:
        while True:
            try:
                sent = yield value
            except BaseException as e:  # noqa: B036 - handed on to the handler as is
                try:
                    value = coro.throw(e)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as done:
                    return done.value
    finally:
        if loop is not None:
            loop.unblocked()
