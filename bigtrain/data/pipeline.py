"""Grain pipelines: the example order is a pure function of (seed, epoch, position).

The global stream is `perm_epoch(seed)` over the train split, epoch after epoch. Global batch `s`
holds stream positions [s*B, (s+1)*B); process `p` of `P` reads the p-th slice of B/P of them. The
batches are the same whatever the number of processes, and the iterator state (one integer) is
saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import grain
import numpy as np

from bigtrain.data.sources import ArrayDataset

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """Per-channel (last axis) mean and std of the train split."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        axes = tuple(range(x.ndim - 1))
        x64 = x.astype(np.float64)
        std = x64.std(axis=axes)
        return cls(
            x64.mean(axis=axes).astype(np.float32),
            np.where(std > 1e-8, std, 1.0).astype(np.float32),
        )

    @classmethod
    def identity(cls, channels: int) -> Standardizer:
        return cls(np.zeros(channels, np.float32), np.ones(channels, np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def train_dataset(
    ds: ArrayDataset,
    standardize: Standardizer,
    *,
    seed: int,
    global_batch: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """An infinite MapDataset of this process's local train batches {"x", "y"}."""
    local = _local_size(global_batch, process_count)
    x, y = ds.x_train, ds.y_train

    def gather(idx: np.ndarray) -> Batch:  # vectorized: one fancy-index per batch, not per record
        return {"x": standardize(x[idx]), "y": y[idx]}

    order = grain.MapDataset.range(len(x)).shuffle(seed=seed).repeat()
    return order.batch(local)[process_index::process_count].map(gather)


def eval_dataset(
    ds: ArrayDataset,
    standardize: Standardizer,
    *,
    global_batch: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """Every test example exactly once; the last batch is padded and `mask` marks real examples."""
    local = _local_size(global_batch, process_count)
    n = len(ds.x_test)
    padded = math.ceil(n / global_batch) * global_batch
    x, y = ds.x_test, ds.y_test

    def gather(idx: np.ndarray) -> Batch:
        real = idx < n
        safe = np.where(real, idx, 0)
        return {"x": standardize(x[safe]), "y": y[safe], "mask": real.astype(np.float32)}

    return grain.MapDataset.range(padded).batch(local)[process_index::process_count].map(gather)


def iterate(ds: grain.MapDataset, *, threads: int, prefetch: int) -> Iterator[Batch]:
    """A checkpointable iterator (`get_state`/`set_state`) reading ahead on `threads` threads."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def _local_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return global_batch // process_count
