import numpy as np
import pytest

from bigtrain.config import base
from bigtrain.data import ops, pipeline, sources
from bigtrain.data.pipeline import Standardizer

IDENTITY = ops.Chain("", ops.Env(np.zeros(2, np.float32), np.ones(2, np.float32), 5, 2))


def _dataset(n=50, shape=(6, 2)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = (np.arange(n) % 5).astype(np.int32)
    return sources.ArrayDataset(x, y, x[:23], y[:23], num_classes=5)


def _train(ds, seed=0, batch=8, p=0, count=1):
    return pipeline.train_dataset(
        pipeline.ArrayReader(ds.x_train, ds.y_train),
        IDENTITY,
        seed=seed,
        global_batch=batch,
        process_index=p,
        process_count=count,
    )


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_same_seed_same_batches_and_other_seed_differs():
    ds = _dataset()
    a = _take(pipeline.iterate(_train(ds, seed=1), threads=2, prefetch=2), 10)
    b = _take(pipeline.iterate(_train(ds, seed=1), threads=1, prefetch=0), 10)
    c = _take(pipeline.iterate(_train(ds, seed=2), threads=2, prefetch=2), 10)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u["x"], v["x"])
    assert any(not np.array_equal(u["x"], w["x"]) for u, w in zip(a, c, strict=True))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    ds = _dataset(n=40)
    batches = _take(pipeline.iterate(_train(ds, batch=8), threads=1, prefetch=0), 10)
    ids = np.concatenate([b["y"] * 0 + _row_ids(ds, b["x"]) for b in batches])
    epoch0, epoch1 = ids[:40], ids[40:80]
    assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
    assert not np.array_equal(epoch0, epoch1)


def _row_ids(ds, x):
    flat = ds.x_train.reshape(len(ds.x_train), -1)
    return np.array([int(np.flatnonzero((flat == row.reshape(-1)).all(1))[0]) for row in x])


def test_restored_iterator_continues_with_the_same_batches():
    ds = _dataset()
    it = pipeline.iterate(_train(ds), threads=2, prefetch=4)
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 5)
    fresh = pipeline.iterate(_train(ds), threads=2, prefetch=4)
    fresh.set_state(state)
    for u, v in zip(expected, _take(fresh, 5), strict=True):
        np.testing.assert_array_equal(u["x"], v["x"])
        np.testing.assert_array_equal(u["y"], v["y"])


def test_processes_split_the_global_batch_without_overlap():
    ds = _dataset()
    single = _take(pipeline.iterate(_train(ds, batch=8), threads=1, prefetch=0), 6)
    parts = [
        _take(pipeline.iterate(_train(ds, batch=8, p=p, count=2), threads=1, prefetch=0), 6)
        for p in range(2)
    ]
    for step, whole in enumerate(single):
        joined = np.concatenate([parts[0][step]["x"], parts[1][step]["x"]])
        np.testing.assert_array_equal(whole["x"], joined)


def test_indivisible_batch_over_processes_is_an_error():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        _train(_dataset(), batch=8, count=3)


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_sees_every_example_exactly_once(processes):
    ds = _dataset()  # 23 test examples, global eval batch 8 -> 3 batches, 1 padded row
    seen = []
    for p in range(processes):
        evald = pipeline.eval_dataset(
            pipeline.ArrayReader(ds.x_test, ds.y_test),
            IDENTITY,
            global_batch=8,
            process_index=p,
            process_count=processes,
        )
        for batch in evald:
            assert batch["x"].shape[0] == 8 // processes
            seen.append(batch["x"][batch["mask"] > 0])
    ids = _row_ids(
        sources.ArrayDataset(ds.x_test, ds.y_test, ds.x_test, ds.y_test, 5), np.concatenate(seen)
    )
    assert sorted(ids) == list(range(23))


