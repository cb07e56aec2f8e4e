"""Starting and always stopping the mounts of bench/many_mounts.py and bench/big_transactions.py.

Built on run.py's Daemon: each mount is stopped by its own pid, also when the
benchmark fails, is interrupted (Ctrl-C, SIGTERM, SIGHUP) or hangs (watchdog).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Daemon  # noqa: E402


def start_daemon(work: Path, source: Path, daemons: list[Daemon], store: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> Daemon:
    """A Daemon in the new directory work/, registered in daemons before it starts, so a failed start is
    still stopped by its pid. With store, it mounts that store directory (Daemon keeps its store at
    work/store, which then is a symlink to it): several mounts of one store, as several hosts.
    ``extra_args``: more `fusesqlite mount` options.
    """
    work.mkdir()
    if store is not None:
        (work / "store").symlink_to(store)
    d = Daemon.__new__(Daemon)
    daemons.append(d)
    d.__init__(work, source, extra_args)
    return d


def stop_daemons(daemons: list[Daemon], names: str) -> list[str]:
    """SIGTERM each daemon that is still running (run.py's Daemon.stop: kill and lazy unmount if it hangs);
    unmount what a dead one left. Returns notes on anything but a clean exit 0."""
    notes = []
    for name, d in zip(names, daemons):
        if getattr(d, "proc", None) is None:
            continue
        if d.alive():
            code = d.stop()
            if code != 0:
                notes.append(f"daemon {name}: exit on SIGTERM {code} (None: killed after 60 s)")
        else:
            notes.append(f"daemon {name}: had DIED (exit {d.proc.returncode})")
        if os.path.ismount(d.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(d.mountpoint)], check=False)
    return notes


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # so that the finally blocks stop the mounts


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)


def start_watchdog(seconds: float, daemons: list[Daemon]) -> threading.Timer:
    """After seconds, kill this run's daemons (by pid: a hung mount then fails its callers with ENOTCONN
    instead of blocking them) and SIGTERM this process, which then stops and cleans up."""

    def fire() -> None:
        print(f"\nWATCHDOG: still running after {seconds:.0f} s; killing this run's daemons", file=sys.stderr,
              flush=True)
        for d in daemons:
            if getattr(d, "proc", None) is not None and d.alive():
                d.proc.kill()
                d.proc.wait()
                subprocess.run(["fusermount3", "-u", "-z", str(d.mountpoint)], check=False)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t
