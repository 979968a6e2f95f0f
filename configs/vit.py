"""ViT on synthetic 32x32x3 images: a benchmark and scaling config, no download.

    python -m bigtrain.main --config configs/vit.py:size=Ti,patch=8 --workdir runs/vit-ti

Variants: size=Ti|S|B, patch=N, image=N (side), steps=N.
Measured on a 2-core x86_64 CPU VM (shared with other jobs), jax 0.10.2, 2026-12-03:
  ViT-Ti/8 (5.4M params, 17 tokens), 200 steps at batch 64: 100% test accuracy on the synthetic
  templates (eval loss 0.095); ~1.0 steps/s (66 examples/s); 224 s wall, 12 s of it compile.
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
    c.model.name = "vit"
    c.model.variant = args.get("size", "Ti")
    c.model.patch_size = int(args.get("patch", "8"))
    c.total_steps = int(args.get("steps", "200"))
    c.batch_size = 64
    c.eval_batch_size = 256
    c.eval_every = 0
    c.log_every = 25
    c.checkpoint_every = 0
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 30
    c.loss.label_smoothing = 0.1
    return c
