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


def local_batch_size(global_batch_size: int, field: str = "batch_size") -> int:
    """Rows of each global batch that this process reads. Raises ConfigError if uneven."""
    from kdprune_jax.errors import ConfigError

    n_dev, n_proc = jax.device_count(), jax.process_count()
    if global_batch_size <= 0 or global_batch_size % n_dev:
        raise ConfigError(
            field,
            global_batch_size,
            f"a positive multiple of the global device count ({n_dev})",
        )
    return global_batch_size // n_proc


def to_global(batch: dict, mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> dict of global jax.Arrays on "data".

    This is an explicit host -> device transfer, so it is allowed under
    `jax.transfer_guard("disallow")`.
    """
    sharding = batch_sharded(mesh)
    n_proc = jax.process_count()

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0] * n_proc,) + x.shape[1:]
        )

    return {k: put(v) for k, v in batch.items()}


def replicate(tree, mesh):
    """Place a pytree (params, optimizer state, teacher) replicated on every device."""
    return jax.device_put(tree, replicated(mesh))
