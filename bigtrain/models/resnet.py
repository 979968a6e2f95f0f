"""BatchNorm ResNets: ImageNet resnet18/resnet50 (torchvision layout) and CIFAR ResNet-20.

Convs pad k // 2 on each side, as torchvision does. The last BatchNorm of every residual branch
starts at zero scale, so each block starts as the identity (Goyal et al., 2017). The CIFAR
variant uses 1x1 projection shortcuts where the shape changes (option B in He et al.).
Shape suffixes: B batch, H height, W width, D channels, C classes.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigtrain.models import conv as conv_lib
from bigtrain.models import remat as remat_lib

_part = nnx.with_partitioning
_init = nnx.initializers


def _conv(
    d_in: int, d_out: int, k: int, stride: int, *, dtype: jnp.dtype, conv: str, rngs: nnx.Rngs
) -> nnx.Conv:
    return nnx.Conv(
        d_in,
        d_out,
        (k, k),
        strides=stride,
        padding=((k // 2, k // 2), (k // 2, k // 2)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_part(
            _init.variance_scaling(2.0, "fan_out", "normal"), (None, None, "conv_in", "conv_out")
        ),
        conv_general_dilated=conv_lib.get(conv),
        rngs=rngs,
    )


def _bn(d: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.BatchNorm:
    scale_init = _init.zeros_init() if zero_scale else _init.ones_init()
    return nnx.BatchNorm(
        d,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=_part(scale_init, ("conv_out",)),
        bias_init=_part(_init.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


class _Shortcut(nnx.Module):
    """1x1 conv + BatchNorm projection, used where the residual's shape changes."""

    def __init__(
        self, d_in: int, d_out: int, stride: int, *, dtype: jnp.dtype, conv: str, rngs: nnx.Rngs
    ):
        self.conv = _conv(d_in, d_out, 1, stride, dtype=dtype, conv=conv, rngs=rngs)
        self.bn = _bn(d_out, dtype=dtype, rngs=rngs)

    def __call__(self, x_BHWD: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x_BHWD), use_running_average=not train)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(
        self, d_in: int, width: int, stride: int, *, dtype: jnp.dtype, conv: str, rngs: nnx.Rngs
    ):
        self.conv1 = _conv(d_in, width, 3, stride, dtype=dtype, conv=conv, rngs=rngs)
        self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, 3, 1, dtype=dtype, conv=conv, rngs=rngs)
        self.bn2 = _bn(width, dtype=dtype, rngs=rngs, zero_scale=True)
        self.shortcut = (
            _Shortcut(d_in, width, stride, dtype=dtype, conv=conv, rngs=rngs)
            if stride != 1 or d_in != width
            else None
        )

    def __call__(self, x_BHWD: jax.Array, *, train: bool) -> jax.Array:
        avg = not train
        h_BHWD = jax.nn.relu(self.bn1(self.conv1(x_BHWD), use_running_average=avg))
        h_BHWD = self.bn2(self.conv2(h_BHWD), use_running_average=avg)
        if self.shortcut is not None:
            x_BHWD = self.shortcut(x_BHWD, train=train)
        return jax.nn.relu(x_BHWD + h_BHWD)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (carries the stride, "ResNet v1.5"), 1x1 expand to 4 * width."""

    expansion = 4

    def __init__(
        self, d_in: int, width: int, stride: int, *, dtype: jnp.dtype, conv: str, rngs: nnx.Rngs
    ):
        d_out = width * self.expansion
        self.conv1 = _conv(d_in, width, 1, 1, dtype=dtype, conv=conv, rngs=rngs)
        self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, 3, stride, dtype=dtype, conv=conv, rngs=rngs)
        self.bn2 = _bn(width, dtype=dtype, rngs=rngs)
        self.conv3 = _conv(width, d_out, 1, 1, dtype=dtype, conv=conv, rngs=rngs)
        self.bn3 = _bn(d_out, dtype=dtype, rngs=rngs, zero_scale=True)
        self.shortcut = (
            _Shortcut(d_in, d_out, stride, dtype=dtype, conv=conv, rngs=rngs)
            if stride != 1 or d_in != d_out
            else None
        )

    def __call__(self, x_BHWD: jax.Array, *, train: bool) -> jax.Array:
        avg = not train
        h_BHWD = jax.nn.relu(self.bn1(self.conv1(x_BHWD), use_running_average=avg))
        h_BHWD = jax.nn.relu(self.bn2(self.conv2(h_BHWD), use_running_average=avg))
        h_BHWD = self.bn3(self.conv3(h_BHWD), use_running_average=avg)
        if self.shortcut is not None:
            x_BHWD = self.shortcut(x_BHWD, train=train)
        return jax.nn.relu(x_BHWD + h_BHWD)


# variant -> (block, blocks per stage, stage widths, ImageNet stem?)
VARIANTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), True),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), True),
    "cifar": (BasicBlock, (3, 3, 3), (16, 32, 64), False),
}


class ResNet(nnx.Module):
    """ImageNet stem (7x7/2 conv, 3x3/2 max pool) or CIFAR stem (3x3 conv), stages, GAP, head."""

    input_rank = 3

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        variant: str = "",
        dtype: str = "float32",
        remat: str = "none",
        conv: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.remat = remat_lib.check(remat)
        conv_lib.get(conv)  # fails early on an unknown name
        variant = variant or "resnet18"
        if variant not in VARIANTS:
            raise ValueError(f"unknown resnet variant {variant!r}; valid: {sorted(VARIANTS)}")
        block, blocks_per_stage, widths, imagenet_stem = VARIANTS[variant]
        dtype = jnp.dtype(dtype)
        self.imagenet_stem = imagenet_stem
        d = widths[0]
        k = 7 if imagenet_stem else 3
        self.stem_conv = _conv(
            input_shape[-1], d, k, 2 if imagenet_stem else 1, dtype=dtype, conv=conv, rngs=rngs
        )
        self.stem_bn = _bn(d, dtype=dtype, rngs=rngs)
        blocks = []
        for stage, (n, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(d, width, stride, dtype=dtype, conv=conv, rngs=rngs))
                d = width * block.expansion
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(
            d,
            num_classes,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_part(_init.lecun_normal(), ("conv_out", "classes")),
            bias_init=_part(_init.zeros_init(), ("classes",)),
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        x_BHWD = self.stem_bn(self.stem_conv(x), use_running_average=not train)
        x_BHWD = jax.nn.relu(x_BHWD)
        if self.imagenet_stem:
            x_BHWD = nnx.max_pool(x_BHWD, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x_BHWD = remat_lib.call(block, x_BHWD, self.remat, train=train)
        logits_BC = self.head(jnp.mean(x_BHWD, axis=(1, 2)))
        return logits_BC.astype(jnp.float32)
