"""What a mount's log must say about the native path (fusesqlite/fuse_caps.py).

The hooks must engage where they were tested (fuse_caps.supported) unless
FUSESQLITE_NATIVE=0 turns them off; anywhere else the mount runs the pure-Python
path and logs one ``event=native_off`` line with its cause. The versions are
measured here from the system (libfuse's own fuse_version(), pyfuse3's package
metadata), not taken from the code under test, so a mount whose hooks should have
engaged and did not fails its test instead of passing on the fallback.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Mapping
from importlib import metadata

from fusesqlite import fuse_caps


def libfuse_version() -> int:
    """fuse_version() of the system's libfuse3: 314, 317, ..."""
    name = ctypes.util.find_library("fuse3")
    assert name, "no libfuse3 found (ldconfig -p); install fuse3"
    return ctypes.CDLL(name).fuse_version()


def expected(environ: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """(True, "") if a mount started with ``environ`` must have its hooks on, else (False, the reason)."""
    if not fuse_caps.native_wanted(environ):
        return False, f"{fuse_caps.NATIVE_ENV} turns them off"
    lib, py = libfuse_version(), metadata.version("pyfuse3")
    if not fuse_caps.supported(lib, py):
        return False, f"libfuse {lib // 100}.{lib % 100} with pyfuse3 {py} is not a tested combination"
    return True, ""


def native_on(m, timeout: float = 10.0) -> bool:
    """Check a mount's log against :func:`expected`: True if its hooks are on (as they
    must be here), False if it runs the pure-Python path (as it must here)."""
    deadline = time.monotonic() + timeout
    while not ("event=fuse_caps " in (log := m.log_text()) or "event=native_off" in log):
        assert time.monotonic() < deadline, f"no event=fuse_caps or event=native_off line\n{m.log_tail()}"
        time.sleep(0.05)
    on, why = expected({**os.environ, **(m.env_extra or {})})
    said = [ln for ln in log.splitlines() if "event=fuse_caps" in ln or "event=native_off" in ln]
    if on:
        assert ("event=fuse_caps native=on" in log and "journal_fast_path=on" in log
                and "event=request_loop_installed" in log), (
            "the hooks should have engaged here (a tested libfuse and pyfuse3, "
            f"{fuse_caps.NATIVE_ENV} not 0) and did not:\n" + "\n".join(said))
        return True
    assert "native=on" not in log and "event=request_loop_installed" not in log, (
        f"the hooks engaged where they must not ({why}):\n" + "\n".join(said))
    off = [ln for ln in said if "event=native_off" in ln and "cause=" in ln]
    assert len(off) == 1, f"expected one event=native_off line with its cause ({why}):\n" + "\n".join(said)
    return False
