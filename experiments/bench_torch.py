"""bigtrain's compiled train step vs the same model, batch and optimizer in PyTorch (CPU).

    pip install -e ".[bench]" && python experiments/bench_torch.py [--repeats 5]

Each row: one config's architecture rebuilt in PyTorch (same layers, widths, kernel sizes,
padding, activation, BatchNorm, optimizer with weight decay off biases/norms, global-norm
clipping), trained on the same batch size. Both sides time whole optimizer steps on one fixed
batch (bigtrain: the jitted, donated step on device-resident arrays; PyTorch: eager forward,
backward, clip, step); repeats alternate between the two and the median is reported.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np
import torch
from _bench import bare_step_seconds, host, load, median, train
from torch import nn

ROWS = [  # name, config, overrides
    ("MLP (MNIST-1D, 2x100)", "configs/mnist1d.py:model=mlp", []),
    ("MLP (784-1024x3, batch 256)", "configs/mnist1d.py:model=mlp", ["__mlp_big__"]),
    ("1D CNN (MNIST-1D)", "configs/mnist1d.py", []),
    ("2D CNN (digits 8x8)", "configs/digits.py", []),
    ("ResNet-18 (32x32, batch 64)", "configs/resnet.py:variant=resnet18", []),
    ("ResNet-20 (CIFAR, batch 64)", "configs/resnet.py:variant=cifar", []),
]
BIG_MLP = [
    "data.name=synthetic",
    "data.synthetic_shape=(784,)",
    "data.synthetic_size=2048",
    "model.width=1024",
    "model.depth=3",
    "batch_size=256",
]


# --- PyTorch twins of bigtrain's models (layouts follow bigtrain/models/*.py)


def _gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")  # jax.nn.gelu's default


def torch_mlp(features: int, width: int, depth: int, classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(features if i == 0 else width, width), _gelu()]
    layers.append(nn.Linear(width if depth else features, classes))
    return nn.Sequential(*layers)


def torch_cnn(rank: int, shape, width: int, depth: int, k: int, classes: int) -> nn.Module:
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    channels = shape[-1]
    layers: list[nn.Module] = []
    for i in range(depth):  # the first conv keeps the resolution, each later one halves it
        layers += [conv(channels if i == 0 else width, width, k, 2 if i else 1, k // 2), _gelu()]
    length = shape[0]
    for _ in range(depth - 1):
        length = math.ceil(length / 2)
    if rank == 1:
        layers += [nn.Flatten(), nn.Linear(length * width, classes)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


class _Basic(nn.Module):
    def __init__(self, d_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(d_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=0.1, eps=1e-5)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=0.1, eps=1e-5)
        self.short = None
        if stride != 1 or d_in != width:
            self.short = nn.Sequential(
                nn.Conv2d(d_in, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu((x if self.short is None else self.short(x)) + h)


def torch_resnet(variant: str, channels: int, classes: int) -> nn.Module:
    blocks, widths, imagenet = {
        "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), True),
        "cifar": ((3, 3, 3), (16, 32, 64), False),
    }[variant]
    first = widths[0]
    if imagenet:
        stem = [nn.Conv2d(channels, first, 7, 2, 3, bias=False), nn.BatchNorm2d(first), nn.ReLU()]
        stem.append(nn.MaxPool2d(3, 2, 1))
    else:
        stem = [nn.Conv2d(channels, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.ReLU()]
    layers, d = stem, first
    for stage, (n, w) in enumerate(zip(blocks, widths, strict=True)):
        for b in range(n):
            layers.append(_Basic(d, w, 2 if stage and not b else 1))
            d = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(d, classes)]
    return nn.Sequential(*layers)


def torch_twin(config, input_shape, classes: int) -> nn.Module:
    m = config.model
    if m.name == "mlp":
        return torch_mlp(math.prod(input_shape), m.width, m.depth, classes)
    if m.name in ("cnn1d", "cnn2d"):
        rank = int(m.name[3])
        return torch_cnn(rank, input_shape, m.width, m.depth, m.kernel_size, classes)
    if m.name == "resnet":
        return torch_resnet(m.variant or "resnet18", input_shape[-1], classes)
    raise ValueError(f"no PyTorch twin for model {m.name!r}")


def torch_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    decay = [p for p in model.parameters() if p.ndim > 1]  # as bigtrain's decay_mask
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": rest, "weight_decay": 0},
    ]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.b1, o.b2), foreach=True)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum, foreach=True)
    raise ValueError(f"no PyTorch optimizer for {o.name!r}")


def torch_step_seconds(config, model, opt, x, y, steps: int) -> float:
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if config.optim.clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm, foreach=True)
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def to_torch(x: np.ndarray, rank: int) -> torch.Tensor:
    """bigtrain batches are channels-last; PyTorch convolutions take channels first."""
    x = torch.from_numpy(np.array(x))  # a writable copy
    if rank >= 2:
        x = x.movedim(-1, 1).contiguous()
    return x


def bench_row(spec: str, overrides: list[str], repeats: int, budget: float = 1.0) -> dict:
    overrides = BIG_MLP if overrides == ["__mlp_big__"] else overrides
    config = load(spec, overrides + ["mesh.data=1", "data.chunk=1"])
    built = train.build_step(config)
    batch = built.data.next_train()
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    model = torch_twin(config, built.data.input_shape, built.data.num_classes)
    model.train()
    opt = torch_optimizer(config, model)
    rank = len(built.data.input_shape)
    tx, ty = to_torch(x, rank), torch.from_numpy(y.astype(np.int64))
    probe, state = bare_step_seconds(built, 2)
    steps = max(3, int(budget / probe))
    ours, theirs = [], []
    for _ in range(repeats):
        t, state = bare_step_seconds(built, steps, warmup=1, state=state)
        ours.append(t)
        theirs.append(torch_step_seconds(config, model, opt, tx, ty, steps))
    return {
        "ours_ms": 1e3 * median(ours),
        "torch_ms": 1e3 * median(theirs),
        "ratio": median([a / b for a, b in zip(ours, theirs, strict=True)]),
        "torch_params": sum(p.numel() for p in model.parameters()),
        "our_params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(built.abstract["params"])),
        "batch": config.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="substring of the row names to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {host()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| model | batch | params (ours / torch) | bigtrain ms/step | PyTorch ms/step | ratio |")
    print("|---|---|---|---|---|---|")
    for name, spec, overrides in ROWS:
        if args.only and args.only.lower() not in name.lower():
            continue
        r = bench_row(spec, overrides, args.repeats)
        print(
            f"| {name} | {r['batch']} | {r['our_params']:,} / {r['torch_params']:,} | "
            f"{r['ours_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
