"""Readers of raw datasets for the converter: arrays (.npz/.npy), CSV, and folders of files.

Each reader streams `Chunk`s of a bounded number of records in a fixed order, so a conversion can
resume at any record position. A record that cannot be read becomes an entry in `Chunk.errors`
(rule, reason) with placeholder values; it is never silently dropped or fixed up.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import pathlib
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from bigtrain.data.records import DataError

IMAGE_EXT = (".png", ".jpg", ".jpeg")
FILE_KINDS = {".png": "image", ".jpg": "image", ".jpeg": "image", ".npy": "npy", ".dcm": "dicom"}
FILE_KINDS.update({".nii": "nifti", ".nii.gz": "nifti"})
VAL_NAMES = ("val", "validation", "test")


@dataclasses.dataclass
class Chunk:
    """Consecutive source records of one split (`split=None`: the converter assigns it)."""

    x: np.ndarray | list[bytes]  # fixed-shape rows, or encoded image bytes
    y: np.ndarray | None  # int64 labels; None for unlabeled data
    paths: list[str]  # where each record came from, for the report
    errors: dict[int, tuple[str, str]]  # row -> (rule, reason)
    split: str | None = None
    mask: np.ndarray | None = None  # per-pixel labels: the "segmentation" feature
    pixels: list[np.ndarray] | None = None  # decoded images, for statistics and checks


@dataclasses.dataclass
class Source:
    kind: str
    features: dict[str, dict[str, Any]]
    total: int  # records, for progress and resume
    class_names: list[str] | None
    num_classes: int | None
    chunks: Any  # (start: int) -> Iterator[Chunk]


def open_source(src: pathlib.Path, fmt: str, **kw) -> Source:
    if fmt == "auto":
        fmt = _detect(src)
    openers = {"arrays": arrays, "csv": csv_table, "folder": folder}
    if fmt not in openers:
        raise DataError(f"unknown --format {fmt!r}; known: auto, {', '.join(openers)}")
    if fmt == "folder" and not src.is_dir():
        raise DataError(f"--format folder needs a folder; {src} is a file (try --format auto)")
    if fmt == "csv" and not src.is_file():
        raise DataError(f"--format csv needs a .csv file; {src} is a folder (try --format auto)")
    return openers[fmt](src, **kw)


def _detect(src: pathlib.Path) -> str:
    if not src.exists():
        raise DataError(f"source {src} does not exist")
    if src.suffix == ".npz" or (src.is_dir() and (src / "x.npy").is_file()):
        return "arrays"
    if src.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if src.is_dir():
        return "folder"
    raise DataError(
        f"cannot tell the format of {src}; expected a .npz file, a folder with x.npy and y.npy, "
        "a .csv file, or a folder of class subfolders (PNG/JPEG/.npy/DICOM/NIfTI files); "
        "or pass --format"
    )


# --- arrays: .npz, or a folder with x.npy, y.npy (+ x_val.npy, y_val.npy, mask.npy)


class _ArrayStream:
    """Sequential row reads of one array in a .npy file or an .npz member, without loading it."""

    def __init__(self, path: pathlib.Path, name: str):
        self.label = f"{path.name}:{name}"
        if path.suffix == ".npz":
            self._zip = zipfile.ZipFile(path)
            self._open = lambda: self._zip.open(f"{name}.npy")
        else:
            self._open = lambda: open(path / f"{name}.npy", "rb")  # noqa: SIM115
        self._file = self._open()
        shape, fortran, dtype = _npy_header(self._file)
        if fortran and len(shape) > 1:
            raise DataError(f"{self.label} is Fortran-ordered; save it with np.ascontiguousarray")
        if dtype.hasobject:
            raise DataError(f"{self.label} holds Python objects; save a numeric array")
        self.shape, self.dtype = tuple(shape), dtype
        self._data_start = self._file.tell()
        self._row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._pos = 0

    def read(self, start: int, n: int) -> np.ndarray:
        if start != self._pos:
            self._file.seek(self._data_start + start * self._row)
        raw = self._file.read(n * self._row)
        self._pos = start + n
        if len(raw) != n * self._row:
            raise DataError(f"{self.label} is truncated at row {start + len(raw) // self._row}")
        return np.frombuffer(raw, self.dtype).reshape(n, *self.shape[1:])


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _names(path: pathlib.Path) -> set[str]:
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as z:
            return {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    return {p.stem for p in path.glob("*.npy")}


def arrays(src: pathlib.Path, *, num_classes: int | None = None, chunk: int = 8192, **_) -> Source:
    names = _names(src)
    if "x" not in names:
        raise DataError(f"{src} has no array 'x' (found: {sorted(names)}); save x=..., y=...")
    parts = {"train": ("x", "y", "mask")}
    val = next((s for s in VAL_NAMES if f"x_{s}" in names), None)
    if val:
        parts["val"] = (f"x_{val}", f"y_{val}", f"mask_{val}")
    streams = {}
    for split, (xn, yn, mn) in parts.items():
        xs = _ArrayStream(src, xn)
        ys = _ArrayStream(src, yn) if yn in names else None
        ms = _ArrayStream(src, mn) if mn in names else None
        for other in (ys, ms):
            if other is not None and other.shape[0] != xs.shape[0]:
                raise DataError(
                    f"{other.label} has {other.shape[0]} rows but {xs.label} has {xs.shape[0]}"
                )
        if ys is not None and len(ys.shape) != 1:
            raise DataError(f"{ys.label} has shape {ys.shape}; labels must be one integer per row")
        streams[split] = (xs, ys, ms)
    first_x, first_y, first_m = streams["train"]
    for split, (xs, ys, ms) in streams.items():
        if xs.shape[1:] != first_x.shape[1:]:
            raise DataError(f"{split} inputs have shape {xs.shape[1:]}, train {first_x.shape[1:]}")
        if xs.dtype != first_x.dtype:  # a cast could overflow or wrap, and hashes would differ
            raise DataError(
                f"{xs.label} is {xs.dtype} but {first_x.label} is {first_x.dtype}; save every "
                "split's inputs with the same dtype"
            )
        for what, a, b in (("labels", ys, first_y), ("masks", ms, first_m)):
            if (a is None) != (b is None):
                have, lack = (a, "train") if a is not None else (b, split)
                raise DataError(
                    f"{src} has {what} {have.label} but none for the {lack} split; save "
                    f"{what} for every split or for none"
                )
        if ms is not None and ms.shape[1:] != first_m.shape[1:]:
            raise DataError(
                f"{ms.label} has shape {ms.shape[1:]} but {first_m.label} {first_m.shape[1:]}"
            )
    features = {"x": _raw(first_x.dtype, first_x.shape[1:])}
    if first_y is not None:
        features["y"] = _raw(np.int32, ())
    if first_m is not None:
        features["segmentation"] = _raw(np.uint8, first_m.shape[1:])
    sizes = [streams[s][0].shape[0] for s in streams]

    def chunks(start: int) -> Iterator[Chunk]:
        offset = 0
        for (split, (xs, ys, ms)), size in zip(streams.items(), sizes, strict=True):
            for lo in range(max(start - offset, 0), size, chunk):
                n = min(chunk, size - lo)
                x = xs.read(lo, n)
                paths = [f"{xs.label}[{lo + i}]" for i in range(n)]
                errors: dict[int, tuple[str, str]] = {}
                y = _labels(ys.read(lo, n), errors) if ys is not None else None
                mask = _mask(ms.read(lo, n), errors) if ms is not None else None
                yield Chunk(x, y, paths, errors, split if len(streams) > 1 else None, mask)
            offset += size

    return Source("arrays", features, sum(sizes), None, num_classes, chunks)


def _raw(dtype, shape) -> dict[str, Any]:
    return {"dtype": np.dtype(dtype).name, "shape": [int(d) for d in shape], "encoding": "raw"}


def _labels(y: np.ndarray, errors: dict[int, tuple[str, str]]) -> np.ndarray:
    """int64 labels; a label that is not an integer is an error (range is checked later)."""
    if y.dtype == bool or (np.issubdtype(y.dtype, np.integer) and y.dtype.itemsize < 8):
        return y.astype(np.int64)
    yf = y.astype(np.float64)
    ok = np.isfinite(yf) & (yf == np.round(yf)) & (np.abs(yf) < 2.0**62)
    for i in np.flatnonzero(~ok):
        why = (
            "is too large"
            if np.isfinite(yf[i]) and yf[i] == np.round(yf[i])
            else "is not an integer"
        )
        errors.setdefault(int(i), ("label_out_of_range", f"label {y[i].item()!r} {why}"))
    exact = y if np.issubdtype(y.dtype, np.integer) else yf  # int64/uint64: not via float
    out = np.where(ok, exact, 0).astype(np.int64)
    out[~ok] = -1
    return out


def _mask(m: np.ndarray, errors: dict[int, tuple[str, str]]) -> np.ndarray:
    mf = m.reshape(len(m), -1).astype(np.float64)
    ok = (np.isfinite(mf) & (mf == np.round(mf)) & (mf >= 0) & (mf <= 255)).all(1)
    for i in np.flatnonzero(~ok):
        errors.setdefault(
            int(i), ("label_out_of_range", "mask values must be integers in [0, 255]")
        )
    return np.where(ok.reshape(-1, *[1] * (m.ndim - 1)), m, 0).astype(np.uint8)


# --- CSV: one row per record, numeric feature columns and an integer label column


def csv_table(
    src: pathlib.Path,
    *,
    label_column: str = "label",
    num_classes: int | None = None,
    chunk: int = 4096,
    **_,
) -> Source:
    delimiter = "\t" if src.suffix.lower() == ".tsv" else ","

    def records(f) -> Iterator[tuple[int, list[str]]]:
        """(line number, fields) of each record; blank lines are not records. Line numbers
        come from the csv reader, so quoted fields spanning lines keep them right."""
        rows = csv.reader(f, delimiter=delimiter)
        next(rows, None)  # the header
        for row in rows:
            if row:
                yield rows.line_num, row

    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
    with open(src, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise DataError(f"{src} is empty; the first line must name the columns")
    if label_column not in header:
        raise DataError(
            f"{src} has no label column {label_column!r} (columns: {', '.join(header)}); "
            "pass --label-column NAME"
        )
    with open(src, newline="", encoding="utf-8-sig") as f:
        total = sum(1 for _ in records(f))
    li = header.index(label_column)
    names = header[:li] + header[li + 1 :]
    width = len(header) - 1
    features = {"x": _raw(np.float32, (width,)), "y": _raw(np.int32, ())}

    def chunks(start: int) -> Iterator[Chunk]:
        with open(src, newline="", encoding="utf-8-sig") as f:
            rows = records(f)
            for _ in range(start):
                next(rows, None)
            while True:
                block = [r for _, r in zip(range(chunk), rows, strict=False)]
                if not block:
                    return
                x = np.zeros((len(block), width), np.float32)
                y = np.full(len(block), -1, np.int64)
                errors: dict[int, tuple[str, str]] = {}
                for i, (_, row) in enumerate(block):
                    errors_i = _csv_row(row, li, names, x, y, i)
                    if errors_i:
                        errors[i] = errors_i
                paths = [f"{src.name}:{line}" for line, _ in block]
                yield Chunk(x, y, paths, errors)

    return Source("csv", features, total, None, num_classes, chunks)


def _csv_row(row, li, names, x, y, i) -> tuple[str, str] | None:
    if len(row) != len(names) + 1:
        return ("shape_mismatch", f"row has {len(row)} fields; the header has {len(names) + 1}")
    try:
        label = float(row[li])
    except ValueError:
        return ("label_out_of_range", f"label {row[li]!r} is not an integer")
    if not (np.isfinite(label) and label == int(label)):
        return ("label_out_of_range", f"label {row[li]!r} is not an integer")
    if abs(label) >= 2.0**62:
        return ("label_out_of_range", f"label {row[li]!r} is too large")
    y[i] = int(label)
    values = row[:li] + row[li + 1 :]
    for j, v in enumerate(values):
        try:
            x[i, j] = float(v) if v.strip() else np.nan  # an empty cell is a missing value
        except ValueError:
            return ("undecodable", f"column {names[j]!r} value {v!r} is not a number")
    return None


# --- folders: SRC/<class>/<file>, or SRC/{train,val}/<class>/<file>, or unlabeled SRC/<file>


def _kind(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    for ext, kind in FILE_KINDS.items():
        if name.endswith(ext):
            return kind
    return None


def _list(root: pathlib.Path) -> tuple[list[tuple[pathlib.Path, str | None]], bool]:
    """(file, class name or None) for every data file under `root`, sorted; labeled or not."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        files = [
            (f, d.name)
            for d in subdirs
            for f in sorted(d.rglob("*"))
            if f.is_file() and _kind(f) is not None
        ]
        return files, True
    return [(f, None) for f in sorted(root.iterdir()) if f.is_file() and _kind(f)], False


