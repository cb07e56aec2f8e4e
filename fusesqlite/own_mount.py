"""What the daemon does to its own mount, done by a helper process.

The lock proxy (coherence/) takes SQLite's fcntl locks on files of this very
mount, and a commit may need the kernel's dirty pages (syncfs of the mount). A
daemon thread must never be inside such a call, nor hold such a file open, when
the daemon dies: the kernel closes a dying process's files before it releases
/dev/fuse (that release is deferred to the end of the exit), so the close of a
file of its own mount sends a flush that nobody will ever answer, and a thread
waiting for its own mount cannot die either. The daemon hung in its exit for
good, with its mount (measured: every `kill -9` of a daemon whose proxy held a
file). This helper process does those calls instead. When the daemon dies, so
does the helper (PR_SET_PDEATHSIG); its calls wait only until the daemon's exit
has aborted the connection.

If the helper dies while the daemon lives (killed on its own), its files and
locks go with it: the daemon starts a new one, and the lock proxy takes its
locks again through it (``OwnMount.on_restart``). Until then a commit that needs
syncfs fails (EIO), it never publishes part of a transaction.

The protocol is one JSON object per line over a socket pair: requests
``{"id", "op", "args"}``, replies ``{"id", "result"}`` or ``{"id", "errno",
"error"}``. A lock request carries several byte ranges, taken in order, so that
SQLite's EXCLUSIVE (RESERVED, PENDING, SHARED) is one round trip.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import trio

log = logging.getLogger("fusesqlite.coherence")

PR_SET_PDEATHSIG = 1


#: locks asked for (or let go of) in one request, in order: (start, length) each
Ranges = Sequence[tuple[int, int]]
#: a dead helper is started again at most this often
RESTART_SECONDS = 1.0


class Handle(NamedTuple):
    """A file the helper holds open: its descriptor there, and which helper that was."""

    helper: int  # OwnMount.generation when it was opened
    fd: int


class OwnMount:
    """The daemon's side: start the helper (again, if it dies), send it requests, match its replies."""

    def __init__(self, process: subprocess.Popen, sock: socket.socket) -> None:
        self.process = process
        self._sock = trio.socket.from_stdlib_socket(sock)
        self.generation = 1  # moves when a helper dies: its handles (and locks) went with it
        self.on_restart: list[Callable[[], None]] = []  # called once a new helper serves
        self._next_id = 0
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._send_lock = trio.Lock()
        self._gone: str | None = None
        self._stopping = False
        self._started = time.monotonic()

    @classmethod
    def spawn(cls) -> OwnMount:
        """Start the helper. Before the mount exists, so it cannot inherit /dev/fuse."""
        return cls(*_start_helper())

    async def serve(self) -> None:
        """Read replies for as long as the mount serves; start a new helper if one dies."""
        while not self._stopping:
            await self._read_replies()
            if self._stopping:
                return
            old = self.process
            if old.poll() is None:  # its socket closed, yet it runs: its locks must go first
                old.kill()
            await trio.to_thread.run_sync(old.wait, abandon_on_cancel=True)
            log.error("event=own_mount_helper_gone pid=%d returncode=%s effect=restarting", old.pid, old.returncode)
            while not self._stopping and not await self._restart(old.pid):
                pass

    async def _restart(self, old_pid: int) -> bool:
        # a helper that dies at once must not make the daemon spin
        await trio.sleep(max(0.0, self._started + RESTART_SECONDS - time.monotonic()))
        if self._stopping:
            return False
        self._started = time.monotonic()
        # From this thread, not a worker: PR_SET_PDEATHSIG follows the thread that
        # forked, and a worker thread that ends would kill the helper with it.
        try:
            self.process, sock = _start_helper()
        except OSError as e:
            log.error("event=own_mount_helper_start_failed cause=%s", e)
            return False
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._gone = None
        log.warning("event=own_mount_helper_restarted pid=%d old_pid=%d", self.process.pid, old_pid)
        for callback in self.on_restart:
            callback()
        return True

    async def _read_replies(self) -> None:
        buf = b""
        try:
            while True:
                try:
                    data = await self._sock.recv(65536)
                except OSError as e:  # ECONNRESET: it died with a request of ours unread
                    log.info("event=own_mount_helper_socket cause=%s", e)
                    break
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    reply = json.loads(line)
                    waiter = self._waiting.pop(reply["id"], None)
                    if waiter is not None:  # else its caller was cancelled
                        waiter[1].append(reply)
                        waiter[0].set()
        finally:
            self._gone = f"own-mount helper process {self.process.pid} stopped"
            self.generation += 1
            self._sock.close()
            for event, out in self._waiting.values():
                event.set()
            self._waiting.clear()

    async def _call(self, op: str, *args: Any) -> Any:
        if self._gone:
            raise OSError(errno.EIO, self._gone)
        self._next_id += 1
        rid = self._next_id
        event, out = trio.Event(), cast(list[Any], [])
        self._waiting[rid] = (event, out)
        try:
            data = memoryview(json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n")
            async with self._send_lock:
                while data:
                    data = data[await self._sock.send(data):]
            await event.wait()
        finally:
            self._waiting.pop(rid, None)
        if not out:
            raise OSError(errno.EIO, self._gone or "own-mount helper gone")
        reply = out[0]
        if "errno" in reply:
            raise OSError(reply["errno"], reply["error"])
        return reply["result"]

    def _fd(self, handle: Handle) -> int:
        if handle.helper != self.generation:
            raise OSError(errno.EIO, f"a handle of a stopped own-mount helper: {handle}")
        return handle.fd

    async def open(self, path: bytes) -> Handle | None:
        """A handle of ``path`` for locks, or None if it is not a regular file."""
        generation = self.generation
        fd = await self._call("open", os.fsdecode(path))
        return None if fd is None else Handle(generation, fd)

    async def lock(self, handle: Handle, ranges: Ranges) -> None:
        """Write locks on the byte ranges, taken in order, each once every other holder on this host let go."""
        await self._call("lock", self._fd(handle), ranges)

    async def unlock(self, handle: Handle, ranges: Ranges) -> None:
        await self._call("unlock", self._fd(handle), ranges)

    async def close(self, handle: Handle) -> None:
        """Close the handle, which drops every lock held through it (nothing to do if its helper died)."""
        if handle.helper == self.generation:
            await self._call("close", handle.fd)

    async def write_back(self, handle: Handle) -> None:
        """The kernel writes back the file's dirty pages to the daemon, and waits for them."""
        await self._call("write_back", self._fd(handle))

    async def syncfs(self, mountpoint: bytes) -> None:
        """The kernel writes back every dirty page of the mount, and waits for them."""
        await self._call("syncfs", os.fsdecode(mountpoint))

    def stop(self) -> None:
        """End the helper (its files close: call while the mount still serves)."""
        self._stopping = True
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("event=own_mount_helper_stop_slow pid=%d", self.process.pid)


def _start_helper() -> tuple[subprocess.Popen, socket.socket]:
    mine, theirs = socket.socketpair()
    # cwd "/": never a directory of the mount, whose lookups would need this daemon.
    # So the package is found where this process found it, not through the cwd.
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "fusesqlite.own_mount", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            cwd="/",
            env={**os.environ, "PYTHONPATH": path},
        )
    except OSError:
        mine.close()
        raise
    finally:
        theirs.close()
    mine.setblocking(False)
    return process, mine


