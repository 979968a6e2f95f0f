"""Per-layer convolution timings: XLA's convolution, bigtrain's patches x kernel, PyTorch.

    python experiments/bench_conv.py

The 3x3 layers of ResNet-18 on 32x32 inputs (and of the CIFAR ResNet-20), batch 64, float32:
forward alone and forward + both gradients, median of 10 calls each. This is the measurement
behind `model.conv=auto` (bigtrain/models/conv.py): patches win where the output map is small
and the channels many, and lose on large maps with few channels.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _bench import host, median
from jax import lax

from bigtrain.models.conv import patches_conv

LAYERS = [  # input side, channels in, channels out, kernel, stride
    (32, 3, 64, 7, 2),
    (8, 64, 64, 3, 1),
    (8, 64, 128, 3, 2),
    (4, 128, 128, 3, 1),
    (4, 128, 256, 3, 2),
    (2, 256, 256, 3, 1),
    (2, 256, 512, 3, 2),
    (1, 512, 512, 3, 1),
    (32, 16, 16, 3, 1),
    (16, 32, 32, 3, 1),
]
BATCH = 64


def _ms(fn, *args, n: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def _torch_ms(fn, n: int = 10) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def bench_layer(side: int, cin: int, cout: int, k: int, s: int, rng) -> str:
    p = k // 2
    x = jnp.asarray(rng.standard_normal((BATCH, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.05, jnp.float32)
    pads = ((p, p), (p, p))
    dims = ("NHWC", "HWIO", "NHWC")
    convs = {
        "xla": lambda x, w: lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=dims),
        "patches": lambda x, w: patches_conv(x, w, (s, s), pads),
    }
    row = {}
    for name, conv in convs.items():
        fwd = jax.jit(conv)
        both = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), (0, 1)))
        row[name] = (_ms(fwd, x, w), _ms(both, x, w))
    layer = torch.nn.Conv2d(cin, cout, k, s, p, bias=False)
    tx = torch.randn(BATCH, cin, side, side, requires_grad=True)

    def t_fwd():
        with torch.no_grad():
            layer(tx)

    def t_both():
        layer.zero_grad()
        tx.grad = None
        (layer(tx) ** 2).sum().backward()

    out = (side + 2 * p - k) // s + 1
    return (
        f"| {k}x{k}/{s} {cin}->{cout} on {side}x{side} | {out}x{out} | "
        f"{row['xla'][0]:.2f} | {row['patches'][0]:.2f} | {_torch_ms(t_fwd):.2f} | "
        f"{row['xla'][1]:.2f} | {row['patches'][1]:.2f} | {_torch_ms(t_both):.2f} |"
    )


def main() -> None:
    print(f"# {host()}, torch {torch.__version__}; batch {BATCH}, float32, ms (median of 10)")
    print(
        "| layer | out map | XLA fwd | patches fwd | torch fwd | XLA f+b | patches f+b "
        "| torch f+b |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for layer in LAYERS:
        print(bench_layer(*layer, rng), flush=True)


if __name__ == "__main__":
    main()