def folder(
    src: pathlib.Path,
    *,
    masks: pathlib.Path | None = None,
    channels: int = 3,
    chunk: int = 256,
    num_classes: int | None = None,
    **_,
) -> Source:
    split_dirs = {p.name: p for p in src.iterdir() if p.is_dir()}
    val = next((n for n in VAL_NAMES if n in split_dirs), None)
    if "train" in split_dirs and val:
        roots = {"train": split_dirs["train"], "val": split_dirs[val]}
    elif "train" in split_dirs and len(split_dirs) == 1:  # train/ alone: val by content hash
        roots = {None: split_dirs["train"]}
    elif val and len(split_dirs) == 1:
        raise DataError(f"{src} has {val}/ but no train/ beside it; add SRC/train/<class>/...")
    else:
        roots = {None: src}
    listed = {split: _list(root) for split, root in roots.items()}
    labeled = {has for _, has in listed.values()}
    if len(labeled) > 1:
        raise DataError(f"{src}: some splits have class subfolders and some do not")
    is_labeled = labeled.pop()
    items = [(split, f, c) for split, (files, _) in listed.items() for f, c in files]
    if not items:
        raise DataError(
            f"{src} holds no data files ({', '.join(FILE_KINDS)}); expected SRC/<class>/<file>"
        )
    kinds = collections.Counter(_kind(f) for _, f, _ in items)
    if len(kinds) > 1:
        raise DataError(f"{src} mixes file kinds {dict(kinds)}; convert one kind at a time")
    kind = kinds.most_common(1)[0][0]
    class_names = sorted({c for _, _, c in items}) if is_labeled else None
    label_of = {c: i for i, c in enumerate(class_names or [])}
    if kind == "image":
        if masks:
            raise DataError("--masks is for .npy, DICOM and NIfTI inputs, not images")
        if channels not in (1, 3):
            raise DataError(f"--channels {channels}: images are decoded to 1 (L) or 3 (RGB)")
        features = {"x": {"dtype": "uint8", "shape": [None, None, channels], "encoding": "image"}}
    else:
        shape, dtype = _modal_header(kind, [f for _, f, _ in items])
        features = {"x": _raw(dtype, shape)}
        if masks:
            features["segmentation"] = _raw(np.uint8, shape[:-1] if kind != "npy" else shape)
    if is_labeled:
        features["y"] = _raw(np.int32, ())
    relative = lambda f: str(f.relative_to(src))

    def chunks(start: int) -> Iterator[Chunk]:
        lo = start
        while lo < len(items):
            block = items[lo : lo + chunk]
            cut = next((i for i, (s, _, _) in enumerate(block) if s != block[0][0]), len(block))
            block = block[:cut]  # a chunk never spans two given splits
            yield _file_chunk(block, kind, features, label_of, src, masks, channels, relative)
            lo += len(block)

    return Source(kind, features, len(items), class_names, num_classes or len(label_of), chunks)


