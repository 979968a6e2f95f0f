"""scikit-learn's bundled 8x8 digits (1,437 train / 360 test, fixed split), a small 2D CNN.

    python -m bigtrain.main --config configs/digits.py --workdir runs/digits

Measured: TBD
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
