"""The converter: round trip, every cleaning rule, strict mode, kill + resume, DICOM and NIfTI."""

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from bigtrain.data import convert, records
from bigtrain.data.records import DataError, Layout
from bigtrain.data.sources import RecordReader


def _read_split(dst, split):
    manifest = records.read_manifest(dst)
    reader = RecordReader(dst, manifest["splits"][split], Layout(manifest["features"]))
    if not len(reader):
        return {}, {}
    batch, bad = reader.read(np.arange(len(reader)))
    assert not bad
    return batch, manifest


def _rows(batch):
    return {(row.tobytes(), int(y)) for row, y in zip(batch["x"], batch["y"], strict=True)}


def _arrays(tmp_path, n=500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6, 2)).astype(np.float32)
    y = rng.integers(0, 5, n)
    return x, y


def test_round_trip_keeps_every_value_and_writes_the_manifest(tmp_path):
    x, y = _arrays(tmp_path)
    np.savez(tmp_path / "src.npz", x=x, y=y)
    before = hashlib.sha256((tmp_path / "src.npz").read_bytes()).hexdigest()
    m = convert.convert(tmp_path / "src.npz", tmp_path / "dst", shard_size=120, val_fraction=0.2)
    train, _ = _read_split(tmp_path / "dst", "train")
    val, _ = _read_split(tmp_path / "dst", "val")
    assert _rows(train) | _rows(val) == _rows({"x": x, "y": y})
    assert len(train["x"]) + len(val["x"]) == 500 and 50 < len(val["x"]) < 150
    assert not _rows(train) & _rows(val)
    np.testing.assert_allclose(m["stats"]["mean"], train["x"].reshape(-1, 2).mean(0), atol=1e-6)
    np.testing.assert_allclose(m["stats"]["std"], train["x"].reshape(-1, 2).std(0), atol=1e-6)
    assert m["splits"]["train"]["class_counts"] == np.bincount(train["y"], minlength=5).tolist()
    assert m["features"]["x"] == {"dtype": "float32", "shape": [6, 2], "encoding": "raw"}
    for split in m["splits"].values():
        for shard in split["shards"]:
            file = tmp_path / "dst" / shard["file"]
            assert hashlib.sha256(file.read_bytes()).hexdigest() == shard["sha256"]
    assert len(m["splits"]["train"]["shards"]) >= 3  # 120 records a shard
    assert m["cleaning"]["dropped"] == 0 and m["source"]["records"] == 500
    assert hashlib.sha256((tmp_path / "src.npz").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in (tmp_path / "dst").iterdir() if not p.suffix) == []


def test_every_cleaning_rule_on_arrays_is_reported_and_kept_out(tmp_path):
    x, y = _arrays(tmp_path, n=100)
    x, y = x.copy(), y.astype(np.float64)
    x[3, 0, 0] = np.nan
    x[4, 1, 1] = np.inf
    y[5] = 7  # >= num_classes
    y[6] = 1.5  # not an integer
    x[8], y[8] = x[7], y[7]  # exact duplicate
    x_val, y_val = x[20:30].copy(), y[20:30].copy()  # x_val[0] duplicates train row 20
    x_val[1:] += 100.0
    np.savez(tmp_path / "src.npz", x=x, y=y, x_val=x_val, y_val=y_val)
    m = convert.convert(tmp_path / "src.npz", tmp_path / "dst", num_classes=5)
    by_rule = m["cleaning"]["by_rule"]
    assert by_rule == {
        "undecodable": 0,
        "non_finite": 2,
        "label_out_of_range": 2,
        "shape_mismatch": 0,
        "duplicate": 1,
        "cross_split_duplicate": 1,
    }
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    paths = {r["path"]: r["rule"] for r in report["records"]}
    assert paths == {
        "src.npz:x[3]": "non_finite",
        "src.npz:x[4]": "non_finite",
        "src.npz:x[5]": "label_out_of_range",
        "src.npz:x[6]": "label_out_of_range",
        "src.npz:x[8]": "duplicate",
        "src.npz:x_val[0]": "cross_split_duplicate",
    }
    train, _ = _read_split(tmp_path / "dst", "train")
    val, _ = _read_split(tmp_path / "dst", "val")
    assert len(train["x"]) == 95 and len(val["x"]) == 9 and np.isfinite(train["x"]).all()
    assert set(np.unique(train["y"])) <= set(range(5))
    assert "duplicate across train/val" in convert.summary(m, tmp_path / "dst")


