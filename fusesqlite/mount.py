"""Mount lifecycle: checks before mounting, pyfuse3 on trio, signals, clean unmount."""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pyfuse3
import trio

from fusesqlite import _journal, fuse_caps, history, metrics, retention, systemd
from fusesqlite.coherence import WATCH_LIMIT
from fusesqlite.fs import request_loop
from fusesqlite.fs.operations import Operations
from fusesqlite.gc import reclaim_calls, reclaim_stagings
from fusesqlite.identity import new_mount_id
from fusesqlite.own_mount import OwnMount
from fusesqlite.store import open_store
from fusesqlite.store.base import StoreError
from fusesqlite.store.metered import MeteredStore
from fusesqlite.transactions import Transactions
from fusesqlite.volume import Volume, VolumeFormatError, VolumeNotFound

log = logging.getLogger("fusesqlite.mount")


#: resident memory of an idle daemon (interpreter, trio, pyfuse3, store connections)
BASELINE_MB = 48

#: the kernel's read-ahead for this mount (its default is 128 KiB). Up to 1 MiB it
#: makes the kernel's reads bigger (libfuse allows 1 MiB reads), beyond it keeps
#: several in flight: a cold scan's reads then overlap the daemon's own read-ahead
#: (readahead.py) instead of waiting for it one by one.
READ_AHEAD_KB = 4096

#: a mount that has not followed other mounts' commits for this long says so (every REGISTER_EVERY)
FOLLOW_STALLED_SECONDS = 4.0

#: how long a stopping mount waits for its lock proxy to let go of local files
#: (a local reader holding a lock the proxy waits for can make it wait)
STOP_GRACE_SECONDS = 5.0


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8

#: allocations up to this size come from the heap, not from a fresh mmap each: a
#: 1 MiB read reply is one such allocation (pyfuse3 hands it over as bytes)
MMAP_THRESHOLD = 4 << 20


def tune_malloc(memory_mb: int) -> None:
    """Keep the daemon's freed memory for reuse instead of handing it back at once.

    With glibc's defaults a cold scan's 1 MiB read replies came from fresh memory
    each time (a new mmap, or heap given back by trimming and taken again). On a VM
    that reports free pages to its host, fresh memory costs a host fault per page:
    the cold scan ran at 430-640 MiB/s, with fixed thresholds at 710-820 MiB/s
    (docs/decisions/2026-11-24-malloc-thresholds.md). The heap keeps at most a
    quarter of the memory budget free before it trims; two arenas at most, since one
    per thread would keep freed block buffers resident per thread.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, (memory_mb << 20) // 4)
    except (OSError, AttributeError):
        pass  # not glibc: its defaults only cost speed


class MountError(Exception):
    """A reason not to mount, worded for the user (one line, says what to do)."""


@dataclass
class MountConfig:
    mountpoint: str
    store: str
    volume: str = "default"
    #: the daemon's memory budget. Beyond what the interpreter itself needs
    #: (BASELINE_MB), a third goes to the block cache and an eighth per file to
    #: uncommitted blocks, which are staged into the store beyond that
    memory_mb: int = 256
    allow_other: bool = False
    read_only: bool = False
    #: a mount that dies holding a database's write lease blocks other writers this long
    lease_seconds: float = 10.0
    #: most files and directories followed one by one (coherence/follow.py); 0: the whole volume
    watch_limit: int = WATCH_LIMIT
    #: the kernel gathers writes in its page cache until a commit point (docs/architecture.md);
    #: None: where the kernel makes it correct (writeback_cache_default)
    writeback_cache: bool | None = None
    #: let the kernel check permissions even where only root can reach the mount
    default_permissions: bool = False
    #: look for the next request this long before sleeping (request_loop.py); 0: never
    busy_poll_us: int = 50
    #: open an embedded store that other users can read or write (store/embedded.py)
    allow_shared_store: bool = False
    #: ``--simulate`` SPEC: the store behind a simulated FoundationDB cluster (store/simulated.py)
    simulate: str | None = None
    #: serve the volume as it was at this version or time (history.resolve): read-only, frozen
    at: str | None = None
    #: collect versions older than this in the background (retention.py); inf: never
    retention_seconds: float = float("inf")
    #: ``--metrics`` ADDR: serve Prometheus metrics there (metrics.py); None: off
    metrics: str | None = None


def kernel_checks_permissions(config: MountConfig) -> bool:
    """Whether to mount with ``default_permissions``. Without ``allow_other`` only
    processes of the mounting user reach a mount; if that is root, the kernel's checks
    (mode bits against a caller with CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN) refuse
    nothing, but need a directory's attributes again after each create and unlink in
    it: two round trips per small SQLite transaction. Such a mount answers access(2)
    itself (``DirectoryOps.access``). A uid-0 caller stripped of those capabilities is
    the one who would be let through: ``--default-permissions`` is for hosts that
    run such callers."""
    return config.default_permissions or config.allow_other or os.geteuid() != 0


def check_mountpoint(path: str) -> None:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # a mount whose daemon died (killed, crashed) stays until unmounted
            raise MountError(f"{path} is a stale mount (its daemon is gone); unmount it first: "
                             f"fusermount3 -u {path}") from None
    if not os.path.exists(path):
        raise MountError(f"mountpoint {path} does not exist; create it with: mkdir -p {path}")
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} is not a directory; choose a directory")
    if os.path.ismount(path) or _in_proc_mounts(path):
        raise MountError(f"{path} is already mounted; unmount it first: fusermount3 -u {path}")
    try:
        if os.listdir(path):
            raise MountError(f"mountpoint {path} is not empty; choose an empty directory")
    except PermissionError:
        raise MountError(f"mountpoint {path} is not readable by this user; choose a directory you own") from None


def _in_proc_mounts(path: str) -> bool:
    return bool(_mounts_on(os.path.realpath(path)))


def _kernel_release() -> tuple[int, int]:
    """(major, minor) of the running kernel: FUSE's writeback changed in 6.16."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


