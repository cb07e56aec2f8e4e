"""Fixtures for the end-to-end tests: real fusesqlite mounts in real processes.

``mounts`` is a factory: ``m = mounts()`` starts ``python -m fusesqlite mount MP
--store STORE`` in a new process (stdout+stderr to a log file under tmp_path),
waits until MP shows in /proc/mounts and returns a ``Mount``. ``mounts.remount(m)``
stops (or cleans up after a kill -9) and mounts the same store/volume on the same
mountpoint again. Whatever happens, teardown kills every process the factory
started (by pid: SIGTERM, then SIGKILL) and unmounts whatever is left mounted.

A watchdog kills the daemons if a test overruns its timeout, so a test stuck in
an uninterruptible FUSE request is released (and then fails) instead of hanging
the run.

``FUSESQLITE_TEST_STORE=fdb:[CLUSTER_FILE]`` runs the mounts of every test that does
not name a store of its own on that FoundationDB cluster, each test in a volume of
its own (cleared afterwards): the Vagrant VM runs the product's tests against a
cluster, not only the store's. Tests that read the embedded store's files are
marked ``embedded`` and skipped then.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, child_env, force_unmount, fusesqlite_cmd, is_mounted  # noqa: E402

#: where mounts go when a test names no store (module docstring)
TEST_STORE = os.environ.get("FUSESQLITE_TEST_STORE", "")
MOUNT_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def _fail(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


class Mount:
    """One running ``fusesqlite mount`` process."""

    def __init__(self, factory: MountFactory, mountpoint: Path, store: str, volume: str | None,
                 args: list[str], log_path: Path, proc: subprocess.Popen, env_extra: dict | None,
                 cpus: frozenset[int] | None = None):
        self.factory = factory
        self.mountpoint = mountpoint
        self.store = store
        self.volume = volume
        self.args = args
        self.log_path = log_path
        self.proc = proc
        self.env_extra = env_extra
        self.cpus = cpus  # the daemon's CPU affinity, if the test chose one

    # -- info ---------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def store_dir(self) -> Path:
        return Path(self.store)

    @property
    def where(self) -> list[str]:
        """The command-line options that name this mount's store and volume."""
        return ["--store", self.store, *(["--volume", self.volume] if self.volume else [])]

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def __truediv__(self, name: str) -> Path:
        return self.mountpoint / name

    def py(self, code: str, *args, **kw) -> subprocess.Popen:
        """Start a Python snippet using this mount (see MountFactory.py)."""
        return self.factory.py(code, *args, **kw)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        p = self.log_path.with_suffix(".stdout")
        return p.read_text(errors="replace") if p.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_text().splitlines()
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def wait_log(self, needle: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            time.sleep(0.05)
        return needle in self.log_text()

    # -- lifecycle ----------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Graceful stop: signal, wait, assert exit status 0 and the mount gone."""
        if self.alive():
            os.kill(self.pid, sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            _fail(f"fusesqlite (pid {self.pid}) did not exit within {timeout}s of signal {sig}\n"
                  f"--- daemon log ---\n{self.log_tail(80)}")
        if rc != 0:
            self.cleanup()
            _fail(f"fusesqlite exited with status {rc} after signal {sig} (expected 0)\n"
                  f"--- daemon log ---\n{self.log_tail(80)}")
        deadline = time.monotonic() + 5
        while self.mounted() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.mounted():
            self.cleanup()
            _fail(f"fusesqlite exited 0 but {self.mountpoint} is still mounted\n--- daemon log ---\n{self.log_tail()}")
        return rc

    def kill9(self) -> None:
        """kill -9 the daemon (by the pid we started); the mount stays, dead."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(20)

    def cleanup(self) -> str:
        """Forceful, never raises: SIGTERM -> wait -> SIGKILL, then unmount leftovers."""
        notes = []
        try:
            if self.alive():
                os.kill(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    notes.append("SIGTERM ignored, sending SIGKILL")
                    os.kill(self.pid, signal.SIGKILL)
                    self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired) as e:
            notes.append(repr(e))
        if self.mounted():
            notes.append(force_unmount(self.mountpoint))
        return "; ".join(notes)


class MountFactory:
    def __init__(self, tmp_path: Path):
        #: this test's volumes on TEST_STORE: its own names, cleared at teardown
        self.test_id = f"test-{os.urandom(6).hex()}"
        self.volumes: set[str] = set()
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []
        self.children: list[subprocess.Popen] = []
        self._n = 0

    # processes that use the mount (killed before the mounts are torn down)
    def popen(self, cmd, **kw) -> subprocess.Popen:
        kw.setdefault("env", child_env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen([os.fspath(c) if isinstance(c, os.PathLike) else str(c) for c in cmd], **kw)
        self.children.append(p)
        return p

    def py(self, code: str, *args, **kw) -> subprocess.Popen:
        """Start a Python snippet (argv[1:] = args) with text stdout/stderr pipes."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        return self.popen([sys.executable, "-c", code, *args], **kw)

    def __call__(
        self,
        mountpoint: Path | None = None,
        store: str | os.PathLike | None = None,
        volume: str | None = None,
        *,
        debug: bool = False,
        extra_args: tuple[str, ...] = (),
        env_extra: dict[str, str] | None = None,
        pass_store: bool = True,
        split_output: bool = False,
        cpus: frozenset[int] | None = None,
    ) -> Mount:
        """Start a mount. ``split_output``: stdout goes to its own file (Mount.stdout_text())
        instead of the log file, which then holds stderr only. ``cpus``: the daemon's CPU
        affinity (as ``taskset`` would set it), kept by remount."""
        self._n += 1
        n = self._n
        if mountpoint is None:
            mountpoint = self.tmp_path / f"mnt{n}"
            mountpoint.mkdir()
        if store is None:
            store = TEST_STORE or self.tmp_path / "store"
        store = os.fspath(store)
        if TEST_STORE and store == TEST_STORE:
            if volume is None:
                volume = self.test_id
            elif not volume.startswith(self.test_id):  # a name of the test's own (not another mount's)
                volume = f"{self.test_id}.{volume}"
            self.volumes.add(volume)
        if pass_store and not store.startswith("fdb:"):
            os.makedirs(store, exist_ok=True)
        args = ["mount", os.fspath(mountpoint)]
        if pass_store:
            args += ["--store", store]
        if volume is not None:
            args += ["--volume", volume]
        if debug:
            args.append("--debug")
        args += list(extra_args)
        return self._start(Path(mountpoint), store, volume, args, env_extra, split_output, cpus)

    def _start(self, mountpoint: Path, store: str, volume: str | None, args: list[str],
               env_extra: dict | None, split_output: bool = False, cpus: frozenset[int] | None = None) -> Mount:
        log_path = self.tmp_path / f"daemon-{len(self.mounts) + 1}.log"
        log = open(log_path, "wb")
        out = open(log_path.with_suffix(".stdout"), "wb") if split_output else log
        try:
            proc = subprocess.Popen(
                fusesqlite_cmd(*args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=child_env(env_extra),
                cwd=str(REPO),
                start_new_session=True,  # a ^C of pytest must not reach it; teardown handles it
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        finally:
            log.close()
            out.close()
        m = Mount(self, mountpoint, store, volume, args, log_path, proc, env_extra, cpus)
        self.mounts.append(m)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:
            if is_mounted(mountpoint):
                break
            rc = proc.poll()
            if rc is not None:
                _fail(f"fusesqlite mount exited with status {rc} before mounting {mountpoint}\n"
                      f"command: {' '.join(fusesqlite_cmd(*args))}\n--- daemon log ---\n{m.log_tail(80)}")
            if time.monotonic() > deadline:
                m.cleanup()
                _fail(f"{mountpoint} not in /proc/mounts after {MOUNT_TIMEOUT}s\n--- daemon log ---\n{m.log_tail(80)}")
            time.sleep(0.05)
        # the kernel has the mount; make sure the daemon answers requests
        try:
            os.stat(mountpoint)
        except OSError as e:
            _fail(f"stat of the fresh mount {mountpoint} failed: {e!r}\n--- daemon log ---\n{m.log_tail()}")
        m.wait_log("event=mounted", timeout=2.0)
        return m

    def remount(self, m: Mount, *, stop: bool = True) -> Mount:
        """Mount m's store/volume on m's mountpoint again.

        A live mount is stopped gracefully first (asserting exit 0) unless
        ``stop=False``; a dead one (after kill9) is cleaned up (unmounted)."""
        if m.alive():
            if stop:
                m.stop()
            else:
                m.cleanup()
        if m.mounted():
            note = force_unmount(m.mountpoint)
            if m.mounted():
                _fail(f"could not unmount the dead mount {m.mountpoint}: {note}")
        return self._start(m.mountpoint, m.store, m.volume, m.args, m.env_extra, cpus=m.cpus)

    def kill_all(self) -> None:
        """Watchdog: SIGKILL everything we started (by pid)."""
        for p in self.children:
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for m in self.mounts:
            if m.alive():
                try:
                    os.kill(m.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def teardown(self) -> list[str]:
        notes = []
        for p in self.children:
            if p.poll() is None:
                try:
                    p.kill()
                    p.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired) as e:
                    notes.append(f"child {p.pid}: {e!r}")
            for s in (p.stdout, p.stderr):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
        for m in reversed(self.mounts):
            note = m.cleanup()
            if note:
                notes.append(f"{m.mountpoint}: {note}")
        for volume in sorted(self.volumes):
            notes.extend(_clear_volume(TEST_STORE, volume))
        return notes


def _clear_volume(store_spec: str, volume: str) -> list[str]:
    """Remove a test's volume from a shared FoundationDB cluster."""
    from fusesqlite.keyspace import Keyspace
    from fusesqlite.store import StoreError, open_store

    try:
        store = open_store(store_spec)
        try:
            store.transact(lambda tr: tr.clear_range(*Keyspace(volume).volume_range()))
        finally:
            store.close()
    except StoreError as e:
        return [f"volume {volume} left in {store_spec}: {e}"]
    return []


def pytest_configure(config) -> None:
    if TEST_STORE and not TEST_STORE.startswith("fdb:"):
        raise pytest.UsageError(f"FUSESQLITE_TEST_STORE={TEST_STORE!r}: use fdb: or fdb:/path/to/fdb.cluster")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark the tests that mount (``e2e``: they need /dev/fuse) and those of the
    FoundationDB backend (``fdb``), so ``-m "not e2e and not slow"`` is the tier that
    needs no FUSE; skip the ``embedded`` ones when mounts go to FoundationDB."""
    skip = pytest.mark.skip(reason=f"reads the embedded store's files; FUSESQLITE_TEST_STORE is {TEST_STORE}")
    for item in items:
        if {"mounts", "mount"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        if "[foundationdb" in item.nodeid:
            item.add_marker(pytest.mark.fdb)
        if TEST_STORE and item.get_closest_marker("embedded"):
            item.add_marker(skip)


def _test_timeout(request) -> float:
    marker = request.node.get_closest_marker("timeout")
    if marker is not None:
        if marker.args:
            return float(marker.args[0])
        if "timeout" in marker.kwargs:
            return float(marker.kwargs["timeout"])
    try:
        return float(request.config.getini("timeout") or 300)
    except (ValueError, KeyError):
        return 300.0


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def mounts(tmp_path, request):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is not available")
    factory = MountFactory(tmp_path)
    # watchdog: release a test stuck in a FUSE request by killing the daemons
    watchdog = threading.Timer(_test_timeout(request) + 10, factory.kill_all)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield factory
    finally:
        watchdog.cancel()
        rep = getattr(request.node, "rep_call", None)
        failed = rep is None or rep.failed
        notes = factory.teardown()
        if failed:
            for i, m in enumerate(factory.mounts, 1):
                print(f"\n--- daemon log {i} ({m.mountpoint}, pid {m.pid}, rc {m.proc.returncode}) ---")
                print(m.log_tail(40))
        if notes:
            print("teardown:", *notes, sep="\n  ")
        leftovers = [m.mountpoint for m in factory.mounts if m.mounted()]
        assert not leftovers, f"could not unmount {leftovers}"


@pytest.fixture
def host(tmp_path):
    """The file system's operations in this process, no FUSE (in_process.py)."""
    from in_process import Host

    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def mount(mounts):
    """A fresh mount of a fresh store (default volume)."""
    return mounts()


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root")
