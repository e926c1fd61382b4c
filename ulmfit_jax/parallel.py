"""Data parallelism over every device of every process: `jit` with `NamedSharding` over a one-axis `Mesh`.

Batches and the LM's hidden state are sharded on their batch axis (each device keeps its own
streams); parameters and optimizer state are replicated; `jit` inserts one gradient all-reduce.
With several processes (`initialize_distributed`, one per host) the mesh spans all of their
devices; each process lays out the global batch on the host and feeds only the rows its own
devices hold, so the global batches, and the results, are the single-process run's.
The mesh axis is `Auto`: explicit axes make the embedding gather raise `ShardingTypeError`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-process runs: call first, in every process, before any other JAX call. Where JAX detects
    the cluster (TPU slices, SLURM, Open MPI) no argument is needed; elsewhere give all three. On CPU
    the collectives go over gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
    """Process 0 writes files and prints progress; the others only compute."""
    return jax.process_index() == 0


def data_mesh(devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _global(leaf, sharding):
    """A host value (the same on every process) or a jax.Array -> a global array with `sharding`,
    built from the slices this process's devices hold; never the caller's buffer (train steps donate
    theirs)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:      # already global: made by the loop
        return jax.device_put(leaf, sharding)
    value = np.asarray(leaf)          # a copy of a device array: device_put would alias its buffer
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree, mesh):
    """Every leaf on every device, strongly typed: a weakly typed leaf (`jnp.full(n, 1e-3)`) is another
    jit signature than the strongly typed one a train step returns, so the step would compile twice."""
    strong = jax.tree.map(lambda leaf: leaf.astype(leaf.dtype) if getattr(leaf, "weak_type", False) else leaf,
                          tree)
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda leaf: _global(leaf, sharding), strong)


def shard_batch(tree, mesh):
    """Every leaf's axis 0 across the mesh's devices (the global batch must divide evenly); each
    process transfers only its own devices' rows."""
    n_devices = mesh.devices.size
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    def put(leaf):
        shape = np.shape(leaf)
        if shape[0] % n_devices:
            raise ValueError(f"batch of {shape[0]} does not divide over {n_devices} devices")
        return _global(leaf, sharding)

    return jax.tree.map(put, tree)


def local_copy(tree):
    """A replicated tree as arrays on this process's first device (no host copy): what evaluation and
    saving read, in every process alike. Always one device, so that evaluation programs compiled
    ahead match later calls whatever sharding the train step gave its outputs."""
    return jax.tree.map(lambda leaf: leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf, tree)


def to_host(tree):
    """A replicated tree as numpy arrays."""
    return jax.tree.map(np.asarray, local_copy(tree))
