"""The loop compiles once and makes no hidden host-device transfers after step 1."""

import collections
import contextlib

import jax
import jax.numpy as jnp
import pytest

from bigtrain import train

COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        if event == COMPILE:
            counts[kwargs.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _busy(config, steps):
    """Every phase of the loop, often: log, eval (a padded last batch), checkpoint."""
    config.total_steps = steps
    config.log_every, config.eval_every, config.checkpoint_every = 1, 2, 3
    config.eval_batch_size = 24  # 64 test examples: the last eval batch is padded and masked
    return config


def test_a_long_run_compiles_what_a_short_run_compiles(tiny_config, tmp_path):
    train.run(_busy(tiny_config, 2), tmp_path / "warm")  # process-wide caches filled
    with count_compiles() as short:
        train.run(_busy(tiny_config, 2), tmp_path / "short")
    with count_compiles() as long:
        train.run(_busy(tiny_config, 17), tmp_path / "long")
    assert long == short, f"extra compiles in the long run: {long - short}"
    assert long["jit(train_step)"] == 1 and long["jit(eval_step)"] == 1


def test_steady_state_steps_make_no_implicit_transfers(tiny_config, tmp_path):
    c = _busy(tiny_config, 12)
    c.transfer_guard = "disallow"
    metrics = train.run(c, tmp_path / "guarded")  # raises on any implicit transfer
    assert metrics["eval/count"] == 64


def test_the_transfer_guard_catches_a_hidden_sync(tiny_config, tmp_path, monkeypatch):
    """The guard is really on after step 1: a hook that syncs implicitly is stopped."""
    flush = train._flush

    def syncing_flush(writer, pending, *args):
        row = flush(writer, pending, *args)
        if pending["step"] >= 3:
            row["hidden"] = float(jnp.zeros(()) + pending["step"])  # host -> device, implicitly
        return row

    monkeypatch.setattr(train, "_flush", syncing_flush)
    c = _busy(tiny_config, 6)
    c.transfer_guard = "disallow"
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
        train.run(c, tmp_path / "hook")
