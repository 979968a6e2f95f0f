"""ResNet on synthetic images: a benchmark and scaling config, no download.

    python -m bigtrain.main --config configs/resnet.py:variant=cifar --workdir runs/resnet-cifar

Variants: variant=cifar|resnet18|resnet50, image=N (side; default 32, use 224 for the ImageNet
stems), steps=N.
Measured on a 2-core x86_64 CPU VM (shared with other jobs), jax 0.10.2, 2026-12-03:
  ResNet-20 (cifar, 272k params), 300 steps at batch 64: 99.6% test accuracy on the synthetic
  templates; ~1.5 steps/s (98 examples/s; XLA's CPU convolution backward is slow on these
  maps, see docs/performance.md); 277 s wall, 13 s of it compile.
"""

from bigtrain.config import base, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base()
    side = int(args.get("image", "32"))
    c.data.name = "synthetic"
    c.data.synthetic_shape = (side, side, 3)
    c.data.synthetic_classes = 10
    c.data.synthetic_size = 8192
    c.model.name = "resnet"
    c.model.variant = args.get("variant", "cifar")
    c.total_steps = int(args.get("steps", "300"))
    c.batch_size = 64
    c.eval_batch_size = 256
    c.eval_every = 0
    c.log_every = 25
    c.checkpoint_every = 0
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_steps = 30
    return c
