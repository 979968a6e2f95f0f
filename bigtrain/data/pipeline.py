"""Grain pipelines: the example order is a pure function of (seed, epoch, position).

The global stream is `perm_epoch(seed)` over the train split, epoch after epoch. Global batch `s`
holds stream positions [s*B, (s+1)*B); process `p` of `P` reads the p-th slice of B/P of them. The
batches are the same whatever the number of processes, and the iterator state (a position and
the count of skipped bad records) is saved in every checkpoint. Ops (`ops.py`) run on whole
local batches; their randomness is seeded by (seed, global batch index), never by iteration
order or worker.

The permutation is computed for a whole batch of positions at once (`stream_indices`, a keyed
bijection: no per-record Python and no O(records) table), so a grain element is a batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
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
_ENDLESS = 2**62  # the train stream's length in batches: endless for any real run


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


# --- the order: a keyed bijection of [0, n) per epoch, evaluated for many positions at once

_ROUNDS = 4


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-mixing hash of uint64s."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def _keys(seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).integers(0, 2**63, _ROUNDS, dtype=np.uint64)


def _permute(x: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, n): a Feistel network on [0, 4^h) >= n, cycle-walked into [0, n)."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    x = x.astype(np.uint64)
    todo = np.ones(x.shape, bool)
    while todo.any():
        left, right = x[todo] >> shift, x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


_TABLE_MAX = 2**24  # epochs of up to this many records are permuted once and kept (<= 128 MiB)


@functools.lru_cache(maxsize=2)
def _epoch_table(n: int, seed: int, epoch: int) -> np.ndarray:
    return _permute(np.arange(n, dtype=np.int64), n, _keys(seed, epoch))


def stream_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """The record indices at train-stream positions [start, start + count)."""
    epoch, within = np.divmod(np.arange(start, start + count, dtype=np.int64), n)
    first, last = int(epoch[0]), int(epoch[-1])
    if n <= _TABLE_MAX and first == last:
        return _epoch_table(n, seed, first)[within]  # the common case: a slice of one epoch
    out = np.empty(count, np.int64)
    for e in range(first, last + 1):
        rows = epoch == e
        if n <= _TABLE_MAX:
            out[rows] = _epoch_table(n, seed, e)[within[rows]]
        else:  # too many records to tabulate: the same bijection, evaluated per batch
            out[rows] = _permute(within[rows], n, _keys(seed, e))
    return out


class _TrainOrder:
    """Global batch s -> this process's record indices in it (a pure function of s)."""

    def __init__(self, n: int, seed: int, global_batch: int, local: int, process_index: int):
        self.n, self.seed, self.global_batch, self.local = n, seed, global_batch, local
        self.offset = process_index * local

    def __call__(self, s: int) -> np.ndarray:
        start = s * self.global_batch + self.offset
        return stream_indices(self.n, self.seed, start, self.local)


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
    order = _TrainOrder(len(reader), seed, global_batch, local, process_index)
    return grain.MapDataset.range(_ENDLESS).map(order).map_with_index(gather)


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
    rows = lambda s: s * global_batch + process_index * local + np.arange(local)
    return grain.MapDataset.range(padded // global_batch).map(rows).map_with_index(gather)


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
        real, padding = None, frozenset()
        if self.limit is not None:
            real = idx < self.limit
            # Padding repeats the global batch's first record, which is always real.
            idx = np.where(real, idx, step * self.global_batch)
            padding = frozenset(np.flatnonzero(~real).tolist())
        batch, bad = self.reader.read(idx)
        if real is not None:
            batch["mask"] = real.astype(np.float32)
        ctx = ops.Context(
            self.seed, step, self.rows, self.global_batch, self.chain.env, bad, padding=padding
        )

        def on_bad(rows: dict[int, str]) -> None:
            for r, why in rows.items():
                where = self.reader.describe(int(idx[r]))
                if self.strict:
                    raise DataError(f"{where}: {why} (data.strict=True stops on bad records)")
                if _warned[0] < 10:
                    _warned[0] += 1
                    log.warning("skipping %s: %s (counted in data/skipped_records)", where, why)

        batch = self.chain(batch, ctx, on_bad)
        batch["skipped"] = np.int64(len(ctx.real_bad()))
        return batch


_warned = [0]


def iterate(
    ds: grain.MapDataset,
    *,
    threads: int,
    prefetch: int,
    workers: int = 0,
    put=None,
    chunk: int = 1,
) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state`/`set_state`) over batches 0, 1, ... of `ds`.

    `put` (e.g. onto the devices) is applied to what is served, on the calling thread. With
    `workers` == 0, reading runs on `threads` threads, `prefetch` chunks ahead; `chunk` > 1
    stacks that many consecutive batches into one transfer (see `Prefetch`). With `workers` >
    0, grain's worker processes read (chunk must be 1). All give the same batches.
    """
    if workers <= 0:
        return Prefetch(ds, threads=threads, depth=prefetch, put=put, chunk=chunk)
    if chunk != 1:
        raise ValueError(f"chunk={chunk} needs workers=0; grain's workers serve single batches")
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults here)
        flags.FLAGS.mark_as_parsed()
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(options)
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return SkipCounter(iter(it_ds), put)


def _unpack(batch: Batch, put) -> tuple[Batch, int]:
    skipped = int(batch.pop("skipped", 0))
    return (put(batch) if put is not None else batch), skipped


def _read_one(ds: grain.MapDataset, s: int) -> Batch:
    """Batch s; a plain function, so the thread pool holds no reference to the iterator."""
    return ds[s]


def _stack(batches: list[Batch]) -> tuple[Batch, np.ndarray]:
    """One batch as it is, or K batches stacked on a leading axis; the skipped counts apart."""
    skipped = np.array([int(b.pop("skipped", 0)) for b in batches])
    if len(batches) == 1:
        return batches[0], skipped
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}, skipped


class Prefetch(grain.DatasetIterator):
    """Batches of a MapDataset in order, read ahead on a thread pool, `put` when served.

    With `chunk` = K > 1 every K consecutive batches travel together: `next` serves, for the
    step that takes batch s, the stacked chunk s // K holding it (the same arrays for K calls),
    and the train step picks row s % K itself. One transfer and no host work then covers K
    steps. The state is the index of the next batch to serve (any s, not only chunk starts)
    plus the running count of skipped bad records: read-ahead is never counted as consumed.
    """

    def __init__(self, ds: grain.MapDataset, *, threads: int, depth: int, put=None, chunk=1):
        super().__init__()
        self._ds, self._put, self._depth, self.chunk = ds, put, max(depth, 1), max(chunk, 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(threads, 1), "bigtrain-input")
        self._queue: collections.deque = collections.deque()  # per chunk _first, ...: its tasks
        self._first = 0  # index of the chunk at the head of the queue
        self._current: tuple | None = None  # (chunk index, arrays, skipped per batch)
        self._next, self.skipped = 0, 0

    def _fill(self) -> None:
        """Queues the next chunks' batches, each its own task: all threads read every chunk."""
        k = self.chunk
        while len(self._queue) < self._depth:
            c = self._first + len(self._queue)
            tasks = [self._pool.submit(_read_one, self._ds, s) for s in range(c * k, (c + 1) * k)]
            self._queue.append(tasks)

    def __next__(self):
        c = self._next // self.chunk
        if self._current is None or self._current[0] != c:
            if self._first != c:  # first call, or after set_state: start reading at chunk c
                self._drop_queue()
                self._first = c
            self._fill()
            arrays, skipped = _stack([t.result() for t in self._queue.popleft()])  # re-raises
            self._first = c + 1
            self._fill()
            # `put` (the transfer) runs here, on the caller's thread, after the reads ahead
            # are queued: one thread owns every transfer.
            arrays = self._put(arrays) if self._put is not None else arrays
            self._current = (c, arrays, skipped)
        self.skipped += int(self._current[2][self._next % self.chunk])
        self._next += 1
        return dict(self._current[1])  # a caller replacing an entry changes only its copy

    def _drop_queue(self) -> None:
        if not self._queue:
            return
        tasks = [t for chunk in self._queue for t in chunk]
        for t in tasks:
            t.cancel()
        concurrent.futures.wait(tasks)
        self._queue.clear()

    def get_state(self) -> dict:
        return {"next_batch": self._next, "skipped": self.skipped}

    def set_state(self, state: dict) -> None:
        self._next, self.skipped = int(state["next_batch"]), int(state["skipped"])
        self._current = None

    def close(self) -> None:
        try:
            self._drop_queue()  # waits for the reads in flight; the threads then exit
            self._pool.shutdown(wait=False, cancel_futures=True)
        except (AttributeError, TypeError):
            return  # called from __del__ at interpreter exit, after modules were torn down


class SkipCounter(grain.DatasetIterator):
    """Pops each batch's count of skipped bad records and keeps the running total in its state,
    so the count survives a resume."""

    def __init__(self, parent: grain.DatasetIterator, put=None):
        super().__init__(parent)
        self.skipped, self._put = 0, put

    def __next__(self) -> Batch:
        batch, skipped = _unpack(next(self._parent), self._put)
        self.skipped += skipped
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
