"""bigtrain: pure-JAX training on large datasets, from a laptop CPU to a TPU pod.

Notebook use: `bigtrain.run(bigtrain.load_config("configs/mnist1d.py"), "runs/x")`.
"""

from bigtrain.config import ConfigError, base
from bigtrain.config import load as load_config


def run(config, workdir, **kwargs):
    """Trains `config` in `workdir`, resuming from its checkpoints; returns the final metrics."""
    from bigtrain import train

    return train.run(config, workdir, **kwargs)


__all__ = ["ConfigError", "base", "load_config", "run"]
