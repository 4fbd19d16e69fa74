"""Fault injection for the kill-anywhere resume tests (tests/test_faults.py).

``KDPRUNE_KILL_AT=<point>`` makes the process SIGKILL itself when it reaches the named kill
point, as a preempted TPU VM dies: no exception, no ``finally``, no atexit, no flush. A rerun
of the same command must then give the same answer as an uninterrupted run. Kill points:

    <stage>:<step>      right after training step <step> of teacher / student / proxy<k>,
                        once the checkpoints already started have committed (train/loop.py)
    proxies:done        every proxy trained, before the scoring passes (stages/scores.py)
    <pass>:batch<k>     after batch k (1-based) of a batched pass was dispatched:
                        features:batchK (IF-Beta teacher features, streamed to features.tmp/),
                        scores:batchK (the scoring passes over the proxies / teacher)
                        teacher_views:batchK (the cached teacher's pass over the views)
    <dir>:write         features / teacher_views: the temp directory complete, not yet
                        renamed into place (stages/cache.py publish_dir)
    policy:step<k>      after IF-Beta outer step k (the policy is relearned on rerun)
    select:write        subset chosen, subset.json not yet written (stages/select.py)
    select:written      subset.json written, student not started
    eval:test           student evaluated on the test split, not yet on the validation split
    eval:write          every metric computed, results.json not yet written

The variable is read once, at import; with it unset every kill point is one comparison of
a string against ``None`` (loops guard with `armed` so they do not even format the name).
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "KDPRUNE_KILL_AT"
KILL_AT: str | None = os.environ.get(ENV) or None
# ``KDPRUNE_SIGNAL_AT=<point>`` (a training step ``<stage>:<step>`` or a pass batch
# ``<pass>:batch<k>``): there, this process sends itself a real SIGTERM (preemption.py).
SIGNAL_AT: str | None = os.environ.get("KDPRUNE_SIGNAL_AT") or None


def armed(prefix: str = "") -> bool:
    """True when a kill point is set and starts with `prefix` (a loop checks this once, so
    it formats its per-iteration point names only when one of them can fire)."""
    return KILL_AT is not None and KILL_AT.startswith(prefix)


def maybe_kill(point: str, before=None) -> None:
    """SIGKILL this process if `point` is the kill point; `before()` runs first (e.g. wait
    for in-flight checkpoint saves, so the resume point is deterministic). One line on
    stderr says which point fired (tests check it was this one)."""
    if point == KILL_AT:
        if before is not None:
            before()
        print(f"[faults] {ENV}={point} reached: SIGKILL", file=sys.stderr, flush=True)
        kill_self()


def signal_armed(prefix: str = "") -> bool:
    """True when a KDPRUNE_SIGNAL_AT point is set and starts with `prefix`."""
    return SIGNAL_AT is not None and SIGNAL_AT.startswith(prefix)


def maybe_signal(point: str) -> None:
    """Send this process a real SIGTERM if `point` is the KDPRUNE_SIGNAL_AT point (the
    preemption handler takes it, as it would a scheduler's)."""
    if point == SIGNAL_AT:
        print(f"[faults] KDPRUNE_SIGNAL_AT={point} reached: SIGTERM", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
