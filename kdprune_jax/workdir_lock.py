"""One owner per workdir: an exclusive lock file, taken atomically, released on exit.

``DIR/.kdprune.lock`` holds JSON (host, pid, start time, command, a token) and its mtime
is the holder's heartbeat, refreshed by a daemon thread. Taking the lock is one
``open(O_CREAT | O_EXCL)``: of two runs that race, exactly one creates the file; the other
reads the holder and stops with one line naming it (`WorkdirBusyError`, exit 2 in main).

A lock is stale, and taken over with a line saying so, when its holder is on this host and
its pid is no longer alive, or when its heartbeat is older than `stale_after_seconds` (a
holder on another host that died). Takeover renames the stale file to a name unique to
the taker (only one rename of a given file succeeds), deletes it, and then creates the lock
with O_EXCL like a first taker, so two takers of one stale lock still leave one owner.

Within one process the lock is re-entrant: the study runner claims a cell's workdir and
then calls `pipeline.run` on it, which takes the same lock again (a depth count).

Shared filesystems: on local disks and NFSv3+ exclusive creation is atomic, so the lock
is exact. gcsfuse (the launch scripts' bucket mount) does not promise it: two hosts
creating one object at the same instant can both succeed, the later write winning, and
mtime updates are not guaranteed to reach other hosts promptly. There the lock catches the
common case (a second run started later) but not a simultaneous start, and heartbeat
staleness should be judged with a generous `stale_after_seconds`; use Filestore/NFS when
several workers must share one root exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid

from kdprune_jax.errors import UserError

LOCK_NAME = ".kdprune.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


class WorkdirBusyError(UserError):
    """Another live run holds the workdir's lock."""


@dataclasses.dataclass
class _Held:
    path: str
    token: str
    depth: int
    stop: threading.Event
    thread: threading.Thread | None


_HELD: dict[str, _Held] = {}
_MUTEX = threading.Lock()


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_NAME)


def read_holder(workdir: str) -> dict | None:
    """The lock's contents (plus its heartbeat age in seconds), or None when unlocked."""
    return _read(lock_path(workdir))


def _read(path: str) -> dict | None:
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # garbage (the lock is written whole, never in part)
        try:
            age = time.time() - os.stat(path).st_mtime
        except OSError:
            return None
        return {"unreadable": True, "heartbeat_age": age}
    if not isinstance(holder, dict):
        return {"unreadable": True, "heartbeat_age": age}
    holder["heartbeat_age"] = age
    return holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: dict, stale_after_seconds: float = STALE_AFTER_SECONDS) -> str | None:
    """Why a holder is dead (None if it may be alive)."""
    if holder.get("unreadable"):
        age = holder.get("heartbeat_age", 0.0)
        return f"unreadable and untouched for {age:.0f} s" if age > stale_after_seconds else None
    if holder.get("host") == socket.gethostname():
        # On this host the pid decides: a paused (SIGSTOP) holder is alive, whatever its
        # heartbeat says. (Containers sharing a hostname but not a pid namespace would
        # need the pid namespace in the record; not handled.)
        if not _pid_alive(int(holder.get("pid", -1))):
            return f"pid {holder.get('pid')} on this host is not running"
        return None
    if holder.get("heartbeat_age", 0.0) > stale_after_seconds:
        return f"no heartbeat for {holder['heartbeat_age']:.0f} s"
    return None


def describe(holder: dict) -> str:
    if holder.get("unreadable"):
        return "an unreadable lock file"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('start', 0)))} "
            f"({holder.get('command', '?')})")


def _create(path: str, token: str) -> bool:
    """Write the record to a private file, then hard-link it onto the lock path: the link
    is the atomic, exclusive step, so a lock file is never seen half-written."""
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
                       "command": " ".join(sys.argv), "token": token}).encode()
    tmp = f"{path}.new-{token}"
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _beat(path: str, token: str, stop: threading.Event, every: float) -> None:
    """Refresh the lock's mtime while it is still ours (never another owner's file)."""
    while not stop.wait(every):
        if (_read(path) or {}).get("token") != token:
            return
        with contextlib.suppress(OSError):
            os.utime(path)


def try_acquire(workdir: str, *, log=print, stale_after_seconds: float = STALE_AFTER_SECONDS,
                heartbeat_seconds: float = HEARTBEAT_SECONDS) -> dict | None:
    """Take the workdir's lock; returns None on success, else the live holder's record.

    A stale lock is taken over (one `log` line says whose and why). Re-entrant within a
    process."""
    workdir = os.path.abspath(workdir)
    with _MUTEX:
        held = _HELD.get(workdir)
        if held is not None:
            held.depth += 1
            return None
        os.makedirs(workdir, exist_ok=True)
        path, token = lock_path(workdir), uuid.uuid4().hex
        for _ in range(3):
            if _create(path, token):
                break
            holder = read_holder(workdir)
            if holder is None:
                continue  # released between our two calls: try again
            reason = stale_reason(holder, stale_after_seconds)
            if reason is None:
                return holder
            aside = f"{path}.takeover-{os.getpid()}-{token[:8]}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another taker was faster; race it for the fresh lock
            moved = _read(aside) or {}
            if moved.get("token") != holder.get("token"):
                # Between our read and our rename another taker replaced the stale lock
                # with its own: put that one back (link fails only if yet another exists).
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                os.unlink(aside)
                return read_holder(workdir) or moved
            os.unlink(aside)
            log(f"[lock] {workdir}: taking over the lock of {describe(holder)}: {reason}")
        else:
            holder = read_holder(workdir)
            return holder or {"unreadable": True}
        stop = threading.Event()
        thread = None
        if heartbeat_seconds > 0:
            thread = threading.Thread(target=_beat, args=(path, token, stop, heartbeat_seconds),
                                      daemon=True, name=f"kdprune-lock-{workdir}")
            thread.start()
        _HELD[workdir] = _Held(path, token, 1, stop, thread)
        return None


def acquire(workdir: str, **kw) -> None:
    """`try_acquire`, raising WorkdirBusyError (one line naming the holder) when held."""
    holder = try_acquire(workdir, **kw)
    if holder is not None:
        raise WorkdirBusyError(
            f"workdir {os.path.abspath(workdir)} is in use by {describe(holder)}; wait for it "
            f"to finish, or stop it (a lock whose process has died is taken over "
            f"automatically; remove {lock_path(workdir)} only if you are sure it is dead)")


def release(workdir: str) -> None:
    """Drop one level of this process's hold; the file goes when the last level does."""
    workdir = os.path.abspath(workdir)
    with _MUTEX:
        held = _HELD.get(workdir)
        if held is None:
            return
        held.depth -= 1
        if held.depth > 0:
            return
        del _HELD[workdir]
        held.stop.set()
        if held.thread is not None:
            held.thread.join(timeout=5)
        try:
            with open(held.path) as f:
                mine = json.load(f).get("token") == held.token
        except (OSError, ValueError):
            mine = False
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(held.path)


def holds(workdir: str) -> bool:
    return os.path.abspath(workdir) in _HELD


@contextlib.contextmanager
def locked(workdir: str, **kw):
    """``with locked(DIR):`` — the run's exclusive hold on DIR."""
    acquire(workdir, **kw)
    try:
        yield
    finally:
        release(workdir)


__all__ = ["WorkdirBusyError", "acquire", "holds", "locked", "read_holder", "release",
           "stale_reason", "try_acquire"]
