"""Training input from converted shards: round trip, hosts, workers, resume, bad records."""

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

import bigtrain
from bigtrain import sharding
from bigtrain.config import ConfigError, base, validate
from bigtrain.data import build, convert, ops, pipeline, sources
from bigtrain.data.records import DataError


def _source(tmp_path, n, seed=0, k=4):
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((k, 6, 2)).astype(np.float32)
    y = rng.integers(0, k, n)
    x = (0.5 * templates[y] + rng.standard_normal((n, 6, 2))).astype(np.float32)
    np.savez(tmp_path / "src.npz", x=x, y=y)
    return x, y


def _config(dst, **data):
    c = base()
    c.data.name = "arrayrecord"
    c.data.path = str(dst)
    for k, v in data.items():
        c.data[k] = v
    c.batch_size, c.eval_batch_size = 16, 24
    return c


def _ids(x_all, x):
    index = {row.tobytes(): i for i, row in enumerate(x_all)}
    return [index[row.tobytes()] for row in x]


def _chain(ds, spec="standardize"):
    stats = ds.statistics()
    return ops.Chain(spec, ops.Env(stats.mean, stats.std, ds.num_classes, ds.channels))


def test_round_trip_through_build_reads_the_same_values(tmp_path):
    x, y = _source(tmp_path, 300)
    m = convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0.2)
    config = _config(tmp_path / "dst", standardize=False)
    config.mesh.data = 1  # one device: small batches then travel many to a transfer (chunk)
    data = build(config, sharding.make_mesh(config.mesh))
    assert data.input_shape == (6, 2) and data.num_classes == 4
    assert (data.num_train, data.num_test) == (
        m["splits"]["train"]["records"],
        len(x) - data.num_train,
    )
    seen = []
    for batch in data.eval_batches():
        xb, mask = np.asarray(batch["x"]), np.asarray(batch["mask"])
        ids = _ids(x, xb[mask > 0])
        np.testing.assert_array_equal(np.asarray(batch["y"])[mask > 0], y[ids])
        seen += ids
    assert len(seen) == data.num_test == len(set(seen))
    steps = data.num_train // 16
    assert data.chunk > 1  # small batches travel many to a transfer; row s % chunk is step s's
    served = [np.asarray(data.next_train()["x"])[s % data.chunk] for s in range(steps)]
    train_ids = [i for xb in served for i in _ids(x, xb)]
    assert len(set(train_ids)) == steps * 16 and not set(train_ids) & set(seen)
    assert data.skipped_records == 0


def test_uneven_records_over_two_processes(tmp_path):
    _source(tmp_path, 103)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0)
    ds = sources.load(_config(tmp_path / "dst").data)
    train, test = ds.readers()
    assert len(train) == 103  # not a multiple of the batch or of the processes

    def batches(p, count, steps=30):
        chain = _chain(ds, "random_crop(4, pad=1)|flip_lr|standardize")
        d = pipeline.train_dataset(
            train, chain, seed=1, global_batch=8, process_index=p, process_count=count
        )
        it = pipeline.iterate(d, threads=1, prefetch=0)
        return [next(it)["x"] for _ in range(steps)]

    single, parts = batches(0, 1), [batches(p, 2) for p in range(2)]
    for step, whole in enumerate(single):  # every process gets every step: nothing hangs
        np.testing.assert_array_equal(whole, np.concatenate([parts[0][step], parts[1][step]]))
    plain = pipeline.train_dataset(
        train, _chain(ds), seed=1, global_batch=8, process_index=0, process_count=1
    )
    first_epoch = np.concatenate([plain[s]["x"] for s in range(13)])[:103]
    assert len({row.tobytes() for row in first_epoch}) == 103  # no example twice in an epoch
    rows = 0
    for p in range(2):
        for b in pipeline.eval_dataset(
            train, _chain(ds), global_batch=8, process_index=p, process_count=2
        ):
            rows += int(b["mask"].sum())
    assert rows == 103