def test_standardizer_uses_train_statistics_per_channel():
    x = np.stack([np.full((10, 4), 3.0), np.full((10, 4), -1.0)], axis=-1)  # (10, 4, 2)
    x[::2, :, 0] += 2.0
    s = Standardizer.fit(x.astype(np.float32))
    np.testing.assert_allclose(s.mean, [4.0, -1.0])
    np.testing.assert_allclose(s.std, [1.0, 1.0])  # a constant channel keeps std 1
    out = s(x.astype(np.float32))
    np.testing.assert_allclose(out[..., 0].mean(), 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("mnist1d", (40, 1), 10),
        ("digits", (8, 8, 1), 10),
        ("breast_cancer", (30,), 2),
        ("synthetic", (32, 32, 3), 10),
    ],
)
def test_builtin_datasets_have_fixed_splits(name, shape, classes):
    cfg = base().data
    cfg.name = name
    a, b = sources.load(cfg), sources.load(cfg)
    assert a.input_shape == shape and a.num_classes == classes
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert len(a.x_test) > 0 and set(np.unique(a.y_train)) == set(range(classes))


def test_permute_positions_is_one_fixed_permutation():
    cfg = base().data
    cfg.name = "digits"
    plain = sources.load(cfg)
    cfg.permute_positions = True
    shuffled = sources.load(cfg)
    assert not np.array_equal(plain.x_train, shuffled.x_train)
    flat_p = plain.x_train.reshape(len(plain.x_train), -1)
    flat_s = shuffled.x_train.reshape(len(plain.x_train), -1)
    np.testing.assert_array_equal(np.sort(flat_p, 1), np.sort(flat_s, 1))


@pytest.mark.parametrize("depth", [1, 3])
def test_chunks_hold_the_same_batches_and_resume_mid_chunk(depth):
    """chunk=K serves step s the stack of batches [K*(s//K), ...) with batch s at row s % K;
    a state taken mid-chunk restores to the very next batch."""
    ds = _dataset(n=40)
    plain = _take(pipeline.iterate(_train(ds), threads=1, prefetch=0), 14)
    it = pipeline.iterate(_train(ds), threads=2, prefetch=depth, chunk=4)
    served = _take(it, 6)
    for s, chunk in enumerate(served):
        assert chunk["x"].shape == (4, 8, 6, 2)
        np.testing.assert_array_equal(chunk["x"][s % 4], plain[s]["x"])
        np.testing.assert_array_equal(chunk["y"][s % 4], plain[s]["y"])
    fresh = pipeline.iterate(_train(ds), threads=2, prefetch=depth, chunk=4)
    fresh.set_state(it.get_state())
    for s, chunk in enumerate(_take(fresh, 8), start=6):
        np.testing.assert_array_equal(chunk["x"][s % 4], plain[s]["x"])


def test_stream_order_is_a_permutation_for_any_size():
    for n in [1, 2, 3, 7, 64, 1000, 4099]:
        for epoch in range(2):
            ids = pipeline.stream_indices(n, 5, epoch * n, n)
            assert sorted(ids.tolist()) == list(range(n)), n
    # Past the table size the same bijection is evaluated per batch: the same order.
    table = pipeline.stream_indices(1000, 5, 300, 1500)
    limit, pipeline._TABLE_MAX = pipeline._TABLE_MAX, 10
    try:
        np.testing.assert_array_equal(pipeline.stream_indices(1000, 5, 300, 1500), table)
    finally:
        pipeline._TABLE_MAX = limit


def test_eval_padding_never_reads_or_reports_a_bad_record_0():
    """7 records over 2 processes, eval batch 4: process 1's rows of the last batch are all
    padding. A damaged record 0 is reported once (where it is real) and nowhere else."""

    class Damaged0(pipeline.ArrayReader):
        def read(self, idx):
            batch, _ = super().read(idx)
            return batch, {r: "damaged" for r, i in enumerate(idx) if i == 0}

    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    reader = Damaged0(x, np.zeros(7, np.int32))
    skipped, masks = 0, []
    for p in range(2):
        for b in pipeline.eval_dataset(
            reader, IDENTITY, global_batch=4, process_index=p, process_count=2
        ):
            skipped += int(b["skipped"])
            masks.append(b["mask"].tolist())
    assert skipped == 1
    assert masks == [[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
