"""Raw data -> ArrayRecord shards + manifest.json + cleaning_report.json, streaming.

    python -m bigtrain.data.convert SRC DST [--format auto|arrays|csv|folder] [--shard-size N]
        [--val-fraction F] [--num-classes K] [--label-column NAME] [--masks DIR] [--strict]

Records stream through in chunks, so memory stays flat except for the duplicate index (8 bytes
a record, ~2x that while merging: ~30 MiB per million records measured). Bad records
(undecodable, NaN/Inf, label out of range, wrong shape, duplicates) are kept out of the shards
and listed with their source and reason. Work goes to DST/.partial and is checkpointed at every
shard: a killed conversion resumes when the same command runs again, and DST only gets its
manifest.json, the mark of a finished conversion, last. The source is only ever read.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import numpy as np

from bigtrain.data import readers
from bigtrain.data.records import FORMAT, FORMAT_VERSION, MANIFEST, REPORT, DataError, Layout

RULES = {
    "undecodable": "undecodable or truncated",
    "non_finite": "NaN or Inf values",
    "label_out_of_range": "label out of range",
    "shape_mismatch": "shape mismatch",
    "duplicate": "exact duplicate",
    "cross_split_duplicate": "duplicate across train/val",
}
MAX_CLASSES = 1 << 20  # without --num-classes, larger labels are out of range (histograms)
_BUFFER = 1 << 16  # hashes kept unsorted before merging into the sorted array


class _HashSet:
    """64-bit content hashes: a sorted numpy array plus a small set; ~8 bytes per record."""

    def __init__(self, hashes: np.ndarray | None = None):
        self._sorted = np.sort(hashes) if hashes is not None else np.zeros(0, np.uint64)
        self.recent: set[int] = set()

    def in_sorted(self, hashes: np.ndarray) -> np.ndarray:
        """Vectorized membership in the sorted part; check `recent` as well."""
        i = np.minimum(np.searchsorted(self._sorted, hashes), max(len(self._sorted) - 1, 0))
        return self._sorted[i] == hashes if len(self._sorted) else np.zeros(len(hashes), bool)

    def merge(self) -> None:
        if len(self.recent) >= _BUFFER:
            new = np.sort(np.fromiter(self.recent, np.uint64, len(self.recent)))
            self._sorted = np.concatenate([self._sorted, new])
            # Two sorted runs: the stable sort (timsort) merges them in linear time, ~30x faster
            # than a quicksort at 5M hashes; in place, so the merge peaks at ~2x the index.
            self._sorted.sort(kind="stable")
            self.recent.clear()


class _Moments:
    """Per-channel mean and variance of the train split, merged chunk by chunk (Chan et al.)."""

    def __init__(self, state: dict | None = None):
        s = state or {"n": 0, "mean": None, "m2": None}
        self.n = s["n"]
        self.mean = None if s["mean"] is None else np.array(s["mean"])
        self.m2 = None if s["m2"] is None else np.array(s["m2"])

    def add(self, v: np.ndarray) -> None:  # v: (count, channels)
        if not len(v):
            return
        v = v.astype(np.float64)
        n, mean = len(v), v.mean(0)
        m2 = ((v - mean) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total, delta = self.n + n, mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total

    def state(self) -> dict:
        as_list = lambda a: None if a is None else a.tolist()
        return {"n": self.n, "mean": as_list(self.mean), "m2": as_list(self.m2)}


class _ImageShape:
    """The one shape every kept image has, or "varies" (None: no image yet)."""

    def __init__(self, value: list[int] | str | None):
        self.value = value

    def add(self, shape: tuple[int, ...]) -> None:
        if self.value is None:
            self.value = list(shape)
        elif self.value != "varies" and self.value != list(shape):
            self.value = "varies"


class _Shards:
    """One split's shard files; a shard is renamed to its final name only once closed."""

    def __init__(self, work: pathlib.Path, split: str, done: list[dict]):
        self.work, self.split, self.done = work, split, list(done)
        self.writer, self.count = None, 0

    def write(self, record: bytes) -> None:
        if self.writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._tmp = self.work / f"{self._name()}.tmp"
            self.writer = ArrayRecordWriter(str(self._tmp), "group_size:1,uncompressed")
        self.writer.write(record)
        self.count += 1

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        final = self.work / self._name()
        os.replace(self._tmp, final)
        self.done.append({"file": final.name, "records": self.count, "sha256": _sha256(final)})
        self.writer, self.count = None, 0

    def _name(self) -> str:
        return f"{self.split}-{len(self.done):05d}.array_record"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def convert(
    src: str | pathlib.Path,
    dst: str | pathlib.Path,
    *,
    fmt: str = "auto",
    shard_size: int = 10_000,
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    label_column: str = "label",
    masks: str | pathlib.Path | None = None,
    channels: int = 3,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Converts `src` into shards under `dst`; returns the manifest (see the module docstring)."""
    src, dst = pathlib.Path(src).absolute(), pathlib.Path(dst).absolute()
    if not src.exists():
        raise DataError(f"source {src} does not exist")
    if dst == src or src in dst.parents:
        raise DataError(f"DST {dst} is inside SRC {src}; write the conversion somewhere else")
    if not (shard_size > 0 and 0 <= val_fraction < 1):
        raise DataError("--shard-size must be > 0 and --val-fraction in [0, 1)")
    # The source is opened (and its format checked) before DST is touched: a wrong option
    # with --overwrite must not delete a finished conversion.
    source = readers.open_source(
        src,
        fmt,
        num_classes=num_classes,
        label_column=label_column,
        channels=channels,
        masks=pathlib.Path(masks).absolute() if masks else None,
    )
    _prepare(dst, overwrite)
    layout = Layout(source.features)
    options = dict(
        fmt=source.kind,
        shard_size=shard_size,
        val_fraction=val_fraction,
        num_classes=num_classes,
        label_column=label_column,
        channels=channels,
        masks=str(masks) if masks else None,
    )
    fingerprint = {"source": str(src), "records": source.total, "options": options}
    work = dst / ".partial"
    journal = _resume(work, fingerprint)
    shards = {s: _Shards(work, s, journal["shards"].get(s, [])) for s in ("train", "val")}
    seen = {s: _HashSet(_read_hashes(work, s, journal["hashes"].get(s, 0))) for s in shards}
    moments = _Moments(journal["moments"])
    shape = _ImageShape(journal.get("image_shape"))
    counts = {s: _int_keys(journal["class_counts"].get(s, {})) for s in shards}
    bad_log = open(work / "bad.jsonl", "a+b")  # noqa: SIM115 - closed in the finally below
    bad_log.truncate(journal["bad_bytes"])
    bad_log.seek(0, os.SEEK_END)
    hash_logs = {s: open(work / f"hashes-{s}.bin", "ab") for s in shards}  # noqa: SIM115
    position, t0 = journal["position"], time.perf_counter()
    bar = _Progress(source.total, position, progress)
    try:
        for chunk in source.chunks(position):
            n = len(chunk.paths)
            rules, reasons, splits, hashes = _clean(chunk, layout, seen, num_classes, val_fraction)
            kept = [i for i in range(n) if rules[i] is None]
            records = dict(zip(kept, _encode(chunk, kept, layout), strict=True))
            pending: list[int] = []  # written rows whose statistics are not yet counted
            for i in range(n):
                if rules[i]:
                    if strict:
                        raise DataError(
                            f"{chunk.paths[i]}: {RULES[rules[i]]}: {reasons[i]} "
                            "(--strict: fix or remove the record, or convert without --strict)"
                        )
                    entry = {"path": chunk.paths[i], "rule": rules[i], "reason": reasons[i]}
                    bad_log.write((json.dumps(entry) + "\n").encode())
                    continue
                shards[splits[i]].write(records.pop(i))
                pending.append(i)
                if shards[splits[i]].count >= shard_size:
                    _account(chunk, pending, splits, hashes, moments, shape, counts, hash_logs)
                    pending = []
                    _checkpoint(
                        work,
                        fingerprint,
                        position + i + 1,
                        shards,
                        moments,
                        shape,
                        counts,
                        bad_log,
                        hash_logs,
                    )
            _account(chunk, pending, splits, hashes, moments, shape, counts, hash_logs)
            position += n
            bar.update(position)
        _checkpoint(work, fingerprint, position, shards, moments, shape, counts, bad_log, hash_logs)
    finally:
        bad_log.close()
        for f in hash_logs.values():
            f.close()
    bar.done()
    if shape.value not in (None, "varies"):  # every image has this shape: no resize needed
        layout.features["x"]["shape"] = shape.value
    return _finish(
        src, dst, work, source, layout, shards, moments, counts, options, time.perf_counter() - t0
    )


def _int_keys(d: dict) -> dict[int, int]:
    return {int(k): int(v) for k, v in d.items()}


def _clean(chunk, layout, seen, num_classes, val_fraction):
    """Per row: the rule it breaks (or None), the reason, its split and its content hash."""
    n = len(chunk.paths)
    rules: list[str | None] = [None] * n
    reasons = [""] * n
    for i, (rule, reason) in chunk.errors.items():
        rules[i], reasons[i] = rule, reason
    if isinstance(chunk.x, np.ndarray) and np.issubdtype(chunk.x.dtype, np.inexact):
        finite = np.isfinite(chunk.x.reshape(n, -1)).all(1)
        for i in np.flatnonzero(~finite):
            if rules[i] is None:
                bad = int((~np.isfinite(chunk.x[i])).sum())
                rules[i], reasons[i] = "non_finite", f"{bad} NaN/Inf values in the input"
    if chunk.y is not None:
        top = num_classes or MAX_CLASSES
        out = (chunk.y < 0) | (chunk.y >= top)
        for i in np.flatnonzero(out):
            if rules[i] is None:
                valid = (
                    f"0..{num_classes - 1}"
                    if num_classes
                    else f"0..{MAX_CLASSES - 1:,} (pass --num-classes for more)"
                )
                rules[i], reasons[i] = "label_out_of_range", f"label {chunk.y[i]}; valid: {valid}"
    hashes = _hashes(chunk)
    if chunk.split:
        splits = [chunk.split] * n
    else:  # by content: identical inputs always land in the same split
        val = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction
        splits = np.where(val, "val", "train").tolist()
    known = {s: seen[s].in_sorted(hashes) for s in set(splits) | ({"train"} & set(seen))}
    for i, h in enumerate(hashes.tolist()):
        split = splits[i]
        if rules[i] is not None:
            continue
        if known[split][i] or h in seen[split].recent:
            rules[i], reasons[i] = "duplicate", "same content as an earlier record"
        elif split == "val" and (known["train"][i] or h in seen["train"].recent):
            rules[i], reasons[i] = "cross_split_duplicate", "same content as a train record"
        else:
            seen[split].recent.add(h)
    for s in seen.values():
        s.merge()
    return rules, reasons, splits, hashes


def _hashes(chunk) -> np.ndarray:
    """A 64-bit blake2b of each record's input (and mask): the key for duplicates and splits."""
    digests = []
    for i in range(len(chunk.paths)):
        h = hashlib.blake2b(chunk.x[i], digest_size=8)
        if chunk.mask is not None:
            h.update(chunk.mask[i])
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), "<u8").astype(np.uint64)