def test_workers_and_resume_give_the_same_augmented_batches(tmp_path):
    _source(tmp_path, 200)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0)
    ds = sources.load(_config(tmp_path / "dst").data)
    train, _ = ds.readers()
    chain = _chain(ds, "random_crop(4, pad=1)|flip_lr|standardize")
    d = pipeline.train_dataset(
        train, chain, seed=3, global_batch=8, process_index=0, process_count=1
    )
    plain = pipeline.iterate(d, threads=2, prefetch=2)
    expected = [next(plain) for _ in range(6)]
    workers = pipeline.iterate(d, threads=1, prefetch=1, workers=2)
    try:
        for e in expected:
            got = next(workers)
            np.testing.assert_array_equal(e["x"], got["x"])
            np.testing.assert_array_equal(e["y"], got["y"])
    finally:
        workers.close()
    it = pipeline.iterate(d, threads=2, prefetch=2)
    [next(it) for _ in range(3)]
    fresh = pipeline.iterate(d, threads=2, prefetch=2)
    fresh.set_state(it.get_state())
    for e in expected[3:]:
        np.testing.assert_array_equal(e["x"], next(fresh)["x"])


def _corrupt(path, position):
    """Rewrites a shard with record `position` cut short, as a bad disk or writer would."""
    reader = ArrayRecordReader(str(path))
    blobs = reader.read(list(range(reader.num_records())))
    reader.close()
    writer = ArrayRecordWriter(str(path), "group_size:1,uncompressed")
    for i, blob in enumerate(blobs):
        writer.write(blob[:-3] if i == position else blob)
    writer.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_record_mid_stream_is_skipped_and_counted(tmp_path, workers):
    _source(tmp_path, 64)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0, shard_size=40)
    _corrupt(tmp_path / "dst" / "train-00001.array_record", 2)  # global record 42
    ds = sources.load(_config(tmp_path / "dst").data)
    train, _ = ds.readers()
    d = pipeline.train_dataset(
        train, _chain(ds), seed=0, global_batch=8, process_index=0, process_count=1
    )
    it = pipeline.iterate(d, threads=1, prefetch=1, workers=workers)
    try:
        epoch = [next(it) for _ in range(8)]  # 64 records: record 42 comes exactly once
        assert it.skipped == 1 and all(b["x"].shape == (8, 6, 2) for b in epoch)
        assert it.get_state()["skipped"] == 1  # saved with the checkpoint
    finally:
        it.close()
    strict = pipeline.train_dataset(
        train, _chain(ds), seed=0, global_batch=8, process_index=0, process_count=1, strict=True
    )
    with pytest.raises(DataError, match=r"train-00001.array_record record 2: record is 49 bytes"):
        for step in range(8):
            strict[step]


def test_skipped_records_are_logged_as_of_their_step(tmp_path, tiny_config):
    import json

    _source(tmp_path, 64)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0.2, shard_size=20)
    _corrupt(tmp_path / "dst" / "train-00001.array_record", 2)  # train record 22
    c = tiny_config
    c.data.name, c.data.path, c.data.pp, c.data.pp_eval = (
        "arrayrecord",
        str(tmp_path / "dst"),
        "",
        "",
    )
    c.mesh.data, c.data.chunk, c.batch_size = 1, 4, 8
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 1, 0, 0
    bigtrain.run(c, tmp_path / "run")
    n = len(sources.load(c.data).readers()[0])
    hits = [22 in pipeline.stream_indices(n, c.seed, s * 8, 8) for s in range(20)]
    expected = np.cumsum(hits).tolist()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r["data/skipped_records"] for r in rows if "train/loss" in r]
    assert logged == expected and expected[-1] >= 2


