"""Grain pipelines: the example order is a pure function of (seed, epoch, position).

The global stream is `perm_epoch(seed)` over the train split, epoch after epoch. Global batch `s`
holds stream positions [s*B, (s+1)*B); process `p` of `P` reads the p-th slice of B/P of them. The
batches are the same whatever the number of processes, and the iterator state (a position and
the count of skipped bad records) is saved in every checkpoint. Ops (`ops.py`) run on whole
local batches; their randomness is seeded by (seed, global batch index), never by iteration
order or worker.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Protocol

import grain
import numpy as np

from bigtrain.data import ops
from bigtrain.data.records import DataError

log = logging.getLogger(__name__)

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
        return cls.from_moments(x64.mean(axis=axes), x64.std(axis=axes))

    @classmethod
    def from_moments(cls, mean, std) -> Standardizer:
        """A constant channel (std ~ 0) keeps std 1."""
        std = np.asarray(std, np.float64)
        return cls(np.asarray(mean, np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))

    @classmethod
    def identity(cls, channels: int) -> Standardizer:
        return cls(np.zeros(channels, np.float32), np.ones(channels, np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


class ArrayReader:
    """Random access to in-memory arrays, batched by fancy indexing."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def read(self, idx: np.ndarray) -> tuple[Batch, dict[int, str]]:
        return {"x": self.x[idx], "y": self.y[idx]}, {}

    def describe(self, index: int) -> str:
        return f"example {index}"


class Reader(Protocol):
    def __len__(self) -> int: ...

    def read(self, idx: np.ndarray) -> tuple[dict, dict[int, str]]:
        """A batch of records and the rows that could not be decoded, with the reason."""

    def describe(self, index: int) -> str:
        """Where record `index` lives (shard file and position), for error messages."""


def train_dataset(
    reader: Reader,
    chain: ops.Chain | Standardizer,
    *,
    seed: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    strict: bool = False,
) -> grain.MapDataset:
    """An infinite MapDataset of this process's local train batches {"x", "y", "skipped"}."""
    local = _local_size(global_batch, process_count)
    reader, chain = _coerce(reader, chain, "train")
    gather = _Gather(reader, chain, seed, global_batch, local, process_index, strict)
    order = grain.MapDataset.range(len(reader)).shuffle(seed=seed).repeat()
    return order.batch(local)[process_index::process_count].map_with_index(gather)


def eval_dataset(
    reader: Reader,
    chain: ops.Chain | Standardizer,
    *,
    global_batch: int,
    process_index: int,
    process_count: int,
    strict: bool = False,
) -> grain.MapDataset:
    """Every example exactly once; the last batch is padded and `mask` marks real examples."""
    local = _local_size(global_batch, process_count)
    reader, chain = _coerce(reader, chain, "test")
    n = len(reader)
    padded = math.ceil(n / global_batch) * global_batch
    gather = _Gather(reader, chain, 0, global_batch, local, process_index, strict, limit=n)
    order = grain.MapDataset.range(padded).batch(local)[process_index::process_count]
    return order.map_with_index(gather)


def _coerce(reader, chain, split: str) -> tuple[Reader, ops.Chain]:
    """Also takes an in-memory `ArrayDataset` and a `Standardizer`, as the first API did."""
    if hasattr(reader, "x_train"):
        reader = ArrayReader(getattr(reader, f"x_{split}"), getattr(reader, f"y_{split}"))
    if isinstance(chain, Standardizer):
        env = ops.Env(chain.mean, chain.std, num_classes=0, channels=len(chain.mean))
        chain = ops.Chain("standardize", env)
    return reader, chain


class _Gather:
    """Reads one local batch with one batched read and runs the ops on it, vectorized."""

    def __init__(self, reader, chain, seed, global_batch, local, process_index, strict, limit=None):
        self.reader, self.chain, self.seed = reader, chain, seed
        self.global_batch, self.strict, self.limit = global_batch, strict, limit
        self.rows = slice(process_index * local, (process_index + 1) * local)

    def __call__(self, step: int, idx: np.ndarray) -> Batch:
        real = None
        if self.limit is not None:
            real = idx < self.limit
            idx = np.where(real, idx, 0)
        batch, bad = self.reader.read(idx)
        if real is not None:
            batch["mask"] = real.astype(np.float32)
        ctx = ops.Context(self.seed, step, self.rows, self.global_batch, self.chain.env, bad)

        def on_bad(rows: dict[int, str]) -> None:
            for r, why in rows.items():
                where = self.reader.describe(int(idx[r]))
                if self.strict:
                    raise DataError(f"{where}: {why} (data.strict=True stops on bad records)")
                if _warned[0] < 10:
                    _warned[0] += 1
                    log.warning("skipping %s: %s (counted in data/skipped_records)", where, why)

        batch = self.chain(batch, ctx, on_bad)
        batch["skipped"] = np.int64(len(ctx.bad))
        return batch


_warned = [0]


def iterate(ds: grain.MapDataset, *, threads: int, prefetch: int, workers: int = 0) -> SkipCounter:
    """A checkpointable iterator (`get_state`/`set_state`) reading ahead on `threads` threads,
    in `workers` processes if > 0 (0 and N workers give the same batches)."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(options)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults here)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return SkipCounter(iter(it_ds))


class SkipCounter(grain.DatasetIterator):
    """Pops each batch's count of skipped bad records and keeps the running total in its state,
    so the count survives a resume."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped = 0

    def __next__(self) -> Batch:
        batch = next(self._parent)
        self.skipped += int(batch.pop("skipped", 0))
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self.skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = int(state["skipped"])


def auto_workers(requested: int) -> int:
    """-1 = automatic: none on <= 2 cores (workers measured slower there), else cores/2, <= 8."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cores or 1) <= 2 else min(8, cores // 2)


def _local_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    return global_batch // process_count
