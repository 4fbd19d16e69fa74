"""JAX's multi-process runtime: when and how to join it, and the few barriers a run needs.

A multi-host run (a Cloud TPU VM pod slice, several GPU nodes, or several CPU processes in a
test) starts the SAME command on every host. Each process calls `initialize` before touching
any device; JAX's coordination service then connects them, `jax.devices()` lists every
process's devices, and a global ``("data",)`` mesh spans them all (sharding.make_mesh).

Failure model: every process sends heartbeats to the coordinator. If one dies (preempted,
OOM-killed, SIGKILL), the coordination service notices within `heartbeat_timeout_seconds`
and terminates the survivors with an error naming the lost task, instead of leaving them
blocked in a collective forever. Rerunning the same command resumes from the last committed
checkpoint (orbax saves are collective and atomic).
"""

from __future__ import annotations

import os

import jax

MODES = ("auto", "on", "off")


def wants_distributed(mode: str, coordinator_address: str | None,
                      num_processes: int | None) -> bool:
    """Whether this process should join a multi-process run.

    mode "on": always (a TPU VM pod slice or a SLURM/Open MPI job, where JAX detects the
    coordinator, process count and id itself); "off": never; "auto": when a coordinator
    address or a process count > 1 is given (flag or $JAX_COORDINATOR_ADDRESS /
    $JAX_NUM_PROCESSES), or on a multi-host TPU VM ($TPU_WORKER_HOSTNAMES lists > 1 host).
    """
    if mode not in MODES:
        from kdprune_jax.errors import ConfigError

        raise ConfigError("--distributed", mode, ", ".join(MODES))
    if mode != "auto":
        return mode == "on"
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return bool(address) or count > 1 or len(tpu_hosts) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 60,
               initialization_timeout_seconds: int = 300) -> None:
    """Join the multi-process runtime (must run before any other JAX call).

    Arguments left None are read by JAX from $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
    $JAX_PROCESS_ID or detected from the cluster (Cloud TPU VM metadata, SLURM, Open MPI).
    Cross-process collectives on the CPU backend use gloo: the default of recent JAX, set
    explicitly because older versions had none and failed at the first all-reduce (the
    option only affects the CPU backend, so TPU/GPU runs are unchanged).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


def barrier(name: str) -> None:
    """Block until every process reaches the barrier `name` (no-op with one process).

    Used where process 0 changes the shared workdir (moving a stale checkpoint aside,
    writing an artifact) and the others must not look at it before the change is done.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_agree(ok: bool) -> bool:
    """True when `ok` holds on every process, so that all of them take the same branch
    (e.g. "this checkpoint step is intact") before any one changes the shared workdir."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
