"""A failed write (disk full, quota, read-only or failing filesystem) as one line, exit 2.

Every artifact and checkpoint is written through one of two boundaries: `artifacts._atomic`
(temp file + rename) and `train.checkpoint.Checkpointer` (orbax saves, whose asynchronous
errors surface in the next save or in `wait_until_finished`). Each wraps its writes in
`writing` (or calls `write_error`), which turns the OS error behind an exception into a
`WriteError`: the file or directory, the errno text, the free space left on that filesystem
and, when the caller knows it, how much the write needs. `main` prints it like any
`UserError`. Nothing complete is touched on the way out: a file artifact's temp file is
removed, a checkpoint step that did not commit stays a temp directory that the next run
recognises as incomplete and removes (`train.checkpoint.remove_incomplete_steps`).

orbax writes arrays with tensorstore, whose errors are `ValueError`s carrying the OS error
code in their text (``... No space left on device [os_error_code='28']``), not `OSError`s:
both are recognised. Any other exception passes through unchanged (a bug keeps its
traceback).
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import logging
import os
import re
import shutil
import sys

import numpy as np

from kdprune_jax.errors import UserError

_TENSORSTORE_CODE = re.compile(r"os_error_code='?(\d+)")

# What to do about it, by errno; the default covers EIO and other device failures.
_ADVICE = {
    errno_lib.ENOSPC: "free some space",
    errno_lib.EDQUOT: "free some space or raise the quota",
    errno_lib.EFBIG: "raise the file size limit",
    errno_lib.EACCES: "make it writable",
    errno_lib.EPERM: "make it writable",
    errno_lib.EROFS: "use a writable filesystem",
}

# Errors that say the storage, not the program, is at fault: `main` reports these as one
# line even when they come from a write outside the two boundaries.
STORAGE_ERRNOS = frozenset({errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EFBIG,
                            errno_lib.EIO, errno_lib.EROFS})


class WriteError(UserError):
    """Writing an artifact or checkpoint failed at the OS level (the message says where)."""

    def __init__(self, message: str, *, path: str, errno: int | None,
                 free: int | None, needed: int | None):
        self.path, self.errno, self.free, self.needed = path, errno, free, needed
        super().__init__(message)


def os_error(e: BaseException) -> tuple[int | None, str, str | None] | None:
    """(errno, errno text, file name or None) of the OS error behind `e` (itself, its cause
    or context, or a tensorstore error quoting the code), or None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (e.errno is not None or e.strerror):
            code = e.errno
            return code, e.strerror or os.strerror(code), e.filename
        m = _TENSORSTORE_CODE.search(str(e))
        if m:
            code = int(m.group(1))
            return code, os.strerror(code), None
        e = e.__cause__ or e.__context__
    return None


def free_bytes(path: str) -> int | None:
    """Free bytes (for this user) on the filesystem holding `path` or its nearest existing
    parent; None when the filesystem cannot say."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def write_error(e: BaseException, path: str, *, needed: int | None = None,
                needed_is: str = "this write needs about", what: str = "",
                verb: str = "write") -> WriteError | None:
    """The one-line `WriteError` for exception `e` raised while writing `path` (`what`
    names the artifact, e.g. "checkpoint"; `needed_is` introduces the `needed` bytes), or
    None when `e` is not an OS error."""
    found = os_error(e)
    if found is None:
        return None
    code, text, _ = found
    name = f" {errno_lib.errorcode[code]}" if code in errno_lib.errorcode else ""
    why = f"{text} (errno {code}{name})" if code is not None else text
    free = free_bytes(path)
    space = f"{fmt_bytes(free)} free on its filesystem" if free is not None else \
        "free space unknown (the filesystem does not report it)"
    if needed is not None:
        space += f", {needed_is} {fmt_bytes(needed)}"
    advice = _ADVICE.get(code, "check the filesystem")
    msg = (f"cannot {verb} {what + ' ' if what else ''}{path}: {why}; "
           f"{space}; {advice} and rerun the same command (what is complete is kept)")
    return WriteError(msg, path=path, errno=code, free=free, needed=needed)


@contextlib.contextmanager
def writing(path: str, *, needed: int | None = None, what: str = ""):
    """Inside, an OS error becomes the one-line `WriteError` for `path`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        err = write_error(e, path, needed=needed, what=what)
        if err is None:
            raise
        raise err from None


def open_memmap(path: str, dtype, shape) -> np.memmap:
    """``np.lib.format.open_memmap(path, "w+", dtype, shape)`` with its disk blocks allocated
    at once. A memmap's file is sparse and its pages reach the disk later: on a full
    filesystem the kernel then kills the process with SIGBUS mid-pass (no message, no
    cleanup). Allocating up front turns that into a `WriteError` here, before the pass,
    with the size it needs; the file is removed again when it fails."""
    needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with writing(path, needed=needed):
        mm = np.lib.format.open_memmap(path, "w+", dtype, tuple(shape))
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno not in (errno_lib.EOPNOTSUPP, errno_lib.ENOSYS, errno_lib.EINVAL):
                del mm
                os.unlink(path)
                raise
        finally:
            os.close(fd)
    return mm


def storage_error(e: BaseException) -> WriteError | None:
    """For `main`: a `WriteError` when `e` is an `OSError` saying the storage is full or
    failing (`STORAGE_ERRNOS`) and no boundary has reported it yet, else None."""
    if not isinstance(e, OSError) or e.errno not in STORAGE_ERRNOS:
        return None
    return write_error(e, e.filename or os.getcwd(),
                       verb="write" if e.errno in _ADVICE else "read or write")


def _debugging() -> bool:
    return logging.getLogger("absl").getEffectiveLevel() <= logging.DEBUG


class _QuietStorageErrors(logging.Filter):
    """Drops the ERROR records a failed orbax save leaves behind: orbax's own (a traceback
    per background thread) and asyncio's "Future exception was never retrieved" for each
    tensorstore write still pending, all about the same OS error that the save boundary
    reports as one line. Kept with ``--verbosity`` at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or _debugging():
            return True
        if record.name != "asyncio" and "orbax" not in record.pathname:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and os_error(exc) is not None:
            return False
        return _TENSORSTORE_CODE.search(record.getMessage()) is None


def _abandoned_loop(unraisable) -> bool:
    """A tensorstore write finishing after orbax closed the event loop of a save that had
    already failed: tensorstore reports it as an unraisable RuntimeError, one per write."""
    tb = unraisable.exc_traceback
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def quiet_orbax_storage_errors() -> None:
    """Silence what a failed asynchronous checkpoint save prints besides the one line of
    its `WriteError` (idempotent): the log records of `_QuietStorageErrors` and the
    unraisable "Event loop is closed" errors of its abandoned writes."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietStorageErrors) for f in logger.filters):
            logger.addFilter(_QuietStorageErrors())
    hook = sys.unraisablehook
    if getattr(hook, "_kdprune_quiet", False):
        return

    def quiet(unraisable):
        if _debugging() or not _abandoned_loop(unraisable):
            hook(unraisable)

    quiet._kdprune_quiet = True
    sys.unraisablehook = quiet
