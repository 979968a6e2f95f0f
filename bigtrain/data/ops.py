"""Preprocessing ops, configured by a string like big_vision's `pp`:

    data.pp = "decode|resize(36)|random_crop(32)|flip_lr|standardize"

Each op transforms a whole local batch with numpy. A random op draws for the *global* batch from an
RNG seeded by (seed, global batch index, op position) and keeps this process's rows, so the
augmentation of an example is the same whatever the process or worker count, and after a resume.
`OPS` is the only list of op names.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from bigtrain.data.records import DataError

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Env:
    """What ops know about the dataset: train statistics, classes, image channels."""

    mean: np.ndarray
    std: np.ndarray
    num_classes: int
    channels: int = 3


@dataclasses.dataclass
class Context:
    """One local batch's place in the global stream, and its rows found bad so far."""

    seed: int
    step: int  # the global batch index
    rows: slice  # this process's rows of the global batch
    global_batch: int
    env: Env
    bad: dict[int, str] = dataclasses.field(default_factory=dict)
    op_index: int = 0
    padding: frozenset[int] = frozenset()  # eval rows past the end: never reported or counted

    def real_bad(self) -> dict[int, str]:
        """The bad rows that hold real records."""
        return {r: why for r, why in self.bad.items() if r not in self.padding}

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.step, self.op_index])

    def uniform(self, *shape: int) -> np.ndarray:
        """Uniform [0, 1) draws for this process's rows; row r is the same on any process count."""
        return self.rng().random((self.global_batch, *shape))[self.rows]


Op = Callable[[Batch, Context], Batch]


def _check_decoded(x) -> None:
    if not isinstance(x, np.ndarray) and any(isinstance(xi, bytes) for xi in x):
        raise DataError(
            "the inputs are still encoded images (PNG/JPEG bytes); start data.pp and "
            "data.pp_eval with decode, e.g. decode|resize(32)|standardize"
        )


def _images(batch: Batch, ctx: Context) -> np.ndarray:
    """The inputs as one array; rows of a shape other than the most common are marked bad."""
    x = batch["x"]
    if isinstance(x, np.ndarray):
        return x
    _check_decoded(x)
    good = [i for i in range(len(x)) if i not in ctx.bad]
    shapes = collections.Counter(x[i].shape for i in good)
    if not shapes:
        return np.zeros((len(x), 1), np.float32)
    shape = shapes.most_common(1)[0][0]
    dtype = x[good[0]].dtype
    out = np.zeros((len(x), *shape), dtype)
    for i, xi in enumerate(x):
        if i in ctx.bad:
            continue
        if xi.shape != shape:
            ctx.bad[i] = f"input has shape {xi.shape}; the rest of its batch has {shape}"
        else:
            out[i] = xi
    return out


def decode(channels: int | None = None) -> Op:
    """Encoded images (PNG/JPEG bytes) -> uint8 arrays (H, W, C); sizes may differ until resize."""
    from bigtrain.data.readers import decode_image

    def op(batch: Batch, ctx: Context) -> Batch:
        if isinstance(batch["x"], np.ndarray):
            return batch  # stored raw: nothing to decode
        c = channels or ctx.env.channels
        out = []
        for i, data in enumerate(batch["x"]):
            try:
                out.append(decode_image(data, c) if i not in ctx.bad else np.zeros((1, 1, c)))
            except Exception as e:  # noqa: BLE001 - any decoder failure skips just that record
                ctx.bad[i] = f"cannot decode image: {type(e).__name__}: {e}"
                out.append(np.zeros((1, 1, c), np.uint8))
        return {**batch, "x": out}

    return op


