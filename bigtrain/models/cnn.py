"""Small plain CNNs (conv + GELU stacks) for 1D signals and 2D images.

The first conv keeps the resolution; each later conv halves it (stride 2, "SAME" padding).
Shape suffixes: B batch, L length, H height, W width, D channels, C classes.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigtrain.models import conv as conv_lib

_part = nnx.with_partitioning
_init = nnx.initializers


def _conv_stack(
    in_channels: int,
    *,
    width: int,
    depth: int,
    kernel_size: int,
    spatial_rank: int,
    dtype: jnp.dtype,
    conv: str,
    rngs: nnx.Rngs,
) -> nnx.List:
    if depth < 1:
        raise ValueError(f"cnn{spatial_rank}d needs depth >= 1, got {depth}")
    names = (None,) * spatial_rank + ("conv_in", "conv_out")
    return nnx.List(
        [
            nnx.Conv(
                in_channels if i == 0 else width,
                width,
                (kernel_size,) * spatial_rank,
                strides=1 if i == 0 else 2,
                padding="SAME",
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=_part(_init.he_normal(), names),
                bias_init=_part(_init.zeros_init(), ("conv_out",)),
                conv_general_dilated=conv_lib.get(conv),
                rngs=rngs,
            )
            for i in range(depth)
        ]
    )


def _head(d_in: int, num_classes: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        num_classes,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_part(_init.lecun_normal(), ("conv_out", "classes")),
        bias_init=_part(_init.zeros_init(), ("classes",)),
        rngs=rngs,
    )


class CNN1D(nnx.Module):
    """MNIST-1D style CNN on (L, D) signals: conv stack, flatten, Linear head."""

    input_rank = 2

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        kernel_size: int = 5,
        dtype: str = "float32",
        conv: str = "auto",
        rngs: nnx.Rngs,
    ):
        length, channels = input_shape
        dtype = jnp.dtype(dtype)
        self.convs = _conv_stack(
            channels,
            width=width,
            depth=depth,
            kernel_size=kernel_size,
            spatial_rank=1,
            dtype=dtype,
            conv=conv,
            rngs=rngs,
        )
        for _ in range(depth - 1):  # each stride-2 "SAME" conv: L -> ceil(L / 2)
            length = math.ceil(length / 2)
        self.head = _head(length * width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        x_BLD = x
        for conv in self.convs:
            x_BLD = jax.nn.gelu(conv(x_BLD))
        logits_BC = self.head(x_BLD.reshape(x_BLD.shape[0], -1))
        return logits_BC.astype(jnp.float32)


class CNN2D(nnx.Module):
    """Plain CNN on (H, W, D) images: conv stack, global average pool, Linear head."""

    input_rank = 3

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        kernel_size: int = 5,
        dtype: str = "float32",
        conv: str = "auto",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.convs = _conv_stack(
            input_shape[-1],
            width=width,
            depth=depth,
            kernel_size=kernel_size,
            spatial_rank=2,
            dtype=dtype,
            conv=conv,
            rngs=rngs,
        )
        self.head = _head(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        x_BHWD = x
        for conv in self.convs:
            x_BHWD = jax.nn.gelu(conv(x_BHWD))
        logits_BC = self.head(jnp.mean(x_BHWD, axis=(1, 2)))
        return logits_BC.astype(jnp.float32)