#: the first kernel whose FUSE writeback waits until the daemon has a page's WRITE:
#: before it, syncfs(2) of a mount can return with pages still queued, and a commit
#: of SQLite with synchronous=OFF (which never fsyncs) would miss them
WRITEBACK_CORRECT_SINCE = (6, 16)


def writeback_cache_default() -> bool:
    """The writeback cache where it is correct: on Linux 6.16 and later."""
    return _kernel_release() >= WRITEBACK_CORRECT_SINCE


def _writeback_cache_possible(ops: Operations, wanted: bool) -> bool:
    """The writeback cache only where the native path engaged (known once pyfuse3 made
    the session, before the kernel's handshake asks for it).

    Without the hooks libfuse's auto_inval_data stays on (fuse_caps.py), and the two
    together lose data: killed during a stream of synchronous=OFF transactions, a
    mount left a malformed database in about half the runs
    (tests/test_crash_modes.py with FUSESQLITE_NATIVE=0), none without either.
    """
    why = fuse_caps.why_not_native()
    if not wanted or why is None:
        return wanted
    ops.enable_writeback_cache = ops.writeback_cache = False
    log.warning("event=writeback_cache_off cause=%r", f"the native path is off ({why}): auto_inval_data is on")
    return False


def _daemon_cpus() -> int:
    """CPUs the daemon may run on (taskset, a container's cpuset): with one, a worker
    thread buys no parallelism and a busy poll would take the app's CPU."""
    return len(os.sched_getaffinity(0))


def _commit_inline(store: object) -> bool:
    """Small commits on the event loop when the daemon has one CPU (taskset, a cpuset).

    A worker thread then runs on that same CPU anyway: it buys no parallelism, and the
    hop to it and back costs more than the commit's own wait for the disk. With more
    CPUs the thread stays: committing on the loop there measured slower, the kernel
    then placing the daemon and the application apart
    (docs/decisions/2026-11-24-commit-on-a-worker-thread.md).
    """
    cpus = _daemon_cpus()
    inline = cpus == 1 and hasattr(store, "transact_nowait")
    log.info("event=commit_path inline=%s cpus=%d", "yes" if inline else "no", cpus)
    return inline


def _busy_poll_seconds(config: MountConfig) -> float:
    """No busy poll on one CPU: the app that would send the next request needs that CPU."""
    return config.busy_poll_us / 1e6 if _daemon_cpus() > 1 else 0.0


def _mounts_on(path: str) -> list[int]:
    """st_dev of every mount on ``path`` (as the kernel names it), oldest first, from
    /proc/self/mountinfo: no stat, which on a mount of this daemon's own would be a
    request to itself (before the handshake, one that waits for ever)."""
    devices = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == path:
                    major, minor = fields[2].split(":")
                    devices.append(os.makedev(int(major), int(minor)))
    except (OSError, IndexError, ValueError):
        return []
    return devices


def check_fuse() -> None:
    try:
        st = os.stat("/dev/fuse")
        if not stat.S_ISCHR(st.st_mode):
            raise OSError(errno.ENODEV, "not a character device")
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise MountError(
            f"/dev/fuse is unavailable ({e.strerror}); install fuse3 (apt-get install fuse3) "
            "and, in a container, pass the device through (--device /dev/fuse)"
        ) from None
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 not found on PATH; install it with: apt-get install fuse3")


