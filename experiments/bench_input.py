"""Input pipeline speed: raw ArrayRecord reads vs the full pipeline, and vs what training eats.

    python experiments/bench_input.py                 # 8192 CIFAR-sized uint8 images, batch 64
    python experiments/bench_input.py --steps 0       # pipeline rows only, no training

Converts synthetic 32x32x3 uint8 images once, then measures in one run:
  1. raw batched reads (shuffled, no decoding): bigtrain's `RecordReader.read_blobs` (one C++
     call per shard) and grain's `ArrayRecordDataSource.__getitems__` for reference,
  2. the full train pipeline (batched read + decode + random_crop(pad=4) + flip + standardize)
     with 0, 1 and 2 worker processes,
  3. training with configs/resnet.py and configs/vit.py on the same shards: examples/s and the
     fraction of each step spent waiting for data (`perf/data_wait_frac`, logged by train.py).
The goal is pipeline rate >= 3x training consumption and data wait < 2%.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
PP = "random_crop(32, pad=4)|flip_lr|standardize"


def make_shards(root: pathlib.Path, n: int) -> pathlib.Path:
    from bigtrain.data import convert

    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, (10, 32, 32, 3))
    y = rng.integers(0, 10, n)
    x = np.clip(0.5 * templates[y] + rng.normal(64, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(root / "src.npz", x=x, y=y)
    convert.convert(root / "src.npz", root / "shards", val_fraction=0.1, shard_size=2048)
    return root / "shards"


def raw_reads(shards: pathlib.Path, batch: int, batches: int, via_grain: bool = False) -> float:
    """Shuffled batched reads of undecoded records: bigtrain's reader, or grain's data source."""
    import grain

    from bigtrain.config import base
    from bigtrain.data import sources

    cfg = base().data
    cfg.name, cfg.path = "arrayrecord", str(shards)
    reader, _ = sources.load(cfg).readers()
    if via_grain:
        source = grain.sources.ArrayRecordDataSource(reader.paths)
        read = lambda idx: source.__getitems__(idx.tolist())
    else:
        read = reader.read_blobs
    order = np.random.default_rng(0).permutation(len(reader))
    for shard in range(len(reader.paths)):  # open every shard's reader
        read(order[reader.starts[shard] : reader.starts[shard] + 1])
    t0 = time.perf_counter()
    for b in range(batches):
        lo = (b * batch) % (len(order) - batch)
        read(order[lo : lo + batch])
    return batches * batch / (time.perf_counter() - t0)


def pipeline_rate(shards: pathlib.Path, batch: int, batches: int, workers: int) -> float:
    from bigtrain.config import base
    from bigtrain.data import ops, pipeline, sources

    cfg = base().data
    cfg.name, cfg.path = "arrayrecord", str(shards)
    ds = sources.load(cfg)
    stats = ds.statistics()
    chain = ops.Chain(PP, ops.Env(stats.mean, stats.std, ds.num_classes, ds.channels))
    train, _ = ds.readers()
    d = pipeline.train_dataset(
        train, chain, seed=0, global_batch=batch, process_index=0, process_count=1
    )
    it = pipeline.iterate(d, threads=cfg.read_threads, prefetch=cfg.prefetch, workers=workers)
    try:
        for _ in range(5):  # warm up: worker start, readers opened
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch / (time.perf_counter() - t0)
    finally:
        it.close()


def training(config_file: str, shards: pathlib.Path, steps: int, workdir: pathlib.Path) -> dict:
    import bigtrain

    overrides = [
        "data.name=arrayrecord",
        f"data.path={shards}",
        f"data.pp={PP}",
        "data.pp_eval=standardize",
        f"total_steps={steps}",
        "log_every=10",
        "eval_every=0",
        "checkpoint_every=0",
    ]
    config = bigtrain.load_config(str(REPO / config_file), overrides)
    bigtrain.run(config, workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/examples_per_sec" in r][1:]  # the first row has compile
    median = lambda key: (
        statistics.median(r[key] for r in rows) if rows and key in rows[0] else None
    )
    return {
        "examples_per_sec": median("perf/examples_per_sec"),
        "data_wait_frac": median("perf/data_wait_frac"),
        "batch": config.batch_size,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--steps", type=int, default=60, help="training steps per model; 0 = skip")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shards = make_shards(tmp, a.records)
        raw = raw_reads(shards, a.batch, a.batches)
        print(f"| what (batch {a.batch}, 32x32x3 uint8) | records/s | vs raw reads |")
        print("|---|---|---|")
        print(f"| raw batched ArrayRecord reads | {raw:,.0f} | 1.00 |")
        grain_raw = raw_reads(shards, a.batch, a.batches, via_grain=True)
        print(
            f"| same, via grain's ArrayRecordDataSource | {grain_raw:,.0f} "
            f"| {grain_raw / raw:.2f} |"
        )
        rates = {}
        for w in (0, 1, 2):
            rates[w] = pipeline_rate(shards, a.batch, a.batches, w)
            print(f"| full pipeline, {w} workers | {rates[w]:,.0f} | {rates[w] / raw:.2f} |")
        if not a.steps:
            return
        best = max(rates.values())
        print()
        print("| training config | train examples/s | pipeline / training | data wait |")
        print("|---|---|---|---|")
        for cfg in ("configs/resnet.py", "configs/vit.py"):
            r = training(cfg, shards, a.steps, tmp / pathlib.Path(cfg).stem)
            wait = "n/a" if r["data_wait_frac"] is None else f"{100 * r['data_wait_frac']:.2f}%"
            ratio = best / r["examples_per_sec"]
            print(f"| {cfg} (batch {r['batch']}) | {r['examples_per_sec']:,.0f} | {ratio:.1f}x "
                  f"| {wait} |")  # fmt: skip


if __name__ == "__main__":
    main()
