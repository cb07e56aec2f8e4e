"""Wake-ups between processes sharing one embedded store.

SQLite tells no one when another process commits. Polling the store every 10 ms
makes most of a 9 ms median from one mount's commit to another mount seeing it,
and a lease hand-over between two writing mounts waits as long; polling faster
costs every mount CPU whether anything changed or not (every 1 ms: a lone writing
mount lost a quarter of its commits/s).

So a store that waits for changes binds an abstract UNIX datagram socket
(gone with its process, no path length limit) and lists its name as an empty
file in the store's ``watchers/`` directory; a store that commits a write sends
one byte to every other name listed there. A store is never woken by its own
commits, which a mount follows without reading anything. A name whose socket is
gone (its process died) refuses the datagram, and the sender removes the file.
Waiters still poll, rarely (``FALLBACK_SECONDS``), for writers that do not
send: a store directory where sockets cannot be listed, an older version.

The directory takes the store directory's permissions (private in a private
store; open to every sharer of a store shared on purpose, whose wake-ups then
still work) and the names are empty files 0600.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket
import stat
import threading
import time
from pathlib import Path

log = logging.getLogger("fusesqlite.store")

DIR_NAME = "watchers"
#: how often a waiter that can be woken looks anyway (a writer that did not send)
FALLBACK_SECONDS = 0.1
#: a waiter woken this soon after its last read waits out the rest first, so that a
#: burst of commits (another mount writing flat out) is followed in batches: at most
#: 500 reads a second, each followed by the log and lock work of a move
COALESCE_SECONDS = 0.002
#: a sender lists the directory again when its mtime moves, and at least this often:
#: two changes within one tick of the file system's clock leave the mtime as it was
LIST_SECONDS = 1.0

_serial = itertools.count(1)


class Wakeups:
    """One store's side: its waiting socket (bound on first use) and the others' names."""

    def __init__(self, store_dir: Path, store_file: Path) -> None:
        self.dir = store_dir / DIR_NAME
        self._store_file = store_file
        self._prefix_bytes: bytes | None = None
        self._name: str | None = None
        self._sock: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._listing: tuple[int, float, list[str]] = (-1, 0.0, [])
        self._lock = threading.Lock()
        self._failed = False  # could not listen: this store's waiters only poll
        self._listed_at = 0.0
        self._closed = False

    @property
    def _prefix(self) -> bytes:
        """One namespace of socket names per store file: two stores never mix."""
        if self._prefix_bytes is None:
            st = os.stat(self._store_file)
            self._prefix_bytes = f"fusesqlite-{st.st_dev:x}-{st.st_ino:x}-".encode()
        return self._prefix_bytes

    def listening(self) -> bool:
        """This store's socket is bound: wake-ups since then are queued there."""
        return self._sock is not None

    def listen(self) -> socket.socket | None:
        """This store's socket for wake-ups, or None where there can be none."""
        with self._lock:
            if self._sock is not None and time.monotonic() - self._listed_at > LIST_SECONDS:
                self._relist()
            if self._sock is None and not self._failed and not self._closed:
                name = f"{os.getpid()}-{next(_serial)}"
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                try:
                    sock.bind(b"\0" + self._prefix + name.encode())
                    self._list(name)
                except OSError as e:
                    sock.close()
                    self._failed = True
                    log.warning("event=store_wakeups_off dir=%s cause=%s effect=poll_every_10ms", self.dir, e)
                    return None
                self._sock, self._name = sock, name
                self._listed_at = time.monotonic()
            return self._sock

    def _relist(self) -> None:
        """List this store's name again if it went (a sender that could not reach the socket,
        say from another network namespace, took it for a dead one; or someone cleaned up)."""
        self._listed_at = time.monotonic()
        assert self._name is not None
        try:
            if not (self.dir / self._name).exists():
                self._list(self._name)
                log.info("event=store_waiter_relisted name=%s", self._name)
        except OSError as e:
            log.debug("event=store_waiter_relist_failed name=%s cause=%s", self._name, e)

    def _list(self, name: str) -> None:
        """Make this store's name a file in the directory (creating that first)."""
        try:
            os.mkdir(self.dir, 0o700)  # never wider than private until it has the store's mode
        except FileExistsError:
            pass
        else:
            store_mode = stat.S_IMODE(os.stat(self.dir.parent).st_mode) & 0o777
            os.chmod(self.dir, (stat.S_IMODE(os.stat(self.dir).st_mode) & ~0o777) | store_mode)
        try:
            fd = os.open(self.dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return  # a name left by a process that died, reused: as good as a new one
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        finally:
            os.close(fd)

    def notify(self) -> None:
        """Wake every other waiting store (after a commit that wrote)."""
        names = self._names()
        if not names or (len(names) == 1 and names[0] == self._name):
            return
        with self._lock:
            if self._closed:
                return
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            sender, own = self._sender, self._name
        try:
            prefix = self._prefix
        except OSError as e:
            log.debug("event=store_wakeup_failed cause=%s", e)
            return
        for name in names:
            if name == own:
                continue
            try:
                sender.sendto(b"!", b"\0" + prefix + name.encode())
            except BlockingIOError:
                pass  # it has wake-ups queued already
            except (ConnectionRefusedError, FileNotFoundError):
                self._forget(name)  # its process is gone
            except OSError as e:
                log.debug("event=store_wakeup_failed name=%s cause=%s", name, e)

    def wake_self(self) -> None:
        """Wake this store's own waiter (its caller has other keys to wait for)."""
        with self._lock:
            sock = self._sock
        if sock is None:
            return  # nobody waits on a socket: the waiter sees the flag at its next look
        try:
            sock.sendto(b"!", sock.getsockname())
        except OSError as e:  # full (wake-ups queued already) or closed
            log.debug("event=store_wakeup_failed name=self cause=%s", e)

    @staticmethod
    def drain(sock: socket.socket) -> None:
        """Drop the wake-ups queued so far (the read that follows covers them)."""
        try:
            while True:
                sock.recv(64)
        except (OSError, ValueError):  # none left, or the store closed it (its read fails next)
            pass

    @staticmethod
    def wait(sock: socket.socket, timeout: float) -> None:
        """Until a wake-up arrives or ``timeout`` passes."""
        try:
            select.select([sock], [], [], timeout)
        except (OSError, ValueError):  # the store closed it: its next read says so
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, name, self._sock, self._name = self._sock, self._name, None, None
            sender, self._sender = self._sender, None
        for s in (sock, sender):
            if s is not None:
                s.close()
        if name is not None:
            self._unlink(name)

    def _names(self) -> list[str]:
        """The waiters listed in the directory (listed again only when it changed)."""
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return []
        now = time.monotonic()
        if mtime != self._listing[0] or now - self._listing[1] > LIST_SECONDS:
            try:
                self._listing = (mtime, now, os.listdir(self.dir))
            except FileNotFoundError:
                return []
        return self._listing[2]

    def _forget(self, name: str) -> None:
        self._unlink(name)
        log.debug("event=store_waiter_gone name=%s", name)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self.dir / name)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("event=store_waiter_unlink_failed name=%s cause=%s", name, e)
