"""FUSE capabilities the mount asks of the kernel beyond what pyfuse3 lets it choose.

libfuse asks for ``auto_inval_data`` by default and pyfuse3 cannot turn it off.
With it, the kernel drops a file's whole page cache whenever a getattr shows a
new mtime (every commit moves it), and asks for the attributes again before
every read that follows a write: in a big SQLite transaction that is one
getattr per page read back. Every change a mount does not make itself reaches
its kernel through explicit invalidations (coherence.py), so the mount turns
the capability off.

The C module ``_fuse_init`` does it by wrapping libfuse's ``fuse_session_new``
(see its comment). It must be loaded with RTLD_GLOBAL *before* pyfuse3, so
``fusesqlite/__init__.py`` calls :func:`load` first thing. Without the module
(not built, or pyfuse3 loaded first) the mount still works, only slower, and
says so in its log.
"""
from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

log = logging.getLogger("fusesqlite.mount")

_module: ModuleType | None = None
_why_not = "not loaded"


def load() -> None:
    """Load ``_fuse_init`` so that pyfuse3, loaded later, binds to its fuse_session_new."""
    global _module, _why_not
    if _module is not None:
        return
    if "pyfuse3" in sys.modules:
        _why_not = "pyfuse3 was loaded first"
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from fusesqlite import _fuse_init
    except ImportError as e:
        _why_not = f"extension module not built ({e}); reinstall fusesqlite with gcc and libfuse3-dev present"
        return
    finally:
        sys.setdlopenflags(flags)
    _fuse_init.configure(_fuse_init.AUTO_INVAL_DATA, 0)
    from fusesqlite import _journal

    _fuse_init.fast_path(_journal.api())  # journals' writes and reads answered in C (_journal.c)
    _module = _fuse_init


def report() -> bool:
    """Log what the kernel handshake settled (call once the mount answers); True if as wanted."""
    negotiated = _module.negotiated() if _module is not None else None
    if negotiated is None:
        why = _why_not if _module is None else "the handshake did not go through it (libfuse API changed?)"
        log.warning("event=fuse_caps_default auto_inval_data=on cause=%r effect=slower_reads_after_writes", why)
        return False
    want, capable = negotiated
    log.info("event=fuse_caps auto_inval_data=%s writeback_cache=%s journal_fast_path=%s opendir=%s "
             "handle_killpriv=%s want=%#x capable=%#x",
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
    negotiated = _module.negotiated() if _module is not None else None
    return negotiated is not None and _module.hooked() and bool(negotiated[1] & _module.NO_OPENDIR_SUPPORT)


def session_fd() -> int | None:
    """/dev/fuse's descriptor of the mount's session, between pyfuse3.init and pyfuse3.close."""
    fd = _module.session_fd() if _module is not None else -1
    return fd if fd >= 0 else None
