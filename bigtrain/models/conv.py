"""Convolution for `nnx.Conv` that steps around XLA:CPU's slow path on small feature maps.

XLA's CPU convolution runs 10-30x below its own matmul rate when the output feature map has
only a few positions and many channels (ResNet-18 on 32x32 images ends on 2x2 and 1x1 maps
with 256-512 channels: 50 ms for a 3x3 conv that PyTorch does in 1.6 ms). There we compute the
convolution as patches x kernel: the k^d shifted views of the padded input, concatenated along
channels, times the kernel reshaped to (k^d * Cin, Cout) - one matmul, whose gradient is a
matmul and slices. Everywhere else, and on GPU/TPU (cuDNN and the TPU compiler are fast on
every shape), it is `lax.conv_general_dilated`. Both compute the same sums in a different
order: equal to float32 rounding (tests/conv_test.py). Measured in docs/performance.md.

`model.conv` picks: "auto" (the rule above), "xla" (always lax), "patches" (always patches
where supported: no dilation, no feature groups, channels-last).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# "auto" uses patches on CPU for outputs of at most this many positions per example with at
# least this many input channels: there lax's convolution is slowest and the patches are small.
# (With few channels the concatenation costs more than it saves: the MNIST-1D CNN slows down.)
PATCHES_MAX_POSITIONS = 16
PATCHES_MIN_CHANNELS = 64


def _channels_last(dimension_numbers, rank: int) -> bool:
    if dimension_numbers is None:
        return False
    expected = lax.conv_dimension_numbers(
        (1,) * (rank + 2),
        (1,) * (rank + 2),
        ("N" + "HWD"[:rank] + "C", "HWD"[:rank] + "IO", "N" + "HWD"[:rank] + "C"),
    )
    return tuple(dimension_numbers) == tuple(expected)


def _supported(rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, **kw):
    rank = rhs.ndim - 2
    ones = (None, 1, (1,) * rank)
    return (
        feature_group_count == 1
        and kw.get("batch_group_count", 1) == 1
        and (lhs_dilation in ones or tuple(lhs_dilation) == (1,) * rank)
        and (rhs_dilation in ones or tuple(rhs_dilation) == (1,) * rank)
        and _channels_last(dimension_numbers, rank)
    )


def _pads(lhs, rhs, window_strides, padding) -> list[tuple[int, int]]:
    spatial, window = lhs.shape[1:-1], rhs.shape[:-2]
    if isinstance(padding, str):
        return list(lax.padtype_to_pads(spatial, window, window_strides, padding))
    return [tuple(p) for p in padding]


def patches_conv(lhs, rhs, window_strides, padding, precision=None, preferred_element_type=None):
    """Channels-last convolution as one matmul: (B, *out, K^d * Cin) @ (K^d * Cin, Cout)."""
    window, rank = rhs.shape[:-2], rhs.ndim - 2
    strides = tuple(window_strides)
    pads = _pads(lhs, rhs, strides, padding)
    x = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
    out = [
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(lhs.shape[1:-1], pads, window, strides, strict=True)
    ]
    views = []
    for offset in np.ndindex(*window):  # row-major over the window: matches rhs's layout
        start = (0, *offset, 0)
        limit = (
            x.shape[0],
            *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides, strict=True)),
        )
        limit = (*limit, x.shape[-1])
        views.append(lax.slice(x, start, limit, (1, *strides, 1)))
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    kernel = rhs.reshape(math.prod(window) * rhs.shape[-2], rhs.shape[-1])
    y = jnp.dot(patches, kernel, precision=precision, preferred_element_type=preferred_element_type)
    assert y.shape[1 : 1 + rank] == tuple(out)
    return y


def _conv(impl: str):
    def conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        precision=None,
        **kwargs,
    ):
        use_patches = impl != "xla" and _supported(
            rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, **kwargs
        )
        if use_patches and impl == "auto":
            pads = _pads(lhs, rhs, tuple(window_strides), padding)
            positions = math.prod(
                (n + lo + hi - k) // s + 1
                for n, (lo, hi), k, s in zip(
                    lhs.shape[1:-1], pads, rhs.shape[:-2], window_strides, strict=True
                )
            )
            use_patches = (
                jax.default_backend() == "cpu"
                and positions <= PATCHES_MAX_POSITIONS
                and rhs.shape[-2] >= PATCHES_MIN_CHANNELS
            )
        if use_patches:
            return patches_conv(
                lhs,
                rhs,
                window_strides,
                padding,
                precision=precision,
                preferred_element_type=kwargs.get("preferred_element_type"),
            )
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )

    conv_general_dilated.__name__ = f"conv_{impl}"
    return conv_general_dilated


IMPLS = {name: _conv(name) for name in ("auto", "xla", "patches")}


def get(impl: str):
    """The `conv_general_dilated` for nnx.Conv named by `model.conv`."""
    if impl not in IMPLS:
        raise ValueError(f"unknown conv implementation {impl!r}; valid: {sorted(IMPLS)}")
    return IMPLS[impl]