def _bilinear(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Resizes the spatial axes (all but the first and last) of (N, ..., C), half-pixel centers."""
    out = x.astype(np.float32)
    for axis, new in enumerate(size, start=1):
        old = out.shape[axis]
        if old == new:
            continue
        pos = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, old - 1)
        w = (pos - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis) * (1 - w) + np.take(out, hi, axis) * w
    return out.astype(np.float32)


def resize(*size: int) -> Op:
    """Bilinear resize of the spatial axes to `size` (one number: square/cube)."""

    def op(batch: Batch, ctx: Context) -> Batch:
        x = batch["x"]
        _check_decoded(x)
        items = list(x) if isinstance(x, list) else [x]
        ndim = items[0].ndim - (0 if isinstance(x, list) else 1) - 1  # spatial axes
        target = size * ndim if len(size) == 1 else size
        if len(target) != ndim:
            raise DataError(f"resize{size}: inputs have {ndim} spatial axes")
        if isinstance(x, np.ndarray):
            return {**batch, "x": _bilinear(x, target)}
        out = np.stack([_bilinear(xi[None], target)[0] for xi in x])
        return {**batch, "x": out}

    return op


def _crop(x: np.ndarray, size: tuple[int, ...], starts: np.ndarray) -> np.ndarray:
    """Per-row crops of (N, *spatial, C) at integer `starts` (N, len(size))."""
    out = np.empty((len(x), *size, x.shape[-1]), x.dtype)
    for i, s in enumerate(starts):
        out[i] = x[(i, *[slice(a, a + n) for a, n in zip(s, size, strict=True)])]
    return out


def _crop_op(size: tuple[int, ...], pad: int, random: bool) -> Op:
    def op(batch: Batch, ctx: Context) -> Batch:
        x = _images(batch, ctx)
        spatial = x.shape[1:-1]
        target = size * len(spatial) if len(size) == 1 else size
        if len(target) != len(spatial):
            raise DataError(
                f"cannot crop {tuple(target)} ({len(target)} axes) from inputs of spatial "
                f"shape {spatial} ({len(spatial)} axes); give one size or one per axis"
            )
        if pad:
            x = np.pad(x, [(0, 0)] + [(pad, pad)] * len(spatial) + [(0, 0)])
        room = np.array(x.shape[1:-1]) - np.array(target)
        if (room < 0).any():
            raise DataError(f"cannot crop {tuple(target)} from inputs of spatial shape {spatial}")
        if random:
            starts = np.floor(ctx.uniform(len(target)) * (room + 1)).astype(np.int64)
        else:
            starts = np.tile(room // 2, (len(x), 1))
        return {**batch, "x": _crop(x, tuple(target), starts)}

    return op


def random_crop(*size: int, pad: int = 0) -> Op:
    """A random crop of `size` (after zero-padding each side by `pad`); 2D or 3D."""
    return _crop_op(size, pad, random=True)


def center_crop(*size: int) -> Op:
    return _crop_op(size, 0, random=False)


def flip_lr(p: float = 0.5) -> Op:
    """Mirrors the width axis (the last spatial axis) of each row with probability p."""

    def op(batch: Batch, ctx: Context) -> Batch:
        x = _images(batch, ctx).copy()
        if x.ndim < 3:
            raise DataError(
                f"flip_lr mirrors a spatial axis; inputs of shape {x.shape[1:]} have none "
                "(tabular features): drop flip_lr from data.pp"
            )
        flip = ctx.uniform() < p
        x[flip] = x[flip][..., ::-1, :]
        return {**batch, "x": x}

    return op


def standardize() -> Op:
    """(x - mean) / std per channel, with the train split's statistics (the manifest's)."""

    def op(batch: Batch, ctx: Context) -> Batch:
        x = _images(batch, ctx).astype(np.float32)  # a copy: updated in place below
        x -= ctx.env.mean  # in place: the same values as (x - mean) / std, 2x faster
        x /= ctx.env.std
        return {**batch, "x": x}

    return op


def _soft(y: np.ndarray, k: int) -> np.ndarray:
    return y.astype(np.float32) if y.ndim == 2 else np.eye(k, dtype=np.float32)[y]


def onehot(num_classes: int | None = None) -> Op:
    """Integer labels -> one-hot float rows (B, K)."""

    def op(batch: Batch, ctx: Context) -> Batch:
        return {**batch, "y": _soft(batch["y"], num_classes or ctx.env.num_classes)}

    return op


def _partners(n: int) -> np.ndarray:
    """Row r mixes with row r ^ 1 (0<->1, 2<->3, ...; an odd last row with itself). The order
    is already shuffled, so these are random pairs, and with an even local batch they are the
    same pairs whatever the process count (the batch reversed would not be)."""
    partner = np.arange(n) ^ 1
    if n % 2:
        partner[-1] = n - 1
    return partner


def mixup(alpha: float = 0.2) -> Op:
    """Mixes row pairs (see `_partners`) with one ratio ~ Beta(alpha, alpha) per global batch."""

    def op(batch: Batch, ctx: Context) -> Batch:
        x = _images(batch, ctx).astype(np.float32)
        y = _soft(batch["y"], ctx.env.num_classes)
        lam = np.float32(ctx.rng().beta(alpha, alpha))
        p = _partners(len(x))
        return {**batch, "x": lam * x + (1 - lam) * x[p], "y": lam * y + (1 - lam) * y[p]}

    op.mixes_rows = True
    return op


def cutmix(alpha: float = 1.0) -> Op:
    """Pastes a box of its partner row (see `_partners`) into each row; labels mix by area."""

    def op(batch: Batch, ctx: Context) -> Batch:
        x = _images(batch, ctx).copy()
        if x.ndim != 4:
            raise DataError(
                f"cutmix pastes 2D boxes into images (B, H, W, C); inputs are {x.shape}: "
                "use mixup for other shapes"
            )
        y = _soft(batch["y"], ctx.env.num_classes)
        rng = ctx.rng()
        lam = rng.beta(alpha, alpha)
        h, w = x.shape[1:3]
        bh, bw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        p = _partners(len(x))
        x[:, top : top + bh, left : left + bw] = x[p, top : top + bh, left : left + bw]
        area = np.float32(bh * bw / (h * w))
        return {**batch, "x": x, "y": (1 - area) * y + area * y[p]}

    op.mixes_rows = True
    return op


def _slice_op(axis: int, random: bool) -> Op:
    def op(batch: Batch, ctx: Context) -> Batch:
        x = _images(batch, ctx)
        if x.ndim != 5:
            raise DataError(f"slices need volumes (B, D, H, W, C); inputs are {x.shape}")
        n = x.shape[1 + axis]
        at = np.floor(ctx.uniform() * n).astype(np.int64) if random else np.full(len(x), n // 2)
        return {**batch, "x": np.stack([np.take(xi, a, axis) for xi, a in zip(x, at, strict=True)])}

    return op


def random_slice(axis: int = 0) -> Op:
    """A random 2D slice of each 3D volume along spatial `axis` (0, 1 or 2)."""
    return _slice_op(axis, random=True)


def center_slice(axis: int = 0) -> Op:
    return _slice_op(axis, random=False)


OPS: dict[str, Callable[..., Op]] = {
    "decode": decode,
    "resize": resize,
    "random_crop": random_crop,
    "center_crop": center_crop,
    "flip_lr": flip_lr,
    "standardize": standardize,
    "onehot": onehot,
    "mixup": mixup,
    "cutmix": cutmix,
    "random_slice": random_slice,
    "center_slice": center_slice,
}


def parse(spec: str) -> list[tuple[str, Op]]:
    """'resize(32)|flip_lr' -> [(text, op), ...]; errors name the op and what is valid."""
    out = []
    for text in (t.strip() for t in spec.split("|")):
        if not text:
            continue
        try:
            node = ast.parse(text, mode="eval").body
            name = node.func.id if isinstance(node, ast.Call) else node.id
            args = [ast.literal_eval(a) for a in getattr(node, "args", [])]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in getattr(node, "keywords", [])}
        except (SyntaxError, ValueError, AttributeError):
            raise DataError(f"cannot parse op {text!r}; write e.g. resize(32) or flip_lr") from None
        if name not in OPS:
            raise DataError(f"unknown op {name!r} in {spec!r}; known: {', '.join(sorted(OPS))}")
        try:
            out.append((text, OPS[name](*args, **kwargs)))
        except TypeError:
            sig = inspect.signature(OPS[name])
            raise DataError(f"op {text!r}: arguments do not fit {name}{sig}") from None
    return out


class Chain:
    """The ops of one pp string, applied in order; bad rows are replaced by good ones after
    each op (`on_bad` sees them first and may raise), so no op computes on garbage."""

    def __init__(self, spec: str, env: Env):
        self.spec, self.env, self.ops = spec, env, parse(spec)

    def __call__(self, batch: Batch, ctx: Context, on_bad: Callable[[dict[int, str]], None]):
        reported: set[int] = set()
        batch = self._patch(batch, ctx, reported, on_bad)
        for i, (_, op) in enumerate(self.ops):
            ctx.op_index = i
            if getattr(op, "mixes_rows", False):  # stack and patch first: never mix in a bad row
                batch = self._patch({**batch, "x": _images(batch, ctx)}, ctx, reported, on_bad)
            batch = self._patch(op(batch, ctx), ctx, reported, on_bad)
        x = _images(batch, ctx)
        batch = self._patch({**batch, "x": x}, ctx, reported, on_bad)
        batch["x"] = batch["x"].astype(np.float32, copy=False)  # no copy when already float32
        y = batch["y"]
        batch["y"] = y.astype(np.int32 if y.ndim == 1 else np.float32, copy=False)
        return batch

    @staticmethod
    def _patch(batch: Batch, ctx: Context, reported: set[int], on_bad) -> Batch:
        new = {r: why for r, why in ctx.bad.items() if r not in reported}
        if not new:
            return batch
        real_new = {r: why for r, why in new.items() if r not in ctx.padding}
        if real_new:
            on_bad(real_new)
        reported.update(new)
        n = len(batch["y"])
        good = [r for r in range(n) if r not in ctx.bad]
        if not good:
            if not ctx.real_bad():  # only eval padding, masked out: nothing to replace it with
                return batch
            raise DataError(f"every record of global batch {ctx.step} is unreadable: {new}")
        out = dict(batch)
        for key, value in batch.items():
            if key == "mask":  # eval: a bad row is left out of the metrics
                value = value.copy()
                value[list(ctx.bad)] = 0
            else:
                value = value.copy() if isinstance(value, np.ndarray) else list(value)
                for r in new:  # the next good row, wrapping: deterministic within the batch
                    value[r] = value[min(good, key=lambda g, r=r: (g - r) % n)]
            out[key] = value
        return out