def _encode(chunk, rows, layout) -> list[bytes]:
    fixed = np.zeros(len(rows), layout.dtype)
    columns = {"x": chunk.x, "y": chunk.y, "segmentation": chunk.mask}
    for name in layout.fixed:
        fixed[name] = columns[name][rows]
    encoded = {"x": [chunk.x[i] for i in rows]} if layout.encoded else None
    return layout.encode(fixed, encoded)


def _account(chunk, rows, splits, hashes, moments, shape, counts, hash_logs) -> None:
    """Counts written rows: statistics, class counts and the hashes of what the shards hold."""
    train = [i for i in rows if splits[i] == "train"]
    for split, log in hash_logs.items():
        log.write(hashes[[i for i in rows if splits[i] == split]].tobytes())
    if chunk.pixels is not None:
        for i in train:
            moments.add(chunk.pixels[i].reshape(-1, chunk.pixels[i].shape[-1]))
        for i in rows:
            shape.add(chunk.pixels[i].shape)
    elif train:
        x = chunk.x[train]
        moments.add(x.reshape(-1, x.shape[-1] if x.ndim > 1 else 1))
    if chunk.y is not None:
        for split in counts:
            ys = chunk.y[[i for i in rows if splits[i] == split]]
            for label, c in zip(*np.unique(ys, return_counts=True), strict=True):
                counts[split][int(label)] = counts[split].get(int(label), 0) + int(c)