def test_a_record_damaged_on_disk_is_skipped_naming_its_shard(tmp_path):
    """A flipped byte inside a record fails ArrayRecord's checksum on read: that record is
    skipped and counted, the rest of its batch is read."""
    x, _ = _source(tmp_path, 64)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0, shard_size=40)
    path = tmp_path / "dst" / "train-00001.array_record"
    reader = ArrayRecordReader(str(path))
    blob = reader.read([2])[0]
    reader.close()
    data = bytearray(path.read_bytes())
    at = data.find(blob)
    assert at > 0 and data.count(blob) == 1
    data[at + len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ds = sources.load(_config(tmp_path / "dst").data)
    train, _ = ds.readers()
    batch, bad = train.read(np.arange(64))
    assert list(bad) == [42] and "unreadable" in bad[42]
    np.testing.assert_array_equal(batch["x"][43], x[43])  # val_fraction=0 keeps source order
    d = pipeline.train_dataset(
        train, _chain(ds), seed=0, global_batch=8, process_index=0, process_count=1
    )
    it = pipeline.iterate(d, threads=1, prefetch=1)
    [next(it) for _ in range(8)]
    assert it.skipped == 1


@pytest.mark.parametrize("mix", ["", "|mixup(0.4)"])
def test_training_from_converted_shards_learns(tmp_path, tiny_config, mix):
    """Also with mixup: soft labels (B, K) train through the same losses and step."""
    _source(tmp_path, 600)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0.15)
    c = tiny_config
    c.data.name, c.data.path = "arrayrecord", str(tmp_path / "dst")
    c.data.pp = "random_crop(6, pad=1)|standardize" + mix
    c.data.pp_eval = "standardize"
    final = bigtrain.run(c, tmp_path / "run")
    assert final["eval/accuracy"] > 0.5  # 4 classes
    assert final["eval/count"] == 600 - len(sources.load(c.data).readers()[0])


def test_training_with_worker_processes_resumes_to_the_run_without_them(tmp_path, tiny_config):
    """data.workers=2 (grain's mp_prefetch, the default on hosts with > 2 cores) trains the
    same batches as the threads path, and its iterator state resumes mid-epoch exactly."""
    from bigtrain import checkpoint
    from tests.e2e.resume_test import _assert_bitwise_equal

    _source(tmp_path, 300)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0.15)
    c = tiny_config
    c.data.name, c.data.path = "arrayrecord", str(tmp_path / "dst")
    c.data.pp, c.data.pp_eval = "random_crop(4, pad=1)|flip_lr|standardize", "center_crop(4)"
    c.mesh.data, c.total_steps, c.checkpoint_every, c.eval_every = 1, 16, 0, 0
    c.data.workers = 0
    bigtrain.run(c, tmp_path / "threads")
    c.data.workers = 2
    bigtrain.run(c, tmp_path / "workers", stop_at_step=11)  # ~8 steps an epoch: mid epoch 2
    final = bigtrain.run(c, tmp_path / "workers")
    assert final["data/skipped_records"] == 0
    _assert_bitwise_equal(
        checkpoint.load_arrays(tmp_path / "threads" / "ckpt"),
        checkpoint.load_arrays(tmp_path / "workers" / "ckpt"),
    )


def test_config_and_build_errors_name_the_fix(tmp_path):
    c = _config(tmp_path / "nowhere", pp="resize(8)|flipp")
    with pytest.raises(ConfigError, match="unknown op 'flipp'"):
        validate(c)
    c.data.pp = ""
    with pytest.raises(DataError, match="convert the data first"):
        build(c, sharding.make_mesh(c.mesh))
    _source(tmp_path, 50)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0)
    c.data.path = str(tmp_path / "dst")
    with pytest.raises(DataError, match="no val records"):
        build(c, sharding.make_mesh(c.mesh))
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0.3, overwrite=True)
    c.data.pp = "onehot(7)|standardize"
    with pytest.raises(DataError, match="labels of 7 classes but the dataset has 4"):
        build(c, sharding.make_mesh(c.mesh))
    c.data.pp, c.data.pp_eval = "random_crop(4)", "standardize"
    with pytest.raises(DataError, match="center_crop"):
        build(c, sharding.make_mesh(c.mesh))
