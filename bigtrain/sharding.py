"""Mesh from config, logical-axis rules, and the shardings of state and batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from bigtrain.config import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis

# Logical parameter axis (named by the models) -> mesh axis. Unlisted names are replicated.
# A dimension that does not divide evenly over its mesh axis stays replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("input", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("classes", None),
    ("conv_in", None),
    ("pos", None),
)


def mesh_shape(cfg: ConfigDict, num_devices: int) -> tuple[int, ...]:
    sizes = [cfg[axis] for axis in MESH_AXES]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {num_devices} devices are not "
                f"divisible by {known}; choose sizes whose product divides {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) > num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices "
            f"but {num_devices} are available; set one size to -1 to fill from the device count"
        )
    return tuple(sizes)


def make_mesh(cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    used = int(np.prod(shape))
    if used < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(
                f"mesh {shape} uses {used} of {len(devices)} devices; "
                "multi-process runs must use all of them"
            )
        logging.warning("mesh %s uses %d of %d devices", shape, used, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices[:used]
    )


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        lower, upper = batch_size // dp * dp, (batch_size // dp + 1) * dp
        raise ConfigError(
            f"{key}={batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}); use a multiple of {dp}, e.g. {lower or upper} or {upper}"
        )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """Maps one parameter's logical axis names to a PartitionSpec over `mesh`."""
    rules = dict(LOGICAL_RULES)
    names = tuple(names) or (None,) * len(shape)  # an unannotated parameter is replicated
    used, spec = set(), []
    for name, dim in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or axis not in mesh.shape or dim % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis if mesh.shape[axis] > 1 else None)
    return P(*spec)


def param_shardings(logical: dict, abstract: dict, mesh: Mesh) -> dict:
    """Shardings for a params tree from the tree of logical PartitionSpecs the models carry."""
    is_spec = lambda x: isinstance(x, P)
    return jax.tree.map(
        lambda names, a: NamedSharding(mesh, logical_to_mesh(tuple(names), a.shape, mesh)),
        logical,
        abstract,
        is_leaf=is_spec,
    )
