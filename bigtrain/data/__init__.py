"""Input: built-in datasets -> per-process grain pipelines -> global, sharded jax.Arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from bigtrain import sharding
from bigtrain.data import pipeline, sources
from bigtrain.data.pipeline import Standardizer


@dataclasses.dataclass
class Data:
    train: Iterator[pipeline.Batch]  # checkpointable: get_state / set_state
    eval_dataset: object  # grain.MapDataset of local eval batches
    num_classes: int
    input_shape: tuple[int, ...]
    num_train: int
    num_test: int
    mesh: Mesh

    def next_train(self) -> dict[str, jax.Array]:
        return to_global(next(self.train), self.mesh)

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.eval_dataset:
            yield to_global(batch, self.mesh)


def build(config: ConfigDict, mesh: Mesh) -> Data:
    ds = sources.load(config.data)
    channels = ds.input_shape[-1]
    stats = (
        Standardizer.fit(ds.x_train)
        if config.data.standardize
        else (Standardizer.identity(channels))
    )
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train = pipeline.train_dataset(
        ds, stats, seed=config.seed, global_batch=config.batch_size, **where
    )
    test = pipeline.eval_dataset(ds, stats, global_batch=config.eval_batch_size, **where)
    it = pipeline.iterate(train, threads=config.data.read_threads, prefetch=config.data.prefetch)
    return Data(it, test, ds.num_classes, ds.input_shape, len(ds.x_train), len(ds.x_test), mesh)


def to_global(batch: pipeline.Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local rows into one global array sharded over the batch axes."""
    out = {}
    for key, local in batch.items():
        spec = sharding.batch_sharding(mesh, np.ndim(local))
        out[key] = jax.make_array_from_process_local_data(spec, local)
    return out
