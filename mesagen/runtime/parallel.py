"""Data parallelism on ``jax.sharding``: the batch is sharded over a one-axis device mesh, parameters replicated.

The trainer builds a :class:`jax.sharding.Mesh` of ``train.devices`` devices (default: every device JAX sees,
``jax.devices()``; across all processes when multi-host) with one axis, :data:`DATA_AXIS`. Model and optimiser
state are placed replicated (``NamedSharding(mesh, P())``); the batch sampled inside the jitted step is
constrained to ``NamedSharding(mesh, P("data"))`` (sharded along its first axis, the sequence index), so each
device runs the model on ``batch_size / n`` sequences and XLA all-reduces the gradients. Nothing in the model
changes and no config change is needed: a 1-device mesh is the single-device trainer.

The data are the same on every layout: JAX's partitionable threefry (``jax_threefry_partitionable``, on by
default) draws the same bits for a sharded as for an unsharded array, so a run on n devices sees exactly the
batches of a 1-device run and its losses agree to float32 round-off (the order of the batch mean's
summation differs). Checkpoints hold plain host arrays, so a checkpoint written on one layout resumes on any
other (:meth:`mesagen.runtime.train.Trainer.load` places the leaves on the current mesh).

Multi-host (``jax.distributed.initialize``): every process runs the same ``mesagen train`` command; the mesh
spans all processes' devices; every process samples the batch from the same key and computes only its
devices' shards; process 0 alone writes the run folder (docs/parallel.md).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesagen.errors import MesagenError

#: Name of the mesh axis the batch is sharded over.
DATA_AXIS = "data"


class DeviceConfigError(MesagenError):
    """``train.devices`` asks for more devices than JAX sees, or the batch does not split evenly over them."""


def make_mesh(devices: int | None = None) -> Mesh:
    """A one-axis data-parallel mesh of the first ``devices`` devices of ``jax.devices()`` (all if None).

    Args:
        devices: how many devices; None means all (every process's, when multi-host).

    Returns:
        ``Mesh(devices, ("data",))``.

    Raises:
        DeviceConfigError: ``devices`` exceeds the number JAX sees (the message lists them), or (multi-host)
            is not all of them.
    """
    avail = jax.devices()
    n = len(avail) if devices is None else devices
    if n > len(avail):
        raise DeviceConfigError(f"train.devices: {n} devices asked for, JAX sees {len(avail)}: "
                                f"{', '.join(map(str, avail))} (on CPU, set XLA_FLAGS="
                                f"--xla_force_host_platform_device_count={n} before starting for virtual devices)")
    if jax.process_count() > 1 and n != len(avail):
        raise DeviceConfigError(f"train.devices: multi-host runs use every device ({len(avail)} over "
                                f"{jax.process_count()} processes); leave train.devices null")
    return Mesh(np.array(avail[:n]), (DATA_AXIS,))


def check_batch(mesh: Mesh, batch: int, what: str = "train.batch_size") -> None:
    """Raise :class:`DeviceConfigError` unless ``batch`` splits evenly over the mesh's data axis."""
    n = mesh.shape[DATA_AXIS]
    if batch % n:
        raise DeviceConfigError(f"{what}: {batch} sequences do not split evenly over {n} devices; use a multiple "
                                f"of {n} or set train.devices")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch-major array: first axis over ``"data"``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a parameter: a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def place(tree, sharding: NamedSharding):
    """Put every array leaf of ``tree`` onto ``sharding`` (other leaves unchanged).

    Works in multi-process runs too: each leaf is built with :func:`jax.make_array_from_callback` from the
    process's host copy (which must be the same on every process for a replicated sharding). Typed PRNG key
    arrays are placed through their key data.

    Args:
        tree: a pytree (an equinox model, an optax state, a key).
        sharding: the target sharding.

    Returns:
        The same pytree with ``jax.Array`` leaves on ``sharding``.
    """
    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray)):
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def constrain(tree, sharding: NamedSharding):
    """``jax.lax.with_sharding_constraint`` on every array leaf of ``tree`` (inside ``jit``)."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding)
                        if isinstance(x, jax.Array) else x, tree)


def describe(mesh: Mesh) -> dict:
    """What the run folder records about the layout: ``{"mesh": {"data": n}, "devices": [...], "platform",
    "process_count", "process_index"}`` (device names as ``str(device)``)."""
    devs = list(mesh.devices.flat)
    return {"mesh": {name: int(size) for name, size in mesh.shape.items()}, "devices": [str(d) for d in devs],
            "platform": devs[0].platform, "process_count": jax.process_count(),
            "process_index": jax.process_index()}