def _file_chunk(block, kind, features, label_of, src, masks, channels, relative) -> Chunk:
    errors: dict[int, tuple[str, str]] = {}
    paths = [relative(f) for _, f, _ in block]
    y = np.array([label_of.get(c, -1) for _, _, c in block], np.int64) if label_of else None
    if kind == "image":
        xs, pixels = [], []
        for i, (_, f, _) in enumerate(block):
            data = f.read_bytes()
            try:
                pixels.append(decode_image(data, channels))
            except Exception as e:  # noqa: BLE001 - any decoder failure is reported per file
                errors[i] = ("undecodable", f"{type(e).__name__}: {e}")
                pixels.append(np.zeros((1, 1, channels), np.uint8))
            xs.append(data)
        return Chunk(xs, y, paths, errors, block[0][0], pixels=pixels)
    shape, dtype = tuple(features["x"]["shape"]), np.dtype(features["x"]["dtype"])
    x = np.zeros((len(block), *shape), dtype)
    mask = None
    if masks:
        mask = np.zeros((len(block), *features["segmentation"]["shape"]), np.uint8)
    for i, (_, f, _) in enumerate(block):
        err = _load_into(kind, f, shape, x, i, "input")
        if err is None and masks:
            m = pathlib.Path(masks) / f.relative_to(src)
            if not m.exists():
                err = ("undecodable", f"no mask file {m}")
            else:
                mshape = tuple(features["segmentation"]["shape"])
                tmp = np.zeros((1, *mshape), np.float32)
                err = _load_into(kind, m, mshape, tmp, 0, "mask", squeeze=kind != "npy")
                if err is None:
                    holder: dict[int, tuple[str, str]] = {}
                    mask[i] = _mask(tmp, holder)[0]
                    err = holder.get(0)
        if err:
            errors[i] = err
    return Chunk(x, y, paths, errors, block[0][0], mask)


