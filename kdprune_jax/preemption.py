"""Graceful stop on SIGTERM / SIGINT: finish the current step, save it, exit with a line.

A Cloud TPU spot VM, SLURM's ``scancel``/time limit and the launch scripts' ``stop`` send
SIGTERM before they take the machine. `install()` (called by `main` and the study runner)
replaces the default handlers with one that only sets a flag; the training loop reads it
once per step (`stop_requested(step)`), and when it is set, commits a checkpoint of exactly
the step it finished and raises `Preempted`, which `main` turns into one line naming the
stage, the step and the rerun command, and exit status `EXIT_STATUS`. Passes without steps
(scores, features, teacher views, the policy loop) call `check(where)` between batches and
stop at once: they are redone on rerun.

Why a flag read by the loop rather than JAX's preemption sync point: JAX's
``reached_preemption_sync_point`` is False without a distributed client, its notifier is a
C-level SIGTERM handler that a Python ``signal.signal`` replaces (and it ignores SIGINT), and
it must be called with one ever-increasing counter across loops. One Python handler works
the same with one process or many; with several processes the per-step flag is agreed on
by an all-gather (`jax.experimental.multihost_utils.process_allgather`), so every process
stops after the same step and saves the same checkpoint, whichever process got the signal.
A second SIGTERM during the save only sets the flag again: the save completes (orbax
writes to a temporary directory and renames it when complete, so even a SIGKILL then leaves
the previous checkpoint intact). A second Ctrl-C (SIGINT) raises KeyboardInterrupt at once,
for a person who does not want to wait.
"""

from __future__ import annotations

import signal
import threading

from kdprune_jax.errors import UserError

EXIT_STATUS = 3  # distinct from 1 (a bug) and 2 (a user error); the rerun resumes
_FLAG = threading.Event()
_SIGNAL: list[str] = []
_INSTALLED: list[bool] = [False]


class Preempted(UserError):
    """The run was told to stop; what was saved and how to continue is in the message."""


def _handler(signum, _frame):
    name = signal.Signals(signum).name
    if name == "SIGINT" and "SIGINT" in _SIGNAL:
        raise KeyboardInterrupt  # a second Ctrl-C: the person wants out now, unsaved
    _SIGNAL.append(name)
    _FLAG.set()


def install() -> None:
    """Route SIGTERM and SIGINT to the stop flag (main thread only; idempotent)."""
    if _INSTALLED[0] or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    _INSTALLED[0] = True


def request(name: str = "request") -> None:
    """Set the flag as a signal would (fault injection, tests)."""
    _SIGNAL.append(name)
    _FLAG.set()


def reset() -> None:
    _FLAG.clear()
    _SIGNAL.clear()


def signal_name() -> str:
    return _SIGNAL[0] if _SIGNAL else "a stop request"


def requested() -> bool:
    """This process's flag (no communication)."""
    return _FLAG.is_set()


def stop_requested() -> bool:
    """Whether ANY process of the run was told to stop; every process gets the same
    answer. One all-gather of a scalar per call with several processes, none with one."""
    import jax

    if jax.process_count() == 1:
        return _FLAG.is_set()
    import numpy as np
    from jax.experimental import multihost_utils

    # Called inside the training loop's transfer guard: the gather's host copy is intended.
    with jax.transfer_guard("allow"):
        flags = multihost_utils.process_allgather(np.int32(_FLAG.is_set()))
    return bool(np.any(flags))


def check(where: str) -> None:
    """In a pass without checkpoints: stop at once if told to (redone on rerun).

    Single-process runs only: one process of several leaving a pass alone would leave the
    others waiting in a collective, so a multi-process run finishes the pass and stops at
    the next training loop's agreed step instead."""
    import jax

    if _FLAG.is_set() and jax.process_count() == 1:
        raise Preempted(f"[{where}] stopped by {signal_name()}; nothing of this pass was "
                        "kept, it is redone when you rerun the same command")
