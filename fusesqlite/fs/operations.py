"""The pyfuse3 Operations of a mount, with one rule for errors.

Any failure reaches the app as an errno: ``FUSEError`` as raised, store errors as
their errno, anything unexpected as EIO with one log line (never a traceback to
the app, never a dead mount).
"""
from __future__ import annotations

import errno
import functools
import inspect
import logging
from collections.abc import Callable

import pyfuse3

from fusesqlite.fs.directories import DirectoryOps
from fusesqlite.fs.request_loop import run_handler
from fusesqlite.store.base import StoreError

log = logging.getLogger("fusesqlite.fs")


def _guarded(name: str, fn):
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args, **kwargs):
        self.requests[name] += 1
        if self.first_request is not None:
            first, self.first_request = self.first_request, None
            first()
        try:
            return await run_handler(fn(self, *args, **kwargs))
        except pyfuse3.FUSEError:
            raise
        except StoreError as e:
            log.error("event=store_error op=%s cause=%s: %s", name, type(e).__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("event=internal_error op=%s", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(DirectoryOps):
    """Directories, stored files and transient files of one mounted volume."""

    #: called before the first request after the kernel's handshake is answered: the
    #: kernel has applied the handshake then, and no app has had an answer yet
    first_request: Callable[[], None] | None = None


for _name in dir(pyfuse3.Operations):
    _fn = getattr(Operations, _name)
    if not _name.startswith("_") and inspect.iscoroutinefunction(_fn) and _fn is not getattr(pyfuse3.Operations, _name):
        setattr(Operations, _name, _guarded(_name, _fn))