def _prepare(dst: pathlib.Path, overwrite: bool) -> None:
    if (dst / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{dst} already holds a finished conversion; pass --overwrite")
        old = json.loads((dst / MANIFEST).read_text())
        (dst / MANIFEST).unlink()  # first, so a half-removed DST never looks complete
        for split in old.get("splits", {}).values():
            for shard in split["shards"]:
                (dst / shard["file"]).unlink(missing_ok=True)
        (dst / REPORT).unlink(missing_ok=True)
        shutil.rmtree(dst / ".partial", ignore_errors=True)
    elif overwrite:
        shutil.rmtree(dst / ".partial", ignore_errors=True)
    (dst / ".partial").mkdir(parents=True, exist_ok=True)


def _resume(work: pathlib.Path, fingerprint: dict) -> dict:
    fresh = {
        "position": 0,
        "shards": {},
        "hashes": {},
        "moments": None,
        "class_counts": {},
        "bad_bytes": 0,
    }
    file = work / "progress.json"
    if not file.exists():
        for stale in work.iterdir():  # leftovers of a run killed before its first checkpoint
            stale.unlink()
        return fresh
    journal = json.loads(file.read_text())
    if journal["fingerprint"] != fingerprint:
        raise DataError(
            f"{work.parent} holds an unfinished conversion of another source or with other "
            "options; run the same command as before to resume it, or pass --overwrite"
        )
    for stale in work.glob("*.tmp"):
        stale.unlink()
    print(f"resuming at record {journal['position']:,} of {fingerprint['records']:,}")
    return journal


def _read_hashes(work: pathlib.Path, split: str, count: int) -> np.ndarray:
    file = work / f"hashes-{split}.bin"
    if not file.exists():
        return np.zeros(0, np.uint64)
    with open(file, "r+b") as f:
        f.truncate(count * 8)  # drop hashes written after the last checkpoint
    return np.fromfile(file, np.uint64, count)


def _checkpoint(work, fingerprint, position, shards, moments, shape, counts, bad_log, hash_logs):
    for s in shards.values():
        s.close()
    bad_log.flush()
    for f in hash_logs.values():
        f.flush()
    journal = {
        "fingerprint": fingerprint,
        "position": position,
        "shards": {k: s.done for k, s in shards.items()},
        "hashes": {k: f.tell() // 8 for k, f in hash_logs.items()},
        "moments": moments.state(),
        "image_shape": shape.value,
        "class_counts": counts,
        "bad_bytes": bad_log.tell(),
    }
    _atomic_write(work / "progress.json", json.dumps(journal))


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish(src, dst, work, source, layout, shards, moments, counts, options, secs) -> dict:
    by_rule = dict.fromkeys(RULES, 0)
    with open(work / "bad.jsonl") as f:  # streamed: a dataset may drop millions of records
        for line in f:
            by_rule[json.loads(line)["rule"]] += 1
    dropped = sum(by_rule.values())
    labels = [k for c in counts.values() for k in c]
    k = source.num_classes or (max(labels) + 1 if labels else None)
    if moments.mean is None:
        if not source.total:
            raise DataError(f"{src} holds no records; nothing to convert")
        raise DataError(
            f"none of the {source.total:,} records of {src} made it into the train split "
            f"({dropped:,} dropped: {', '.join(f'{n} {r}' for r, n in by_rule.items() if n)}; "
            f"listed in {work / 'bad.jsonl'}); fix the source or the options"
        )
    std = np.sqrt(moments.m2 / max(moments.n, 1))
    splits = {}
    for name, s in shards.items():
        for shard in s.done:
            if (work / shard["file"]).exists():
                os.replace(work / shard["file"], dst / shard["file"])
            elif not (dst / shard["file"]).exists():  # (moved already: a kill in here, rerun)
                raise DataError(
                    f"shard {shard['file']} is in neither {work} nor {dst}; convert again "
                    "with --overwrite"
                )
        hist = [counts[name].get(c, 0) for c in range(k)] if k else []  # k <= MAX_CLASSES
        splits[name] = {
            "records": sum(sh["records"] for sh in s.done),
            "shards": s.done,
            "class_counts": hist,
        }
    _write_report(dst / REPORT, work / "bad.jsonl", src, dropped, by_rule)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "converter_version": _version(),
        "source": {"path": str(src), "kind": source.kind, "records": source.total},
        "options": options,
        "features": layout.features,
        "num_classes": k,
        "class_names": source.class_names,
        "splits": splits,
        "stats": {
            "split": "train",
            "values_per_channel": moments.n,
            "mean": moments.mean.tolist(),
            "std": std.tolist(),
        },
        "cleaning": {"dropped": dropped, "by_rule": by_rule},
        "seconds": round(secs, 3),
    }
    _atomic_write(dst / MANIFEST, json.dumps(manifest, indent=1))  # last: marks DST complete
    shutil.rmtree(work)
    return manifest


def _write_report(path: pathlib.Path, bad_log: pathlib.Path, src, dropped, by_rule) -> None:
    """cleaning_report.json, its records copied line by line from the log (atomic)."""
    head = {"source": str(src), "dropped": dropped, "by_rule": by_rule}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out, open(bad_log) as log:
        out.write(json.dumps(head, indent=1)[:-2] + ',\n "records": [')
        for i, line in enumerate(log):
            out.write(("\n  " if i == 0 else ",\n  ") + line.rstrip("\n"))
        out.write("\n ]\n}\n")
    os.replace(tmp, path)


def _version() -> str:
    try:
        return f"bigtrain {importlib.metadata.version('bigtrain')}, format v{FORMAT_VERSION}"
    except importlib.metadata.PackageNotFoundError:
        return f"bigtrain (source tree), format v{FORMAT_VERSION}"


class _Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, position: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < (0.5 if self.tty else 10):
            return
        self.last = now
        rate = (position - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - position) / rate if rate else 0
        line = (
            f"convert {100 * position / max(self.total, 1):5.1f}%  {position:,}/"
            f"{self.total:,} records  {rate:,.0f} rec/s  ETA {eta:.0f} s"
        )
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr)

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def summary(manifest: dict, dst: pathlib.Path) -> str:
    """The human summary printed at the end: what was kept and what was thrown away, why."""
    sp, secs = manifest["splits"], manifest["seconds"]
    total = sp["train"]["records"] + sp["val"]["records"]
    shards = len(sp["train"]["shards"]) + len(sp["val"]["shards"])
    lines = [
        f"converted {manifest['source']['path']} -> {dst}: {sp['train']['records']:,} train + "
        f"{sp['val']['records']:,} val records in {shards} shards "
        f"({secs:.1f} s, {manifest['source']['records'] / max(secs, 1e-9):,.0f} rec/s)"
    ]
    dropped = manifest["cleaning"]["dropped"]
    if not dropped:
        lines.append("cleaning: no bad records")
    else:
        report = json.loads((dst / REPORT).read_text())
        lines.append(f"cleaning: dropped {dropped:,} records (all listed in {dst / REPORT}):")
        for rule, n in manifest["cleaning"]["by_rule"].items():
            if n:
                ex = next(r for r in report["records"] if r["rule"] == rule)
                lines.append(f"  {RULES[rule]:28s} {n:>8,}  e.g. {ex['path']}: {ex['reason']}")
    if total == 0:
        lines.append("warning: nothing was kept")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bigtrain.data.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a .npz, a folder with x.npy/y.npy, a .csv, or a folder of files")
    p.add_argument("dst", help="output folder: shards, manifest.json, cleaning_report.json")
    p.add_argument("--format", default="auto", help="auto | arrays | csv | folder")
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held out by content hash when the source has no val split",
    )
    p.add_argument("--num-classes", type=int, help="labels >= this are out of range")
    p.add_argument("--label-column", default="label", help="CSV: the label column")
    p.add_argument("--masks", help="folder of segmentation masks, same relative paths as SRC")
    p.add_argument("--channels", type=int, default=3, help="images: 3 (RGB) or 1 (grayscale)")
    p.add_argument("--strict", action="store_true", help="any bad record is an error")
    p.add_argument("--overwrite", action="store_true", help="replace a finished conversion")
    a = p.parse_args(argv)
    try:
        manifest = convert(
            a.src,
            a.dst,
            fmt=a.format,
            shard_size=a.shard_size,
            val_fraction=a.val_fraction,
            num_classes=a.num_classes,
            label_column=a.label_column,
            masks=a.masks,
            channels=a.channels,
            strict=a.strict,
            overwrite=a.overwrite,
            progress=True,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, pathlib.Path(a.dst).absolute()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
