"""FUSE capabilities the mount asks of the kernel beyond what pyfuse3 lets it choose.

libfuse asks for ``auto_inval_data`` by default and pyfuse3 cannot turn it off.
With it, the kernel drops a file's whole page cache whenever a getattr shows a
new mtime (every commit moves it), and asks for the attributes again before
every read that follows a write: in a big SQLite transaction that is one
getattr per page read back. Every change a mount does not make itself reaches
its kernel through explicit invalidations (coherence/), so the mount turns
the capability off.

The C module ``_fuse_init`` does it by wrapping libfuse's ``fuse_session_new``
(see its comment). It must be loaded with RTLD_GLOBAL *before* pyfuse3, so
``fusesqlite/__init__.py`` calls :func:`load` first thing.

The native path (that module's hooks, the journal fast path in C, the request
loop of fs/request_loop.py, the block decoding of ``_blocks``) leans on how
libfuse and pyfuse3 work inside, so it engages only where it was tested: pyfuse3
3.5 (checked here, before pyfuse3 is loaded) and libfuse 3.14 or 3.17 (checked
in C, with the libfuse actually loaded). ``FUSESQLITE_NATIVE=0`` turns it all
off. Anywhere else, or switched off, the mount runs the pure-Python path: it
works the same, only slower, and :func:`report` logs one line
(``event=native_off cause=...``) that says why (docs/portability.md).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from types import ModuleType

log = logging.getLogger("fusesqlite.mount")

#: the switch: 0 (or off, no, false) forces the pure-Python path
NATIVE_ENV = "FUSESQLITE_NATIVE"
#: pyfuse3 releases (major, minor) the hooks and request_loop.py were tested with
TESTED_PYFUSE3 = frozenset({(3, 5)})
#: libfuse releases (fuse_version()) _fuse_init.c engages with (its own list decides)
TESTED_LIBFUSE = frozenset({314, 317})

_module: ModuleType | None = None
_why_not = "not loaded"


def native_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``FUSESQLITE_NATIVE`` turns the native path off."""
    return environ.get(NATIVE_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def pyfuse3_tested(version: str) -> bool:
    """Whether a pyfuse3 version is one the hooks and the request loop were tested with."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in TESTED_PYFUSE3


def supported(libfuse_version: int, pyfuse3_version: str) -> bool:
    """Whether the native path engages with this libfuse (e.g. 317) and pyfuse3 (e.g. "3.5.0")."""
    return libfuse_version in TESTED_LIBFUSE and pyfuse3_tested(pyfuse3_version)


def load() -> None:
    """Load ``_fuse_init`` so that pyfuse3, loaded later, binds to its fuse_session_new."""
    global _module, _why_not
    if _module is not None:
        return
    if not native_wanted():
        _why_not = f"{NATIVE_ENV}={os.environ[NATIVE_ENV]}"
        return
    if "pyfuse3" in sys.modules:
        _why_not = "pyfuse3 was loaded first"
        return
    try:
        version = metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        _why_not = "pyfuse3 is not installed"
        return
    if not pyfuse3_tested(version):
        tested = ", ".join(f"{a}.{b}" for a, b in sorted(TESTED_PYFUSE3))
        _why_not = f"pyfuse3 {version} is not a version the hooks were tested with ({tested})"
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        _fuse_init = importlib.import_module("fusesqlite._fuse_init")
    except ImportError as e:
        _why_not = f"extension module not built ({e}); reinstall fusesqlite with gcc and libfuse3-dev present"
        return
    finally:
        sys.setdlopenflags(flags)
    _fuse_init.configure(_fuse_init.AUTO_INVAL_DATA, 0)
    from fusesqlite import _journal

    _fuse_init.fast_path(_journal.api())  # journals' writes and reads answered in C (_journal.c)
    _module = _fuse_init


def known_off() -> str | None:
    """Why the native path is off where that is known before pyfuse3 makes the session
    (the switch, pyfuse3's version, the module not built), else None."""
    return _why_not if _module is None else None


def why_not_native() -> str | None:
    """Why the native path is off, or None if it is on (once pyfuse3 made the session)."""
    if _module is None:
        return _why_not
    status = _module.status()
    if status is None:
        return "pyfuse3 made no session through fusesqlite._fuse_init"
    engaged, why = status[0], status[1]
    return None if engaged else why


def libfuse() -> str:
    """The libfuse the hooks found loaded, as "3.17.2 (libfuse3.so.4)"; "?" before it is known."""
    status = _module.status() if _module is not None else None
    if status is None:
        return "?"
    return f"{status[4]} ({status[3]})"


def report() -> bool:
    """Log what the kernel handshake settled (call once the mount answers); True if as wanted.

    On the pure-Python path, one line says why (``event=native_off``)."""
    why = why_not_native()
    if why is not None:
        level = logging.INFO if not native_wanted() else logging.WARNING
        log.log(level, "event=native_off cause=%r libfuse=%r effect=%s", why, libfuse(),
                "auto_inval_data_on,journal_fast_path_off,pyfuse3_request_loop,python_block_decoding")
        return False
    assert _module is not None  # why_not_native() said it is loaded
    negotiated = _module.negotiated()
    if negotiated is None:
        log.warning("event=fuse_caps_default auto_inval_data=on cause=%r effect=slower_reads_after_writes",
                    "the kernel's handshake did not go through the hooks")
        return False
    want, capable = negotiated
    log.info("event=fuse_caps native=on libfuse=%r auto_inval_data=%s writeback_cache=%s journal_fast_path=%s "
             "opendir=%s handle_killpriv=%s want=%#x capable=%#x", libfuse(),
             "on" if want & _module.AUTO_INVAL_DATA else "off",
             "on" if want & _module.WRITEBACK_CACHE else "off",
             "on" if _module.hooked() else "off",
             "refused" if dirs_without_open() else "answered",
             "on" if _module.killpriv() else "off", want, capable)
    return not want & _module.AUTO_INVAL_DATA


def clear_setuid_in_daemon(on: bool) -> None:
    """Whether the next mount tells the kernel that the daemon clears set-user-ID and
    set-group-ID bits itself (FUSE_HANDLE_KILLPRIV; call before pyfuse3.init). The
    kernel then stops asking for a file's attributes before every chown: SQLite
    run as root chowns each new journal. Only for mounts that only root can reach
    (mount.kernel_checks_permissions): with the writeback cache the kernel would
    then also leave a non-root writer's write to the daemon, which could not tell
    it apart, but root's writes and truncations keep the bits anyway, so chown is
    the one case left (``DirectoryOps._apply``)."""
    if _module is not None:
        _module.handle_killpriv(on)


def dirs_without_open() -> bool:
    """Whether opendir may be answered with ENOSYS: the kernel then never sends opendir
    or releasedir again, which saves a round trip each time SQLite syncs a new
    journal's directory, and lists every directory with handle 0, which the
    readdirplus hook turns into the directory's inode (Linux 5.1 and later)."""
    module = _module
    if module is None:
        return False
    negotiated = module.negotiated()
    return negotiated is not None and module.hooked() and bool(negotiated[1] & module.NO_OPENDIR_SUPPORT)


def session_fd() -> int | None:
    """/dev/fuse's descriptor of the mount's session, between pyfuse3.init and pyfuse3.close."""
    fd = _module.session_fd() if _module is not None else -1
    return fd if fd >= 0 else None
