"""The ("data",) device mesh, its shardings, and host -> global batch placement.

Params, optimizer state and the teacher are replicated; batches are sharded on their leading
axis over "data". Every process holds a disjoint slice of each global batch (its
`process_index`-th block of `global_batch // process_count` rows) and builds the global
array with `jax.make_array_from_process_local_data`, so no process ever materializes
another's data.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over `num_devices` (default: all) devices, axis "data".

    Auto axis type: the Explicit default makes sharding part of the type, which breaks
    per-example gradients (vmap of grad) through convolutions; Auto lets XLA's SPMD
    partitioner propagate shardings as in the classic pjit flow.
    """
    n = num_devices or jax.device_count()
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"; trailing axes replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def batch_multiple_phrase() -> str:
    """What a global batch size must be a multiple of, for error messages: the same text on
    every process of a multi-process run."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if n_proc == 1:
        return f"a positive multiple of the device count ({n_dev})"
    return (f"a positive multiple of the global device count ({n_dev} = {n_proc} processes x "
            f"{jax.local_device_count()} devices)")


def local_batch_size(global_batch_size: int, field: str = "batch_size") -> int:
    """Rows of each global batch that this process reads (its disjoint slice; never empty).

    Raises ConfigError unless the global batch splits evenly over every device: each
    process then reads ``global // process_count >= local_device_count`` rows."""
    from kdprune_jax.errors import ConfigError

    if global_batch_size <= 0 or global_batch_size % jax.device_count():
        raise ConfigError(field, global_batch_size, batch_multiple_phrase())
    return global_batch_size // jax.process_count()


def to_global(batch: dict, mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> dict of global jax.Arrays on "data".

    This is the one intended host -> device transfer of the training loop, so it is allowed
    explicitly under `jax.transfer_guard("disallow")`: with several processes JAX builds the
    global array through per-device callbacks, which the guard would otherwise count as
    implicit transfers.
    """
    sharding = batch_sharded(mesh)
    n_proc = jax.process_count()

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0] * n_proc,) + x.shape[1:]
        )

    with jax.transfer_guard_host_to_device("allow"):
        return {k: put(v) for k, v in batch.items()}


def replicate(tree, mesh):
    """Place a pytree (params, optimizer state, teacher) replicated on every device."""
    return jax.device_put(tree, replicated(mesh))