# -- the helper process ------------------------------------------------------------------
def _open(path: str) -> int | None:
    fd = os.open(os.fsencode(path), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _lock(fd: int, ranges: Ranges) -> None:
    for start, length in ranges:
        fcntl.lockf(fd, fcntl.LOCK_EX, length, start, os.SEEK_SET)


def _unlock(fd: int, ranges: Ranges) -> None:
    for start, length in ranges:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, start, os.SEEK_SET)


def _checked(rc: int) -> None:
    """Raise the OSError of a libc call that returned ``rc`` (calls ``os`` does not have)."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _syncfs(mountpoint: str) -> None:
    fd = os.open(os.fsencode(mountpoint), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _checked(_libc.syncfs(fd))
    finally:
        os.close(fd)


def _write_back(fd: int) -> None:
    """fsync(2), not sync_file_range(2): before Linux 6.16 FUSE copied each dirty page
    to a temporary one and ended its writeback before the daemon had the WRITE, so
    waiting for writeback did not mean the daemon had the data. FUSE's fsync also waits
    for those queued WRITEs. The daemon answers this fsync without a commit (it knows
    the proxy's handles), so it is no commit point."""
    os.fsync(fd)


_OPS: dict[str, Callable[..., Any]] = {"open": _open, "lock": _lock, "unlock": _unlock, "close": os.close, "syncfs": _syncfs, "write_back": _write_back}
_libc = ctypes.CDLL(None, use_errno=True)


def _helper(sock: socket.socket, parent: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the daemon died before the line above
        return
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # signals to the daemon's process group are the daemon's to handle: it stops
        # this process once nothing needs the locks any more (or dies, and so does this)
        signal.signal(signum, signal.SIG_IGN)
    send_lock = threading.Lock()

    def answer(request: dict, call: Callable[[], object]) -> None:
        try:
            reply = {"id": request["id"], "result": call()}
        except OSError as e:
            reply = {"id": request["id"], "errno": e.errno or errno.EIO, "error": str(e)}
        with send_lock:
            sock.sendall(json.dumps(reply).encode() + b"\n")

    # Locks the kernel grants at once, and unlocks, are answered here: they send no
    # request to the daemon, and a thread for every request doubled the round trip
    # (214 µs against 103 µs for a daemon thread's lock call; 118 µs this way).
    # Everything else is a request to the daemon, whose handler may need this
    # process in turn (a close's flush may commit, and a commit may need syncfs),
    # or may wait (a lock another process holds): a thread each.
    with sock.makefile("rb") as requests:
        for line in requests:
            request = json.loads(line)
            op, args = request["op"], request["args"]
            if op == "lock":
                fd, ranges = args
                waiting = _lock_at_once(fd, ranges)  # the rest waits, in order, in a thread
                args = (fd, ranges[waiting:])
            call = functools.partial(_OPS[op], *args)
            if op == "unlock" or (op == "lock" and not args[1]):
                answer(request, call)
            else:
                threading.Thread(target=answer, args=(request, call), daemon=True).start()


def _lock_at_once(fd: int, ranges: Ranges) -> int:
    """Take the locks in order while the kernel grants them without waiting: how many it did.

    An error other than "would wait" stops there too: the blocking call reports it."""
    for i, (start, length) in enumerate(ranges):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        except OSError:
            return i
    return len(ranges)


if __name__ == "__main__":
    _helper(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]))
