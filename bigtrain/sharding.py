"""Mesh from config, logical-axis rules, and the shardings of state and batches."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from bigtrain.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis
FSDP_MIN_SIZE = 2**14  # parameters at least this big are sharded over fsdp even without a rule


def parse_rules(rules: Sequence[str]) -> dict[str, str | None]:
    """("embed=fsdp", "mlp=tensor", "classes=none") -> {"embed": "fsdp", ...}."""
    out = {}
    for rule in rules:
        name, eq, axis = rule.partition("=")
        axis = axis.strip()
        if not eq or axis.lower() not in {*MESH_AXES, "none"}:
            raise ConfigError(
                f"mesh.rules entry {rule!r} must look like logical=AXIS with AXIS one of "
                f"{', '.join(MESH_AXES)} or none"
            )
        out[name.strip()] = None if axis.lower() == "none" else axis
    return out


@functools.cache
def default_rules() -> dict[str, str | None]:
    from bigtrain.config import base

    return parse_rules(base().mesh.rules)


def mesh_shape(cfg: ConfigDict, num_devices: int) -> tuple[int, ...]:
    sizes = [cfg[axis] for axis in MESH_AXES]
    named = dict(zip(MESH_AXES, sizes, strict=True))
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {named}: {num_devices} devices are not divisible by {known}; choose sizes "
                f"whose product divides {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) > num_devices:
        raise ConfigError(
            f"mesh {named} needs {int(np.prod(sizes))} devices but {num_devices} are available; "
            "set one size to -1 to fill from the device count"
        )
    return tuple(sizes)


def make_mesh(cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; `dcn_data`/`dcn_fsdp` > 1 split those axes across slices."""
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
    if devices[0].platform == "cpu" and shape[1] > 1 and shape[2] > 1:
        logging.warning(
            "mesh %s: XLA's CPU backend (jax 0.10.2) computes wrong gradients for some models "
            "when fsdp and tensor are both > 1 (an MLP on 2x2x2, a 1D CNN on 1x2x4; ViT is "
            "right). tests/sharding_test.py reproduces it in plain JAX. Prefer fsdp or tensor "
            "alone on CPU",
            shape,
        )
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1)
    if dcn != (1, 1, 1):
        return _hybrid_mesh(shape, dcn, devices)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices[:used]
    )


def _hybrid_mesh(shape, dcn, devices) -> Mesh:
    """Multi-slice TPU: `dcn` divides the axes across slices (slow links), the rest within."""
    from jax.experimental import mesh_utils

    for axis, size, across in zip(MESH_AXES, shape, dcn, strict=True):
        if size % across:
            raise ConfigError(f"mesh.{axis}={size} is not divisible by its dcn size {across}")
    ici = tuple(size // across for size, across in zip(shape, dcn, strict=True))
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    except (ValueError, AttributeError, KeyError) as e:
        raise ConfigError(
            f"cannot build a multi-slice mesh (in-slice {ici}, across slices {dcn}) from these "
            f"devices: {e}. dcn_* sizes > 1 need TPU slices (devices with slice_index)."
        ) from None
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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


def batch_sharding(mesh: Mesh, ndim: int, chunked: bool = False) -> NamedSharding:
    """Rows over the batch axes; `chunked` arrays (K, B, ...) stack K batches on axis 0."""
    lead = (None,) if chunked else ()
    return NamedSharding(mesh, P(*lead, BATCH_AXES, *([None] * (ndim - 1 - len(lead)))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_to_mesh(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: dict[str, str | None] | None = None,
) -> P:
    """One parameter's PartitionSpec: its logical names through `rules`, then FSDP by size.

    A dimension whose size does not divide its mesh axis stays replicated. A parameter of at
    least FSDP_MIN_SIZE elements that no rule put on `fsdp` is sharded over fsdp along its
    largest divisible dimension, so FSDP covers every big tensor, whatever its names.
    """
    rules = default_rules() if rules is None else rules
    names = tuple(names) or (None,) * len(shape)  # an unannotated parameter is replicated
    used, spec = set(), []
    for name, dim in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        size = mesh.shape.get(axis, 1) if axis is not None else 1
        if axis is None or axis in used or size == 1 or dim % size:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used and int(np.prod(shape)) >= FSDP_MIN_SIZE:
        free = [i for i, d in enumerate(shape) if spec[i] is None and d % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def param_shardings(
    logical: dict, abstract: dict, mesh: Mesh, rules: dict[str, str | None] | None = None
) -> dict:
    """Shardings for a params tree from the tree of logical PartitionSpecs the models carry."""
    is_spec = lambda x: isinstance(x, P)
    return jax.tree.map(
        lambda names, a: NamedSharding(mesh, logical_to_mesh(tuple(names), a.shape, mesh, rules)),
        logical,
        abstract,
        is_leaf=is_spec,
    )