def test_undecodable_and_shape_mismatch_in_a_folder_of_npy_files(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(4):
            np.save(tmp_path / "src" / c / f"{i}.npy", rng.standard_normal((3, 4)))
    np.save(tmp_path / "src" / "dog" / "wide.npy", np.zeros((3, 5)))
    good = (tmp_path / "src" / "dog" / "0.npy").read_bytes()
    (tmp_path / "src" / "dog" / "cut.npy").write_bytes(good[:-10])  # truncated
    m = convert.convert(tmp_path / "src", tmp_path / "dst", val_fraction=0)
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    rules = {r["path"]: r["rule"] for r in report["records"]}
    assert rules == {"dog/cut.npy": "undecodable", "dog/wide.npy": "shape_mismatch"}
    assert m["class_names"] == ["cat", "dog"] and m["splits"]["train"]["class_counts"] == [4, 4]
    train, _ = _read_split(tmp_path / "dst", "train")
    expected = np.load(tmp_path / "src" / "cat" / "2.npy")
    assert any(np.array_equal(row, expected) for row in train["x"])


def _png(rng, size=(6, 5)):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_image_folder_keeps_png_bytes_and_reports_broken_files(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "src" / split / c).mkdir(parents=True)
            for i in range(3):
                (tmp_path / "src" / split / c / f"{i}.png").write_bytes(_png(rng, (6 + i, 5)))
    (tmp_path / "src" / "train" / "a" / "bad.png").write_bytes(b"not an image at all")
    cut = _png(rng)
    (tmp_path / "src" / "train" / "b" / "cut.png").write_bytes(cut[: len(cut) // 2])
    shutil.copy(tmp_path / "src/train/a/0.png", tmp_path / "src/val/b/copy.png")
    m = convert.convert(tmp_path / "src", tmp_path / "dst")
    assert m["features"]["x"]["encoding"] == "image"
    assert m["splits"]["train"]["records"] == 6 and m["splits"]["val"]["records"] == 6
    by_rule = {k: v for k, v in m["cleaning"]["by_rule"].items() if v}
    assert by_rule == {"undecodable": 2, "cross_split_duplicate": 1}
    train, _ = _read_split(tmp_path / "dst", "train")
    stored = set(train["x"])
    assert (tmp_path / "src/train/a/1.png").read_bytes() in stored
    assert len(m["stats"]["mean"]) == 3


def test_csv_rows_with_bad_fields(tmp_path):
    lines = ["f1,f2,label", "1,2,0", "3,4,1", "5,,1", "7,x,0", "9,10", "11,12,3", "13,14,0.5"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    m = convert.convert(tmp_path / "t.csv", tmp_path / "dst", val_fraction=0, num_classes=2)
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    assert {r["path"]: r["rule"] for r in report["records"]} == {
        "t.csv:4": "non_finite",
        "t.csv:5": "undecodable",
        "t.csv:6": "shape_mismatch",
        "t.csv:7": "label_out_of_range",
        "t.csv:8": "label_out_of_range",
    }
    train, _ = _read_split(tmp_path / "dst", "train")
    assert _rows(train) == _rows({"x": np.array([[1, 2], [3, 4]], np.float32), "y": [0, 1]})
    assert m["num_classes"] == 2


def test_strict_makes_a_bad_record_an_error_naming_it(tmp_path):
    x, y = _arrays(tmp_path, n=50)
    x[9, 0, 0] = np.nan
    np.savez(tmp_path / "src.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"src.npz:x\[9\]: NaN or Inf"):
        convert.convert(tmp_path / "src.npz", tmp_path / "dst", strict=True)
    assert not (tmp_path / "dst" / records.MANIFEST).exists()


def test_a_killed_conversion_looks_unfinished_and_resumes_to_the_same_shards(tmp_path, monkeypatch):
    x, y = _arrays(tmp_path, n=1000)
    x[500, 0, 0] = np.nan
    np.savez(tmp_path / "src.npz", x=x, y=y)
    clean = convert.convert(tmp_path / "src.npz", tmp_path / "ref", shard_size=100)
    original = convert._Shards.write
    calls = []

    def dying_write(self, record):
        calls.append(1)
        if len(calls) == 650:
            raise KeyboardInterrupt  # as if killed mid-shard
        original(self, record)

    monkeypatch.setattr(convert._Shards, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(tmp_path / "src.npz", tmp_path / "dst", shard_size=100)
    monkeypatch.setattr(convert._Shards, "write", original)
    assert not (tmp_path / "dst" / records.MANIFEST).exists()
    assert not list((tmp_path / "dst").glob("*.array_record"))  # nothing looks complete
    with pytest.raises(DataError, match="unfinished conversion"):
        records.read_manifest(tmp_path / "dst")
    with pytest.raises(DataError, match="other options"):
        convert.convert(tmp_path / "src.npz", tmp_path / "dst", shard_size=50)
    resumed = convert.convert(tmp_path / "src.npz", tmp_path / "dst", shard_size=100)
    for key in ("splits", "stats", "cleaning", "num_classes"):
        assert resumed[key] == clean[key], key
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    assert [r["path"] for r in report["records"]] == ["src.npz:x[500]"]


def test_existing_conversion_needs_overwrite_and_dst_inside_src_is_refused(tmp_path):
    x, y = _arrays(tmp_path, n=30)
    np.savez(tmp_path / "src.npz", x=x, y=y)
    convert.convert(tmp_path / "src.npz", tmp_path / "dst")
    with pytest.raises(DataError, match="--overwrite"):
        convert.convert(tmp_path / "src.npz", tmp_path / "dst")
    convert.convert(tmp_path / "src.npz", tmp_path / "dst", overwrite=True, val_fraction=0)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="inside SRC"):
        convert.convert(tmp_path / "folder", tmp_path / "folder" / "out")


def test_cli_prints_the_summary_and_exits_2_on_bad_input(tmp_path, capsys):
    x, y = _arrays(tmp_path, n=40)
    x[1] = np.nan
    np.savez(tmp_path / "src.npz", x=x, y=y)
    assert convert.main([str(tmp_path / "src.npz"), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 records" in out and "src.npz:x[1]" in out
    assert convert.main([str(tmp_path / "missing.npz"), str(tmp_path / "d2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dicom_sample_files(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    mr = get_testdata_file("MR_small.dcm")
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
    ds = pydicom.dcmread(mr)
    for i in range(3):  # distinct images: shifted pixel values, written by pydicom
        ds.PixelData = (ds.pixel_array + i).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(tmp_path / "src" / ("a" if i < 2 else "b") / f"mr{i}.dcm")
    shutil.copy(mr, tmp_path / "src" / "b" / "mr_copy.dcm")  # the same pixels as mr0
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "src" / "b" / "cut.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src" / "a" / "ct.dcm")
    m = convert.convert(tmp_path / "src", tmp_path / "dst", val_fraction=0)
    assert m["features"]["x"]["shape"] == [64, 64, 1]
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    assert {r["path"]: r["rule"] for r in report["records"]} == {
        "a/ct.dcm": "shape_mismatch",
        "b/cut.dcm": "undecodable",
        "b/mr_copy.dcm": "duplicate",
    }
    train, _ = _read_split(tmp_path / "dst", "train")
    expected = pydicom.dcmread(mr).pixel_array.astype(np.float32)[..., None]
    assert any(np.array_equal(row, expected) for row in train["x"])
    assert m["splits"]["train"]["class_counts"] == [2, 1]


def test_nifti_volumes_with_masks(tmp_path):
    import os

    import nibabel
    from nibabel.testing import data_path

    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    (tmp_path / "masks").mkdir()
    vols = {}
    for i in range(3):
        vols[i] = rng.standard_normal((8, 9, 10)).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(vols[i], np.eye(4)), tmp_path / "src" / f"v{i}.nii.gz")
        mask = (vols[i] > 0).astype(np.uint8)
        nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), tmp_path / "masks" / f"v{i}.nii.gz")
    shutil.copy(os.path.join(data_path, "anatomical.nii"), tmp_path / "src" / "anat.nii")
    m = convert.convert(
        tmp_path / "src", tmp_path / "dst", masks=tmp_path / "masks", val_fraction=0
    )
    assert set(m["features"]) == {"x", "segmentation"}  # unlabeled: segmentation data
    assert m["features"]["x"]["shape"] == [8, 9, 10, 1]
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    assert {r["path"]: r["rule"] for r in report["records"]} == {"anat.nii": "shape_mismatch"}
    manifest = records.read_manifest(tmp_path / "dst")
    shard = tmp_path / "dst" / manifest["splits"]["train"]["shards"][0]["file"]
    reader = ArrayRecordReader(str(shard))
    batch, _ = Layout(m["features"]).decode(reader.read(list(range(3))))
    for x, mask in zip(batch["x"], batch["segmentation"], strict=True):
        i = next(i for i in vols if np.array_equal(vols[i][..., None], x))
        np.testing.assert_array_equal(mask, vols[i] > 0)


def test_a_kill_while_finishing_resumes_and_overwrite_checks_the_source_first(
    tmp_path, monkeypatch
):
    x, y = _arrays(tmp_path, n=300)
    np.savez(tmp_path / "src.npz", x=x, y=y)

    def dying(*args):  # the report comes after the shards moved to DST, before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_write_report", dying)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(tmp_path / "src.npz", tmp_path / "dst", shard_size=100)
    monkeypatch.undo()
    assert list((tmp_path / "dst").glob("*.array_record"))
    m = convert.convert(tmp_path / "src.npz", tmp_path / "dst", shard_size=100)
    assert m["splits"]["train"]["records"] + m["splits"]["val"]["records"] == 300
    # A wrong option with --overwrite fails before it deletes the finished conversion.
    with pytest.raises(DataError, match="--format folder needs a folder"):
        convert.convert(tmp_path / "src.npz", tmp_path / "dst", fmt="folder", overwrite=True)
    assert records.read_manifest(tmp_path / "dst") == m


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x=1, y=1, mask=1, x_val=1, y_val=1), "masks .*:mask but none for the val split"),
        (dict(x=1, y=1, x_val=1), "labels .*:y but none for the val split"),
        (dict(x=1, x_val=1, y_val=1), "labels .*:y_val but none for the train split"),
        (dict(x=1, y=1, x_val="f8", y_val=1), "x_val is float64 but .*:x is float32"),
    ],
)
def test_splits_of_an_npz_must_hold_the_same_arrays(tmp_path, arrays, match):
    rng = np.random.default_rng(0)
    made = {
        "x": rng.standard_normal((20, 4, 4, 1)).astype(np.float32),
        "y": rng.integers(0, 3, 20),
        "mask": rng.integers(0, 2, (20, 4, 4)),
    }
    out = {}
    for name, how in arrays.items():
        base = made[name.removesuffix("_val")]
        out[name] = base.astype(how) if how != 1 else base
    np.savez(tmp_path / "s.npz", **out)
    with pytest.raises(DataError, match=match):
        convert.convert(tmp_path / "s.npz", tmp_path / "dst")


def test_images_of_one_size_record_it_16_bit_is_reported_and_train_alone_is_the_root(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "src" / "train"  # train/ with no val/ beside it: the classes are inside
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.png").write_bytes(_png(rng, (6, 5)))
    Image.fromarray(rng.integers(0, 65536, (6, 5), dtype=np.uint16)).save(root / "dog" / "d.png")
    m = convert.convert(tmp_path / "src", tmp_path / "dst", val_fraction=0.2)
    assert m["class_names"] == ["cat", "dog"]
    assert m["features"]["x"]["shape"] == [6, 5, 3]  # all kept images agree: no resize needed
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    assert [(r["path"], r["rule"]) for r in report["records"]] == [
        ("train/dog/d.png", "undecodable")
    ]
    assert "more than 8 bits" in report["records"][0]["reason"]


def test_csv_with_a_byte_order_mark_blank_lines_and_huge_labels(tmp_path):
    lines = ["label,height,width", "0,1,2", "", "1,x,3", "3000000000,1,1", '1,"4",5', "1e30,1,1"]
    (tmp_path / "t.csv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    m = convert.convert(tmp_path / "t.csv", tmp_path / "dst", val_fraction=0)
    assert m["source"]["records"] == 5  # the blank line is not a record
    report = json.loads((tmp_path / "dst" / records.REPORT).read_text())
    reasons = {r["path"]: (r["rule"], r["reason"]) for r in report["records"]}
    assert reasons["t.csv:4"] == ("undecodable", "column 'height' value 'x' is not a number")
    assert reasons["t.csv:5"][0] == "label_out_of_range"  # > 2^20 classes without --num-classes
    assert reasons["t.csv:7"] == ("label_out_of_range", "label '1e30' is too large")
    assert m["num_classes"] == 2 and m["splits"]["train"]["class_counts"] == [1, 1]