def serve(config: MountConfig) -> None:
    """Mount, serve until unmounted or signalled, then unmount. Raises MountError."""
    mountpoint = os.path.realpath(config.mountpoint)  # as the kernel (and mountinfo) names it
    check_mountpoint(mountpoint)
    check_fuse()
    endpoint = None
    if config.metrics is not None:
        try:
            endpoint = metrics.Endpoint(config.metrics)
        except metrics.MetricsError as e:
            raise MountError(str(e)) from None
    try:
        _serve_with(config, mountpoint, endpoint)
    finally:
        if endpoint is not None:
            endpoint.close()


def _serve_with(config: MountConfig, mountpoint: str, endpoint: metrics.Endpoint | None) -> None:
    tune_malloc(config.memory_mb)
    mount_id = new_mount_id()
    try:
        store = open_store(config.store, allow_shared=config.allow_shared_store, simulate=config.simulate)
        if endpoint is not None:
            store = MeteredStore(store)
        volume = Volume(store, config.volume, author=mount_id)
        if config.at is None:
            snapshot = volume.open()
            reclaim_stagings(volume, mount_id)
            reclaim_calls(volume)
            retention.clear_dead_registrations(volume)
        else:  # a past version: it changes nothing in the store, not even what gc would
            volume.open(create=False)
            snapshot = history.resolve(volume, config.at)
        read_only = config.read_only or config.at is not None
        kind = "at" if config.at is not None else "read-only" if read_only else "read-write"
        # from now on gc keeps what it reads, unless it chose its horizon before
        if retention.register(volume, snapshot, mountpoint, kind) > snapshot:
            retention.unregister(volume)
            raise history.HistoryError(f"version {history.version_text(snapshot)} was removed by gc meanwhile")
    except (StoreError, VolumeFormatError, VolumeNotFound, history.HistoryError) as e:
        raise MountError(str(e)) from None
    usable = max(config.memory_mb - BASELINE_MB, 8) << 20
    tx = Transactions(
        volume,
        cache_bytes=usable // 3,
        overlay_bytes=max(usable // 8, 1 << 20),
        mount_id=mount_id,
    )
    tx.snapshot = snapshot
    tx.inline_commits = _commit_inline(store)
    writeback_cache = writeback_cache_default() if config.writeback_cache is None else config.writeback_cache
    own_mount = OwnMount.spawn()  # before the mount: it must not inherit /dev/fuse
    ops = Operations(tx, mountpoint, own_mount, lease_seconds=config.lease_seconds, follow=config.at is None,
                     read_only=read_only, writeback_cache=writeback_cache, watch_limit=config.watch_limit)
    options = set(pyfuse3.default_options) | {f"fsname=fusesqlite:{config.volume}", "subtype=fusesqlite"}
    if config.allow_other:
        options.add("allow_other")
    root_only = not kernel_checks_permissions(config)
    if root_only:
        options.discard("default_permissions")
    fuse_caps.clear_setuid_in_daemon(root_only)
    if config.writeback_cache and fuse_caps.known_off() is not None:
        own_mount.stop()
        raise MountError(
            f"--writeback-cache needs the native path, which is off ({fuse_caps.known_off()}): "
            "libfuse's auto_inval_data then stays on, and with it the cache loses commits at a crash; "
            "mount without --writeback-cache"
        )
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        own_mount.stop()
        raise MountError(f"cannot mount {mountpoint}: {e}; check the mountpoint and /dev/fuse") from None
    writeback_cache = _writeback_cache_possible(ops, writeback_cache)
    log.info(
        "event=mounted mountpoint=%s volume=%s store=%r version=%s at=%s block_size=%d read_only=%s "
        "writeback_cache=%s permissions=%s mount_id=%s",
        mountpoint, config.volume, store.description, history.version_text(snapshot), config.at is not None,
        volume.block_size, read_only,
        writeback_cache, "kernel" if "default_permissions" in options else "root-only", mount_id,
    )
    if writeback_cache and not writeback_cache_default():
        log.warning(
            "event=old_kernel release=%s effect=%r", os.uname().release,
            "a synchronous=OFF commit may miss pages still queued in the kernel (README, Current limits)",
        )
    request_loop.install(_busy_poll_seconds(config))
    devices = _mounts_on(mountpoint)  # the newest is ours
    ops.first_request = functools.partial(_after_handshake, devices[-1] if devices else None, tx.overlay_bytes)
    unmounted = False
    background: list[Callable[[], Awaitable[None]]] = [functools.partial(_keep_registered, ops, kind)]
    if not read_only and config.retention_seconds < float("inf"):
        background.append(functools.partial(_collect_in_background, ops, config.retention_seconds))
    if endpoint is not None:
        background.append(functools.partial(_publish_metrics, ops, endpoint, config.memory_mb << 20, store))
    try:
        trio.run(_serve, ops, background)
        unmounted = True
    finally:
        own_mount.stop()  # normally stopped already, while the mount still served
        pyfuse3.close(unmount=True)
        try:
            retention.unregister(volume)
        except StoreError as e:  # it expires (retention.MOUNT_TTL)
            log.warning("event=unregister_failed cause=%s", e)
        store.close()
        fast_writes, fast_reads, fast_syncs, _ = _journal.stats()
        found, missed = request_loop.busy_polls()
        log.info("event=unmounted mountpoint=%s clean=%s commits=%d commits_failed=%d journal_writes_in_c=%d "
                 "journal_reads_in_c=%d journal_syncs_in_c=%d busy_polls_found=%d busy_polls_missed=%d",
                 mountpoint, unmounted, tx.commits["ok"], tx.commits.total() - tx.commits["ok"],
                 fast_writes, fast_reads, fast_syncs, found, missed)


async def _publish_metrics(ops: Operations, endpoint: metrics.Endpoint, budget: int, store: object) -> None:
    """Hand the mount's figures to the metrics endpoint once the event loop runs (a scrape reads them on it)."""
    extra = store.collect if isinstance(store, MeteredStore) else None
    endpoint.add(metrics.MountCollector(ops, budget, trio.lowlevel.current_trio_token(), extra))


async def _serve(ops: Operations, background: list[Callable[[], Awaitable[None]]]) -> None:
    async with trio.open_nursery() as nursery:
        coherence, coherence_done = trio.CancelScope(), trio.Event()
        nursery.start_soon(ops.own_mount.serve)
        for task in background:
            nursery.start_soon(task)
        nursery.start_soon(_run_coherence, ops, coherence, coherence_done)
        nursery.start_soon(_stop_on_signal, ops, coherence, coherence_done)
        systemd.notify(f"READY=1\nSTATUS=serving {ops.mountpoint.decode(errors='replace')}")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await _flush_all(ops)


def _after_handshake(dev: int | None, dirty_bytes: int) -> None:
    """Log the capabilities the kernel's INIT handshake settled, and tune the kernel's
    handling of this mount's pages if allowed (root): read-ahead READ_AHEAD_KB, and at
    most ``dirty_bytes`` of written pages held back (writeback cache) before the
    kernel hands them over, so that a big transaction reaches the daemon, and its
    staging, as it goes instead of all at the commit.

    Called before the first request is served (Operations.first_request): after the
    handshake, whose answer sets the read-ahead, and before any app has opened a file,
    since a file keeps the read-ahead it was opened with. Measured: a cold scan that
    opened its file 120 ms before the read-ahead was raised read 450 instead of
    700 MiB/s.
    """
    fuse_caps.report()
    if dev is None:
        log.info("event=bdi_unchanged cause=%r", "mount not found in /proc/self/mountinfo")
        return
    bdi = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}"
    for name, value in (("read_ahead_kb", READ_AHEAD_KB), ("max_bytes", dirty_bytes)):
        try:
            _write_text(f"{bdi}/{name}", f"{value}\n")
        except OSError as e:
            log.info("event=bdi_unchanged setting=%s value=%d cause=%s", name, value, e.strerror or e)
        else:
            log.debug("event=bdi_set setting=%s value=%d path=%s", name, value, bdi)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def oldest_in_use(ops: Operations) -> int:
    """The oldest version this mount may still read: what it has followed, the data
    versions of the files it has open (a file moves to another mount's commit only
    under SQLite's locks), and those of the kernel's pages of files still to move (a
    file opened again starts from them: Transactions.open_record). Other files' pages
    are of the data version the store has now, which gc keeps."""
    tx, coherence = ops.tx, ops.coherence
    pending = [tx.views[ino] for ino, p in coherence.proxies.items() if (p.move or p.running) and ino in tx.views]
    return min([tx.snapshot, coherence.seen, *pending, *(fs.record.dver for fs in tx.files.values() if fs.record.dver)])