def _load_into(kind, f, shape, out, i, what, squeeze=False) -> tuple[str, str] | None:
    try:
        a = load_file(kind, f)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files are reported, not raised
        return ("undecodable", f"{type(e).__name__}: {str(e)[:200]}")
    if squeeze and a.shape[-1] == 1:
        a = a[..., 0]
    if a.shape != shape:
        return ("shape_mismatch", f"{what} has shape {a.shape}; most files have {shape}")
    if what == "input" and not np.can_cast(a.dtype, out.dtype, "safe"):  # masks: see _mask
        return (
            "shape_mismatch",
            f"input has dtype {a.dtype}; most files have {out.dtype}, and the cast could "
            "change its values: save every file with one dtype",
        )
    out[i] = a
    return None


def decode_image(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # convert() would clip
            raise ValueError(
                f"{im.mode} image: more than 8 bits per channel; images are stored as 8-bit, "
                "so save these as 8-bit, or as .npy files to keep the depth"
            )
        im.load()  # a truncated file raises here, not later
        return np.asarray(im.convert("L" if channels == 1 else "RGB")).reshape(
            im.height, im.width, channels
        )


def load_file(kind: str, path: pathlib.Path) -> np.ndarray:
    """A file's array, channels-last: scans get a trailing channel axis of 1."""
    if kind == "npy":
        return np.load(path, allow_pickle=False)
    if kind == "dicom":
        import pydicom
        from pydicom.pixels import apply_rescale

        ds = pydicom.dcmread(path)
        a = apply_rescale(ds.pixel_array, ds).astype(np.float32)
        return a if int(getattr(ds, "SamplesPerPixel", 1)) > 1 else a[..., None]
    if kind == "nifti":
        import nibabel

        a = np.asarray(nibabel.load(path).dataobj, dtype=np.float32)
        return a if a.ndim == 4 else a[..., None]
    raise DataError(f"no loader for {kind} files")


def _header_shape(kind: str, path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype `load_file` would return, read from the header only."""
    try:
        if kind == "npy":
            with open(path, "rb") as f:
                shape, _, dtype = _npy_header(f)
            return tuple(shape), dtype
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            shape = (frames,) if frames > 1 else ()
            shape += (int(ds.Rows), int(ds.Columns), int(getattr(ds, "SamplesPerPixel", 1)))
            return shape, np.dtype(np.float32)
        if kind == "nifti":
            import nibabel

            shape = tuple(int(d) for d in nibabel.load(path).shape)
            return (shape if len(shape) == 4 else (*shape, 1)), np.dtype(np.float32)
    except Exception:  # noqa: BLE001 - unreadable headers are reported when the file is loaded
        return None
    return None


def _modal_header(kind: str, files: list[pathlib.Path]) -> tuple[tuple[int, ...], np.dtype]:
    """The most common shape: files of any other shape are reported as shape mismatches."""
    seen = collections.Counter(h for h in (_header_shape(kind, f) for f in files) if h)
    if not seen:
        raise DataError(f"none of the {len(files)} {kind} files has a readable header")
    (shape, dtype), _ = seen.most_common(1)[0]
    return shape, dtype
