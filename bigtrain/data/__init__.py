"""Input: datasets -> per-process grain pipelines with preprocessing ops -> global jax.Arrays."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from bigtrain import sharding
from bigtrain.data import ops, pipeline, sources
from bigtrain.data.pipeline import Standardizer
from bigtrain.data.records import DataError

__all__ = ["Data", "DataError", "Standardizer", "build", "to_global"]


@dataclasses.dataclass
class Data:
    train: pipeline.Prefetch | pipeline.SkipCounter  # global batches; get_state / set_state
    eval_dataset: object  # grain.MapDataset of local eval batches
    num_classes: int
    input_shape: tuple[int, ...]
    num_train: int
    num_test: int
    mesh: Mesh
    workers: int = 0
    chunk: int = 1  # consecutive batches per transfer; next_train() serves (chunk, B, ...)
    label_shape: tuple[int, ...] = ()  # a train label: () an integer class, (K,) probabilities

    @property
    def skipped_records(self) -> int:
        """Train records skipped so far as unreadable (this process; survives a resume)."""
        return self.train.skipped

    def next_train(self) -> dict[str, jax.Array]:
        """The next step's input, already global arrays on the devices: its batch, or with
        chunk > 1 the (chunk, B, ...) stack holding it at row (step % chunk)."""
        return next(self.train)

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.eval_dataset:
            batch.pop("skipped", None)
            yield to_global(batch, self.mesh)


def build(config: ConfigDict, mesh: Mesh) -> Data:
    dc = config.data
    ds = sources.load(dc)
    stats = ds.statistics() if dc.standardize else Standardizer.identity(ds.channels)
    env = ops.Env(stats.mean, stats.std, ds.num_classes, ds.channels)
    default = "decode|standardize"
    for key in ("pp", "pp_eval"):
        if None in ds.input_shape and "resize" not in (dc[key] or default):
            raise DataError(
                f"the images in {dc.path} vary in size, so data.{key} needs a resize: e.g. "
                "decode|resize(32)|standardize (data.pp and data.pp_eval both need one)"
            )
    train_ops = ops.Chain(dc.pp or default, env)
    eval_ops = ops.Chain(dc.pp_eval or default, env)
    train_reader, test_reader = ds.readers()
    if not len(test_reader):
        raise DataError(
            f"{dc.path} has no val records to evaluate on; convert again with --val-fraction > 0 "
            "or from a source with a val split"
        )
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train = pipeline.train_dataset(
        train_reader,
        train_ops,
        seed=config.seed,
        global_batch=config.batch_size,
        strict=dc.strict,
        **where,
    )
    test = pipeline.eval_dataset(
        test_reader, eval_ops, global_batch=config.eval_batch_size, strict=dc.strict, **where
    )
    first = train[0]
    input_shape = _check_shapes(first, test[0], dc, ds.num_classes)
    workers = pipeline.auto_workers(dc.workers)
    chunk = auto_chunk(dc.chunk, first, workers, mesh)
    it = pipeline.iterate(
        train,
        threads=dc.read_threads,
        prefetch=max(math.ceil(dc.prefetch / chunk), 1 if chunk == 1 else 2),  # in chunks
        workers=workers,
        put=functools.partial(to_global, mesh=mesh, chunked=chunk > 1),
        chunk=chunk,
    )
    return Data(
        it,
        test,
        ds.num_classes,
        input_shape,
        len(train_reader),
        len(test_reader),
        mesh,
        workers,
        chunk,
        tuple(int(d) for d in first["y"].shape[1:]),
    )


CHUNK_BYTES = 16 * 2**20  # automatic data.chunk: as many batches per transfer as fit in this
CHUNK_MAX = 256


def auto_chunk(requested: int, batch: dict, workers: int, mesh: Mesh) -> int:
    """-1 = automatic: small batches travel CHUNK_BYTES at a time (one transfer, no host work
    for many steps: what keeps the loop at the bare step's speed for small models).

    Not on meshes of several CPU devices: there XLA:CPU's collectives intermittently deadlock
    in a step that indexes a chunk (jax 0.10.2, seen with 8 simulated devices); those meshes
    are for testing sharding, not for speed."""
    if requested > 1 and workers > 0:
        raise DataError(
            f"data.chunk={requested} needs data.workers=0 (worker processes serve one batch at "
            "a time); set data.chunk=-1 or 1, or data.workers=0"
        )
    if requested > 0:
        return requested
    if workers > 0 or (mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"):
        return 1
    size = sum(np.asarray(v).nbytes for k, v in batch.items() if k != "skipped")
    return int(np.clip(CHUNK_BYTES // max(size, 1), 1, CHUNK_MAX))


def _check_shapes(train: dict, test: dict, dc: ConfigDict, num_classes: int) -> tuple[int, ...]:
    """The model's input shape, from the first batch; train and eval ops must agree on it.
    Labels may be integers or class probabilities (onehot/mixup/cutmix) on either side."""
    for name, batch in (("data.pp", train), ("data.pp_eval", test)):
        y = batch["y"]
        if y.ndim == 2 and y.shape[1] != num_classes:
            raise DataError(
                f"{name} makes labels of {y.shape[1]} classes but the dataset has {num_classes}; "
                "drop the class count from onehot(...) or fix it"
            )
        if y.ndim not in (1, 2):
            raise DataError(f"{name} makes labels of shape {y.shape[1:]}; expected () or (K,)")
    shape, eval_shape = train["x"].shape[1:], test["x"].shape[1:]
    if shape != eval_shape:
        raise DataError(
            f"data.pp gives inputs of shape {shape} but data.pp_eval gives {eval_shape}; "
            "make them agree, e.g. random_crop(32) for training and center_crop(32) for eval"
        )
    return tuple(int(d) for d in shape)


def to_global(batch: pipeline.Batch, mesh: Mesh, chunked: bool = False) -> dict[str, jax.Array]:
    """Assembles each process's local rows into one global array sharded over the batch axes
    (axis 1 of a `chunked` (K, B, ...) stack of batches)."""
    specs = {k: sharding.batch_sharding(mesh, np.ndim(v), chunked) for k, v in batch.items()}
    if jax.process_count() == 1:
        return jax.device_put(batch, specs)  # one transfer call for the whole batch
    return {
        key: jax.make_array_from_process_local_data(specs[key], local)
        for key, local in batch.items()
    }
