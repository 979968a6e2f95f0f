"""Preprocessing ops: parsing, shapes, values and determinism across process counts."""

import io

import numpy as np
import pytest

from bigtrain.data import ops
from bigtrain.data.records import DataError

ENV = ops.Env(np.array([1.0, 2.0, 3.0], np.float32), np.array([2.0, 2.0, 2.0], np.float32), 4)


def _ctx(step=0, rows=slice(0, 8), global_batch=8, seed=0):
    return ops.Context(seed, step, rows, global_batch, ENV)


def _run(spec, batch, **kw):
    reported = {}
    out = ops.Chain(spec, ENV)(batch, _ctx(**kw), reported.update)
    return out, reported


def _images(n=8, size=(8, 8)):
    rng = np.random.default_rng(0)
    return {"x": rng.uniform(0, 255, (n, *size, 3)).astype(np.float32), "y": np.arange(n) % 4}


def test_unknown_op_lists_the_known_ones_and_bad_arguments_name_the_signature():
    with pytest.raises(DataError, match="unknown op 'flip'.*flip_lr.*random_crop"):
        ops.parse("resize(4)|flip")
    with pytest.raises(DataError, match=r"random_crop\(\*size"):
        ops.parse("random_crop(4, bogus=1)")
    with pytest.raises(DataError, match="cannot parse"):
        ops.parse("resize(4")
    assert [t for t, _ in ops.parse(" decode | resize(32) |flip_lr ")] == [
        "decode",
        "resize(32)",
        "flip_lr",
    ]


def test_random_ops_are_a_function_of_seed_and_step_and_agree_across_processes():
    spec = "random_crop(6, pad=1)|flip_lr|mixup(0.4)|cutmix"
    batch = _images()
    a, _ = _run(spec, batch, step=3)
    b, _ = _run(spec, batch, step=3)
    c, _ = _run(spec, batch, step=4)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    whole, _ = _run(spec, batch, step=3)
    halves = [
        _run(
            spec,
            {k: v[h * 4 : (h + 1) * 4] for k, v in batch.items()},
            rows=slice(h * 4, h * 4 + 4),
            step=3,
        )[0]
        for h in range(2)
    ]
    for key in ("x", "y"):  # mixup/cutmix pairs and ratios too: the same on 1 or 2 processes
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))


def test_resize_crop_flip_standardize_values():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1).repeat(3, -1)
    batch = {"x": x, "y": np.array([0])}
    same, _ = _run("resize(4)", batch, global_batch=1, rows=slice(0, 1))
    np.testing.assert_array_equal(same["x"], x)
    half, _ = _run("resize(2)", batch, global_batch=1, rows=slice(0, 1))
    np.testing.assert_allclose(half["x"][0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    center, _ = _run("center_crop(2)", batch, global_batch=1, rows=slice(0, 1))
    np.testing.assert_array_equal(center["x"][0, :, :, 0], [[5, 6], [9, 10]])
    flipped, _ = _run("flip_lr(1.0)", batch, global_batch=1, rows=slice(0, 1))
    np.testing.assert_array_equal(flipped["x"][0, 0, :, 0], [3, 2, 1, 0])
    std, _ = _run("standardize", batch, global_batch=1, rows=slice(0, 1))
    np.testing.assert_allclose(std["x"][0, 0, 0], (0 - ENV.mean) / ENV.std)
    assert std["x"].dtype == np.float32 and std["y"].dtype == np.int32


def test_soft_label_ops_keep_probabilities():
    out, _ = _run("onehot|mixup(0.5)", _images())
    assert out["y"].shape == (8, 4)
    np.testing.assert_allclose(out["y"].sum(1), 1.0, rtol=1e-6)
    out, _ = _run("cutmix(1.0)", _images())
    np.testing.assert_allclose(out["y"].sum(1), 1.0, rtol=1e-6)
    assert out["x"].shape == (8, 8, 8, 3)


def test_volume_slices_and_3d_crops():
    x = np.random.default_rng(0).standard_normal((4, 5, 6, 7, 1)).astype(np.float32)
    batch = {"x": x, "y": np.zeros(4, np.int64)}
    kw = dict(global_batch=4, rows=slice(0, 4))
    center, _ = _run("center_slice(axis=0)", batch, **kw)
    np.testing.assert_array_equal(center["x"], x[:, 2])
    rand, _ = _run("random_slice(axis=2)", batch, **kw)
    assert rand["x"].shape == (4, 5, 6, 1)
    assert all(
        any(np.array_equal(r, x[i, :, :, k]) for k in range(7)) for i, r in enumerate(rand["x"])
    )
    crop, _ = _run("random_crop(3, 4, 5)", batch, **kw)
    assert crop["x"].shape == (4, 3, 4, 5, 1)
    with pytest.raises(DataError, match="volumes"):
        _run("random_slice", _images())


def test_decode_resize_and_bad_images_are_replaced_and_reported():
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for size in [(6, 5), (9, 7), (6, 5), (6, 5)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    blobs[2] = b"garbage"
    batch = {"x": blobs, "y": np.array([0, 1, 2, 3])}
    out, bad = _run("decode|resize(4, 3)", batch, global_batch=4, rows=slice(0, 4))
    assert out["x"].shape == (4, 4, 3, 3) and list(bad) == [2]
    np.testing.assert_array_equal(out["x"][2], out["x"][3])  # replaced by the next good row
    assert out["y"].tolist() == [0, 1, 3, 3]
    mixed, bad = _run(
        "decode|standardize", {"x": blobs, "y": np.arange(4)}, global_batch=4, rows=slice(0, 4)
    )
    assert sorted(bad) == [1, 2] and "shape" in bad[1]  # the odd size is skipped too


def test_mixing_ops_never_mix_in_a_bad_row_and_flip_needs_a_spatial_axis():
    rng = np.random.default_rng(0)
    x = [rng.uniform(0, 1, (4, 4, 3)).astype(np.float32) for _ in range(4)]
    x[0] = np.ones((5, 4, 3), np.float32)  # the odd shape: marked bad when the batch is stacked
    batch = {"x": x, "y": np.arange(4)}
    for spec in ("mixup(1.0)", "cutmix(1.0)"):
        out, bad = _run(spec, batch, global_batch=4, rows=slice(0, 4))
        assert list(bad) == [0]
        # Row 0 was replaced by row 1 before mixing: rows 0 and 1 hold the same pair, and no
        # row's label has any weight on class 0 (the bad record's).
        np.testing.assert_array_equal(out["x"][0], out["x"][1])
        assert (out["y"][:, 0] == 0).all(), spec
    with pytest.raises(DataError, match="flip_lr mirrors a spatial axis"):
        _run("flip_lr", {"x": np.ones((8, 3), np.float32), "y": np.arange(8) % 4})
    for spec in ("flip_lr", "resize(4)|standardize"):
        with pytest.raises(DataError, match="start data.pp and data.pp_eval with decode"):
            _run(spec, {"x": [b"png bytes"] * 8, "y": np.arange(8) % 4})
    with pytest.raises(DataError, match="2 axes"):
        _run("random_crop(3, 3)", {"x": np.ones((8, 5, 5, 5, 1), np.float32), "y": np.zeros(8)})
