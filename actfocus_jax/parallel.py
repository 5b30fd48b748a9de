"""Device meshes and sharding rules (DESIGN.md section 8).

The mesh has three named axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp``
(data parallelism with parameters and optimiser state sharded over this axis, ZeRO-3 style) and
``tensor`` (Megatron-style model parallelism over heads / MLP / vocab). Parameters carry logical
axis names (see :data:`actfocus_jax.models.config.LOGICAL_AXES`); :data:`DEFAULT_RULES` maps them to
mesh axes. A dimension whose size is not divisible by its mesh axes is replicated instead, so every
model runs on every mesh. Batches are sharded over ``("data", "fsdp")`` along their first axis.

``jax.jit`` with these ``NamedSharding`` inputs lets XLA's SPMD partitioner insert the collectives
(all-gathers of FSDP weights, gradient reductions); the numbers equal a single-device run up to
floating-point reassociation. Multi-host: call :func:`initialize_distributed` first, then build the
mesh over ``jax.devices()`` (all hosts' devices) as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "init_sharded",
    "initialize_distributed",
    "logical_to_mesh",
    "make_mesh",
    "param_shardings",
    "replicate",
    "shard_batch",
    "shard_params",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
#: logical axis -> mesh axis (or None = replicated).
DEFAULT_RULES: Mapping[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
}


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one size may be -1 (all remaining devices).

    Without a -1, a mesh smaller than the device count uses the first ``data * fsdp * tensor``
    devices.

    Raises:
      ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in (data, fsdp, tensor) and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]  # an explicit smaller mesh uses the first devices
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} "
            f"devices, but {len(devices)} are available; set the sizes so they multiply to "
            f"{len(devices)} (one of them may be -1)"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_mesh(
    spec: PartitionSpec | Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> PartitionSpec:
    """Maps a logical partition spec to mesh axes; non-divisible or size-1 axes are replicated."""
    out = []
    used: set[str] = set()
    for name, dim in zip(tuple(spec) + (None,) * (len(shape) - len(tuple(spec))), shape):
        axis = rules.get(name) if isinstance(name, str) else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return PartitionSpec(*out)


def param_shardings(
    params: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> Any:
    """``NamedSharding`` of every parameter of an ``nnx.State`` (same tree structure)."""
    specs = nnx.get_partition_spec(params)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
    leaves, treedef = jax.tree.flatten(params)
    shardings = [
        NamedSharding(mesh, logical_to_mesh(spec, np.shape(x), mesh, rules))
        for spec, x in zip(spec_leaves, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, shardings)


def shard_params(params: Any, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> Any:
    """Places an ``nnx.State`` of parameters on the mesh per the rules."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on all devices of ``mesh`` (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def init_sharded(init_fn: Any, params: Any, mesh: Mesh) -> Any:
    """``init_fn(params)`` under ``jit``: state mirroring sharded ``params`` (e.g. Adam's moments)
    inherits their shardings; leaves that end up elsewhere (constants such as step counts) are
    replicated over ``mesh``."""
    out = jax.jit(init_fn)(params)
    mesh_devices = set(mesh.devices.flat)

    def place(x):
        if isinstance(x, jax.Array) and x.sharding.device_set != mesh_devices:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        return x

    return jax.tree.map(place, out)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Shards every array of ``batch`` along its first axis over ``("data", "fsdp")``."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"batch axis of size {x.shape[0] if x.ndim else 0} is not divisible by the "
                f"{n} data-parallel devices (data x fsdp); change the batch size or the mesh"
            )
        spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> None:
    """``jax.distributed.initialize`` (TPU pods and SLURM/Kubernetes GPU clusters auto-detect all
    arguments; on CPU pass them explicitly). Safe to call once per process before any computation."""
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )
