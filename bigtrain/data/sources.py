"""Datasets: built-in offline ones with fixed train/test splits (no downloads), and converted
ArrayRecord shards (`arrayrecord`, see `convert.py`) read in batches from disk."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from bigtrain.data import records
from bigtrain.data.pipeline import ArrayReader, Standardizer
from bigtrain.data.records import DataError


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """In-memory splits; inputs are float32 and channels-last, labels int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def readers(self) -> tuple[ArrayReader, ArrayReader]:
        return ArrayReader(self.x_train, self.y_train), ArrayReader(self.x_test, self.y_test)

    def statistics(self) -> Standardizer:
        return Standardizer.fit(self.x_train)

    @property
    def channels(self) -> int:
        return self.input_shape[-1]


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("BIGTRAIN_CACHE", pathlib.Path.home() / ".cache" / "bigtrain")
    return pathlib.Path(root)


@functools.cache
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """Generates MNIST-1D with the paper's default arguments (cached: generation takes ~4 s)."""
    from mnist1d.data import get_dataset_args, make_dataset

    path = _cache_dir() / "mnist1d-default-v1.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return dict(f)
        except (OSError, ValueError):
            pass  # a corrupt cache is regenerated below
    d = make_dataset(get_dataset_args())
    arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def mnist1d(cfg: ConfigDict) -> ArrayDataset:
    d = _mnist1d_arrays()
    f32 = lambda a: a.astype(np.float32)[..., None]  # (N, 40) -> (N, 40, 1): length, channels
    return ArrayDataset(
        f32(d["x"]),
        d["y"].astype(np.int32),
        f32(d["x_test"]),
        d["y_test"].astype(np.int32),
        num_classes=10,
    )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, num_classes: int) -> ArrayDataset:
    """A fixed split: the same permutation (seed 0) on every machine, whatever the run's seed."""
    order = np.random.default_rng(0).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x, y = x.astype(np.float32), y.astype(np.int32)
    return ArrayDataset(x[train], y[train], x[test], y[test], num_classes)


def digits(cfg: ConfigDict) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(d.images[..., None], d.target, 0.2, num_classes=10)  # (N, 8, 8, 1)


def breast_cancer(cfg: ConfigDict) -> ArrayDataset:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return _split(d.data, d.target, 0.2, num_classes=2)  # (N, 30)


def synthetic(cfg: ConfigDict) -> ArrayDataset:
    """Any shape: each class is a fixed random template, each example a template plus noise.

    Learnable by every model family (dense, conv, attention), so loss curves mean something.
    """
    rng = np.random.default_rng(1234)
    shape, k, n = tuple(cfg.synthetic_shape), cfg.synthetic_classes, cfg.synthetic_size
    n_test = max(n // 8, 1)
    templates = rng.standard_normal((k, *shape), dtype=np.float32)
    y = rng.integers(0, k, n + n_test).astype(np.int32)
    x = 0.5 * templates[y] + rng.standard_normal((n + n_test, *shape), dtype=np.float32)
    return ArrayDataset(x[:n], y[:n], x[n:], y[n:], num_classes=k)


class RecordReader:
    """Batched random access to one split's shards; decodes a batch with one `np.frombuffer`.

    Reads each shard's rows of a batch with one call into ArrayRecord's C++ reader. (grain's
    `ArrayRecordDataSource.__getitems__` starts a Python thread pool per call: 1.8x slower
    on a 64-record batch of 3 KiB records, measured in experiments/bench_input.py's setting.)
    """

    def __init__(self, root: pathlib.Path, split: dict, layout: records.Layout, limit: int = 0):
        self.shards = split["shards"]
        self.paths = [str(root / s["file"]) for s in self.shards]
        self.starts = np.cumsum([0] + [s["records"] for s in self.shards])
        self.layout = layout
        self.size = min(limit, int(self.starts[-1])) if limit else int(self.starts[-1])
        self._readers: dict[int, Any] = {}  # opened lazily, in each worker process

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def _reader(self, shard: int):
        if shard not in self._readers:
            from array_record.python.array_record_module import ArrayRecordReader

            path, expected = self.paths[shard], self.shards[shard]["records"]
            fix = "restore it or convert the source again (python -m bigtrain.data.convert "
            if not os.path.isfile(path):
                raise DataError(f"shard {path} is missing; {fix}SRC DST --overwrite)")
            reader = ArrayRecordReader(path, "readahead_buffer_size:0")
            if not reader.ok():
                raise DataError(f"shard {path} is damaged (truncated?); {fix}SRC DST --overwrite)")
            found = reader.num_records()
            if found != expected:
                raise DataError(
                    f"shard {path} holds {found} records but its manifest says {expected}; it "
                    "was changed after conversion: convert the source again (--overwrite)"
                )
            self._readers.setdefault(shard, reader)  # two threads may race here; one wins
        return self._readers[shard]

    def read_blobs(self, idx: np.ndarray) -> tuple[list[bytes], dict[int, str]]:
        """The undecoded records at `idx`, in order, and the rows that could not be read (a
        record whose checksum fails: the shard was damaged after conversion), with why."""
        idx = np.asarray(idx, np.int64)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        blobs: list[bytes] = [b""] * len(idx)
        bad: dict[int, str] = {}
        for s in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == s)
            positions = (idx[rows] - self.starts[s]).tolist()
            reader = self._reader(s)
            try:
                got = reader.read(positions)
            except RuntimeError:  # one damaged record fails the whole call: read one by one
                got = []
                for r, pos in zip(rows.tolist(), positions, strict=True):
                    try:
                        got.append(reader.read([pos])[0])
                    except RuntimeError as e:
                        got.append(b"")
                        bad[r] = f"unreadable ({str(e)[:120]}); the shard changed after conversion"
            for r, blob in zip(rows.tolist(), got, strict=True):
                blobs[r] = blob
        return blobs, bad

    def read(self, idx: np.ndarray) -> tuple[dict, dict[int, str]]:
        blobs, unreadable = self.read_blobs(idx)
        batch, bad = self.layout.decode(blobs)
        bad.update(unreadable)  # the read error is the reason, not the empty placeholder
        return {"x": batch["x"], "y": batch["y"]}, bad  # segmentation is not trained on yet

    def describe(self, index: int) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.paths[shard]} record {index - int(self.starts[shard])}"


@dataclasses.dataclass(frozen=True)
class RecordDataset:
    """A converted dataset: `train` and `val` shards and the manifest's statistics."""

    root: pathlib.Path
    manifest: dict
    num_train: int = 0  # 0 = every train record

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"] or 0)

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return tuple(self.manifest["features"]["x"]["shape"])

    @property
    def channels(self) -> int:
        return int(self.input_shape[-1] or 1) if self.input_shape else 1

    def readers(self) -> tuple[RecordReader, RecordReader]:
        layout = records.Layout(self.manifest["features"])
        splits = self.manifest["splits"]
        return (
            RecordReader(self.root, splits["train"], layout, self.num_train),
            RecordReader(self.root, splits["val"], layout),
        )

    def statistics(self) -> Standardizer:
        stats = self.manifest["stats"]
        return Standardizer.from_moments(stats["mean"], stats["std"])


def arrayrecord(cfg: ConfigDict) -> RecordDataset:
    """Shards written by `python -m bigtrain.data.convert SRC DST`, with `data.path = DST`."""
    if not cfg.path:
        raise DataError("data.name='arrayrecord' needs data.path: the convert command's DST")
    root = pathlib.Path(cfg.path)
    manifest = records.read_manifest(root)
    features = manifest["features"]
    if "y" not in features:
        raise DataError(
            f"{root} has no class labels 'y' (it holds {sorted(features)}); training on "
            "segmentation masks alone is not supported yet"
        )
    if not manifest["splits"]["train"]["records"]:
        raise DataError(f"{root} has no train records; see {root / records.REPORT}")
    return RecordDataset(root, manifest, cfg.num_train)


DATASETS = {
    "mnist1d": mnist1d,
    "digits": digits,
    "breast_cancer": breast_cancer,
    "synthetic": synthetic,
    "arrayrecord": arrayrecord,
}


def load(cfg: ConfigDict) -> ArrayDataset | RecordDataset:
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(DATASETS))}")
    ds = DATASETS[cfg.name](cfg)
    if isinstance(ds, RecordDataset):
        if cfg.permute_positions:
            raise DataError("data.permute_positions works on built-in datasets, not arrayrecord")
        return ds
    if cfg.num_train:
        ds = dataclasses.replace(
            ds, x_train=ds.x_train[: cfg.num_train], y_train=ds.y_train[: cfg.num_train]
        )
    if cfg.permute_positions:
        ds = _permute_positions(ds)
    return ds


def _permute_positions(ds: ArrayDataset) -> ArrayDataset:
    """One fixed permutation of the spatial positions, the same for every example and split."""
    spatial = ds.input_shape[:-1] if len(ds.input_shape) > 1 else ds.input_shape
    perm = np.random.default_rng(0).permutation(int(np.prod(spatial)))

    def apply(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), len(perm), -1)
        return flat[:, perm].reshape(x.shape)

    return dataclasses.replace(ds, x_train=apply(ds.x_train), x_test=apply(ds.x_test))
