"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_tiny_config():
    """A config that trains in about a second: synthetic inputs, a small MLP, plain SGD."""
    from bigtrain.config import base

    c = base()
    c.data.name = "synthetic"
    c.data.synthetic_shape = (16,)
    c.data.synthetic_classes = 4
    c.data.synthetic_size = 512
    c.model.name = "mlp"
    c.model.width = 32
    c.model.depth = 2
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.05
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.total_steps = 40
    c.batch_size = 32
    c.eval_batch_size = 40
    c.eval_every = 20
    c.log_every = 10
    c.checkpoint_every = 20
    return c


@pytest.fixture
def tiny_config():
    return make_tiny_config()


def write_config_file(directory: pathlib.Path, config, inject: str = "") -> pathlib.Path:
    """`config` as a config file the CLI can load (for tests that start fresh processes);
    `inject` is code that runs when that process imports it (fault injection)."""
    path = directory / "cfg.py"
    path.write_text(
        textwrap.dedent(f"""
        from ml_collections import ConfigDict
        from bigtrain.config import base

        def get_config(arg=None):
            c = base()
            c.unlock()
            c.update(ConfigDict({config.to_dict()!r}))
            c.lock()
            return c
    """)
        + textwrap.dedent(inject)
    )
    return path
