"""The artifact-reuse protocol every stage follows, in one place.

A stage's artifact is reused when it is readable and was made for the stage's key;
otherwise it is computed again and written by process 0 (atomically: temp file + rename,
or a temp directory renamed into place). Every stage says the same three things in the
same words:

    [<tag>] reusing <path>
    [<tag>] <path> is unreadable (<what is wrong>); <redo>
    [<tag>] <path> is stale (<why it may differ>); <redo>

`reuse_or_compute` is that protocol for a value read and written whole; `stage_dir` /
`publish_dir` are the directory form (streamed memmaps, e.g. features and teacher views):
the directory only ever appears complete, every process reads back what process 0 wrote.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable

import jax

from kdprune_jax import distributed, faults

STALE = object()
"""What a `read` returns (with problem None) for a readable artifact it knows was made for
another key, when it compares the key itself (e.g. saved K-FAC factors)."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """Where an artifact lives and how its stage talks about it.

    tag: the stage's log tag ("scores"); path: the file or directory; what: a noun put
    before the path in log lines ("K-FAC factors "); redo: what the stage does when it
    cannot reuse ("recomputing", "rebuilding", ...); stale: why a stale artifact differs;
    verb: "is", or "are" for a plural `what`."""

    tag: str
    path: str
    redo: str = "recomputing"
    stale: str = "different data, teacher or parameters"
    what: str = ""
    verb: str = "is"


def reuse_or_compute(art: Artifact, key, *, read: Callable, compute: Callable, log,
                     write: Callable | None = None, key_of: Callable | None = None,
                     check: Callable | None = None, describe: Callable | None = None,
                     announce: Callable | None = None):
    """The artifact at ``art.path`` if it was made for `key`, else ``compute()``.

    read(path) -> (value, None) | (None, None) when missing | (None, what is wrong)
      | (STALE, None) when the reader itself found another key.
    key_of(value) -> the key the value was made for (compared with `key`; without it,
      a value `read` returns is taken to match).
    check(value) -> None | what is wrong: checks that only make sense for a value made for
      this very key (e.g. its length against this run's data); a problem found here is
      reported as unreadable and the value recomputed.
    write(path, value): called on process 0 only, after `compute`.
    describe(value) -> str: appended to the reuse line (e.g. " (500 examples)").
    announce(value): called after `write` on a computed value (its "computed -> path" log
      line, so that the log never names a file before it exists).
    """
    got, problem = read(art.path)
    if got is not None and got is not STALE and (key_of is None or key_of(got) == key):
        problem = check(got) if check is not None else None
        if problem is None:
            log(f"[{art.tag}] reusing {art.what}{art.path}"
                + (describe(got) if describe is not None else ""))
            return got
    if problem:
        log(f"[{art.tag}] {art.what}{art.path} {art.verb} unreadable ({problem}); {art.redo}")
    elif got is not None:
        log(f"[{art.tag}] {art.what}{art.path} {art.verb} stale ({art.stale}); {art.redo}")
    value = compute()
    if write is not None and jax.process_index() == 0:
        write(art.path, value)
    if announce is not None:
        announce(value)
    return value


def stage_dir(path: str) -> str:
    """A fresh, empty ``<path>.tmp`` directory (made by process 0) to fill before
    `publish_dir`; a partial one left by a killed run is removed first."""
    tmp = path + ".tmp"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    return tmp


def publish_dir(tmp: str, path: str, *, name: str) -> None:
    """Move the complete `tmp` directory to `path` (process 0), replacing an old one, then
    wait until every process can read it (a barrier named after `name`).

    Kill point ``<name>:write``: the temp directory is complete, `path` not yet replaced
    (the rerun finds the old artifact, or none, and redoes the work)."""
    if jax.process_index() == 0:
        faults.maybe_kill(f"{name}:write")
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(f"kdprune_{name}_written")