async def _keep_registered(ops: Operations, kind: str) -> None:
    """Renew this mount's registration (retention.py) with ``oldest_in_use``."""
    tx, volume = ops.tx, ops.tx.volume
    while True:
        await trio.sleep(retention.REGISTER_EVERY)
        oldest = oldest_in_use(ops)
        try:
            collected = await tx.run(retention.register, volume, oldest, ops.mountpoint.decode(errors="replace"), kind)
        except StoreError as e:
            log.warning("event=register_failed cause=%s", e)
            continue
        if ops.coherence.lag() > FOLLOW_STALLED_SECONDS:
            log.warning("event=follow_stalled seconds=%.0f seen=%s", ops.coherence.lag(),
                        history.version_text(ops.coherence.seen))
        if collected > oldest:
            log.error("event=view_collected oldest=%d horizon=%d cause=%r", oldest, collected,
                      f"gc removed versions this mount may read: it was not renewed for {retention.MOUNT_TTL:g} s")


async def _collect_in_background(ops: Operations, keep_seconds: float) -> None:
    """``--retention``: every COLLECT_EVERY seconds, if no other mount of the volume is at
    it, remove versions older than ``keep_seconds`` that nothing needs (as gc --keep),
    on a worker thread: each step is a store transaction of its own, beside commits."""
    tx, volume = ops.tx, ops.tx.volume
    await trio.sleep(retention.FIRST_COLLECT_AFTER)
    while True:
        try:
            if await tx.run(retention.take_turn, volume, retention.COLLECT_EVERY):
                try:
                    _, done = await tx.run(retention.collect, volume, keep_seconds)
                    if done.keys:
                        compacted = await tx.run(volume.store.compact, False)
                        if compacted:
                            log.info("event=gc_compacted summary=%r", compacted)
                finally:
                    with trio.CancelScope(shield=True):
                        await tx.run(retention.end_turn, volume)
        except StoreError as e:
            log.warning("event=gc_history_failed cause=%s", e)
        await trio.sleep(retention.COLLECT_EVERY)


