"""Data parallelism over all local devices: `jit` with `NamedSharding` over a one-axis `Mesh`.

Batches and the LM's hidden state are sharded on their batch axis (each device keeps its own
streams); parameters and optimizer state are replicated; `jit` inserts one gradient all-reduce.
The mesh axis is `Auto` (DESIGN.md: explicit axes, the default since JAX 0.9, make the embedding
gather raise `ShardingTypeError`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def initialize_distributed() -> None:
    """Multi-host runs (TPU pods): call first, on every host, before any other JAX call."""
    jax.distributed.initialize()


def data_mesh(devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicate(tree, mesh):
    """Every leaf on every device, strongly typed: a weakly typed leaf (`jnp.full(n, 1e-3)`) is another
    jit signature than the strongly typed one a train step returns, so the step would compile twice."""
    strong = jax.tree.map(lambda leaf: leaf.astype(leaf.dtype) if getattr(leaf, "weak_type", False) else leaf,
                          tree)
    return jax.device_put(strong, NamedSharding(mesh, PartitionSpec()))


def shard_batch(tree, mesh):
    """Put every leaf's axis 0 across the mesh's devices (the batch must divide evenly)."""
    n_devices = mesh.devices.size

    def put(leaf):
        leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        if leaf.shape[0] % n_devices:
            raise ValueError(f"batch of {leaf.shape[0]} does not divide over {n_devices} devices")
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec("data")))

    return jax.tree.map(put, tree)
