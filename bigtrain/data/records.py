"""The on-disk format of a converted dataset: ArrayRecord shards beside a `manifest.json`.

A record holds its fixed-shape features packed back to back (one little-endian numpy structured
dtype, so a batch of records decodes with a single `np.frombuffer`), then each encoded feature
(the original PNG/JPEG bytes of an image) as a uint32 length and its bytes. The manifest names the
features with dtype, shape and encoding; a directory without a manifest is not a finished
conversion and is never read.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

import numpy as np

FORMAT = "bigtrain-arrayrecord"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "cleaning_report.json"
SPLITS = ("train", "val")

_LEN = struct.Struct("<I")


class DataError(ValueError):
    """Unreadable or inconsistent data; the message names the file (and record) and the fix."""


class Layout:
    """Encodes and decodes records from the manifest's `features` table."""

    def __init__(self, features: dict[str, dict[str, Any]]):
        self.features = features
        self.fixed = [k for k, f in features.items() if f["encoding"] == "raw"]
        self.encoded = [k for k, f in features.items() if f["encoding"] == "image"]
        unknown = set(features) - set(self.fixed) - set(self.encoded)
        if unknown:
            raise DataError(
                f"features {sorted(unknown)} have an unknown encoding; known: raw, image"
            )
        self.dtype = np.dtype(
            [
                (k, np.dtype(features[k]["dtype"]).newbyteorder("<"), tuple(features[k]["shape"]))
                for k in self.fixed
            ]
        )

    def encode(
        self, fixed: np.ndarray, encoded: dict[str, list[bytes]] | None = None
    ) -> list[bytes]:
        """One record per row of the structured array `fixed` (dtype `self.dtype`)."""
        buf = np.ascontiguousarray(fixed, self.dtype).tobytes()
        size = self.dtype.itemsize
        out = [buf[i * size : (i + 1) * size] for i in range(len(fixed))]
        for name in self.encoded:
            out = [r + _LEN.pack(len(b)) + b for r, b in zip(out, encoded[name], strict=True)]
        return out

    def decode(self, blobs: list[bytes]) -> tuple[dict[str, Any], dict[int, str]]:
        """A batch dict (fixed features as arrays, encoded ones as lists of bytes) and the rows
        that could not be decoded, each with its reason; those rows hold zeros."""
        size, n = self.dtype.itemsize, len(blobs)
        bad: dict[int, str] = {}
        if not self.encoded:
            lengths = np.fromiter(map(len, blobs), np.int64, n)
            if (lengths == size).all():
                fixed = np.frombuffer(b"".join(blobs), self.dtype)
                return {k: fixed[k] for k in self.fixed}, bad
            for i in np.flatnonzero(lengths != size):
                bad[int(i)] = f"record is {lengths[i]} bytes; the manifest's features need {size}"
            blobs = [b if i not in bad else bytes(size) for i, b in enumerate(blobs)]
            fixed = np.frombuffer(b"".join(blobs), self.dtype)
            return {k: fixed[k] for k in self.fixed}, bad
        heads, encoded = [], {k: [] for k in self.encoded}
        for i, blob in enumerate(blobs):
            parts = self._split(blob, size)
            if isinstance(parts, str):
                bad[i] = parts
                heads.append(bytes(size))
                for k in self.encoded:
                    encoded[k].append(b"")
                continue
            heads.append(blob[:size])
            for k, part in zip(self.encoded, parts, strict=True):
                encoded[k].append(part)
        fixed = np.frombuffer(b"".join(heads), self.dtype)
        return {**{k: fixed[k] for k in self.fixed}, **encoded}, bad

    def _split(self, blob: bytes, size: int) -> list[bytes] | str:
        pos, parts = size, []
        for name in self.encoded:
            if pos + 4 > len(blob):
                return f"record is truncated before feature {name!r}"
            (length,) = _LEN.unpack_from(blob, pos)
            pos += 4
            if pos + length > len(blob):
                return f"record is truncated inside feature {name!r}"
            parts.append(blob[pos : pos + length])
            pos += length
        if pos != len(blob):
            return f"record has {len(blob) - pos} unexpected trailing bytes"
        return parts


def read_manifest(path: str | pathlib.Path) -> dict[str, Any]:
    """The manifest of a finished conversion; a clear error for anything else."""
    root = pathlib.Path(path)
    file = root / MANIFEST
    if not file.is_file():
        if (root / ".partial").is_dir():
            raise DataError(
                f"{root} holds an unfinished conversion (no {MANIFEST}); run the same "
                "`python -m bigtrain.data.convert` command again to resume it"
            )
        raise DataError(
            f"{root} has no {MANIFEST}; convert the data first: "
            f"python -m bigtrain.data.convert SRC {root}"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{file} is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
            f"this bigtrain reads {FORMAT!r} v{FORMAT_VERSION}: convert the source again"
        )
    return manifest