async def _run_coherence(ops: Operations, scope: trio.CancelScope, done: trio.Event) -> None:
    try:
        with scope:
            await ops.coherence.run()
    finally:
        done.set()


def _stop_helper(ops: Operations) -> None:
    """End the own-mount helper, then ask this mount for its statfs, in a worker thread.

    Killing the helper withdraws a request of it the kernel had queued and not yet
    handed over. pyfuse3's own loop (the pure-Python path) may have seen /dev/fuse
    readable for that request and then block the event loop's thread in a read
    that nothing ends, since nothing else is asked while the mount stops. The
    statfs is that next request (answered at once if the loop was not blocked)."""
    ops.own_mount.stop()
    try:
        os.statvfs(ops.mountpoint)
    except OSError as e:
        log.debug("event=stop_statfs_failed cause=%s", e)


async def _stop_on_signal(ops: Operations, coherence: trio.CancelScope, coherence_done: trio.Event) -> None:
    """Stop following other mounts, hand the kernel's dirty pages over, end the
    own-mount helper, then stop serving.

    In that order: the helper (own_mount.py) has files of this very mount open,
    and a close waits for its flush without a timeout. Once the loop stops
    reading requests, a close still on its way would wait for ever, and the
    helper could never exit (nor the mount go away). Likewise the kernel's
    writeback of pages a still-open plain file wrote needs the loop serving; once
    they are here, _flush_all commits them.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("event=stopping signal=%s", signal.Signals(signum).name)
            systemd.notify("STOPPING=1")
            coherence.cancel()
            with trio.move_on_after(STOP_GRACE_SECONDS) as waited:
                await coherence_done.wait()
                if ops.writeback_cache:
                    try:
                        await ops.own_mount.syncfs(ops.mountpoint)
                    except OSError as e:
                        log.warning("event=syncfs_failed cause=%s", e)
                await trio.to_thread.run_sync(_stop_helper, ops, abandon_on_cancel=True)
            if waited.cancelled_caught:
                log.warning("event=stop_grace_exceeded seconds=%s", STOP_GRACE_SECONDS)
            request_loop.terminate()
            return


async def _flush_all(ops: Operations) -> None:
    """Commit what plain files wrote but did not fsync; drop unfinished SQLite transactions."""
    for fs in list(ops.tx.files.values()):
        if fs.changed:
            if ops.journal_active(fs.ino):
                log.info("event=discard_uncommitted path=%s ino=%d reason=unmount_mid_transaction", fs.label, fs.ino)
                continue
            try:
                await ops.tx.commit(fs, "unmount")
            except StoreError:
                pass  # logged by commit
    held = ops.coherence.held()
    if held:
        try:
            await ops.tx.commit_many([], "unmount", held)
        except StoreError as e:
            log.warning("event=lease_release_failed inos=%s cause=%s", held, e)
