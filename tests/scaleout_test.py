"""Gradient accumulation, rematerialization, mixed precision, the AOT check and MFU."""

import json

import jax
import numpy as np
import pytest

from bigtrain import checkpoint, main, train
from bigtrain.config import ConfigError


def _run(config, workdir):
    metrics = train.run(config, workdir)
    return metrics, checkpoint.load_arrays(workdir / "ckpt")["params"]


def _assert_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("mesh", [(1, 1, 1), (8, 1, 1), (2, 4, 1)])
def test_accumulation_equals_the_full_batch_step(tiny_config, tmp_path, mesh):
    """4 microbatches of 8 examples = 1 batch of 32: same losses and params (SGD, fp32)."""
    c = tiny_config
    c.total_steps, c.eval_every, c.checkpoint_every = 8, 0, 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    full_metrics, full = _run(c, tmp_path / "full")
    c.optim.accum_steps = 4
    accum_metrics, accum = _run(c, tmp_path / "accum")
    _assert_close(full, accum, rtol=1e-5, atol=1e-6)
    assert accum_metrics["train/loss"] == pytest.approx(full_metrics["train/loss"], rel=1e-5)
    assert accum_metrics["train/accuracy"] == full_metrics["train/accuracy"]


def test_accumulation_that_does_not_divide_the_batch_is_refused(tiny_config, tmp_path):
    tiny_config.mesh.data = 8  # 32 / 8 devices = 4 examples per device
    tiny_config.optim.accum_steps = 3
    with pytest.raises(ConfigError, match="accum_steps=3 must divide the per-device batch 4"):
        train.run(tiny_config, tmp_path)


def _tiny_vit(c):
    c.model.name, c.model.variant, c.model.patch_size = "vit", "Ti", 4
    c.data.synthetic_shape, c.data.synthetic_size = (8, 8, 3), 64
    c.batch_size, c.eval_batch_size, c.total_steps = 8, 8, 2
    c.eval_every = c.checkpoint_every = 0
    c.optim.learning_rate = 0.01
    c.mesh.data = 1
    return c


def test_remat_policies_train_the_same_params(tiny_config, tmp_path):
    c = _tiny_vit(tiny_config)
    c.model.dropout = 0.1  # the dropout masks must be the same when a block is recomputed
    params = {}
    for policy in ["none", "full", "dots_saveable"]:
        c.model.remat = policy
        params[policy] = _run(c, tmp_path / policy)[1]
    _assert_close(params["none"], params["full"], rtol=1e-5, atol=1e-6)
    _assert_close(params["none"], params["dots_saveable"], rtol=1e-5, atol=1e-6)


def test_remat_policies_recompute_in_the_backward_pass(tiny_config):
    """The compiled step's FLOPs show the recomputation: full redoes each block's forward,
    dots_saveable keeps the matmuls and redoes only the cheap element-wise work.

    (XLA's CPU memory_analysis reports the same temporary peak for every policy, so the
    memory saving itself is a GPU/TPU measurement; see docs/scaling.md.)"""
    c = _tiny_vit(tiny_config)
    c.data.synthetic_shape, c.batch_size = (16, 16, 3), 16
    flops = {}
    for policy in ["none", "full", "dots_saveable"]:
        c.model.remat = policy
        flops[policy] = train.compile_only(c)["perf/flops_per_step_per_device"]
    assert flops["full"] > 1.15 * flops["none"]
    assert flops["none"] <= flops["dots_saveable"] < flops["full"]


def test_remat_on_a_model_without_blocks_is_refused(tiny_config, tmp_path):
    tiny_config.model.remat = "full"
    with pytest.raises(ConfigError, match="model 'mlp' has no blocks to rematerialize"):
        train.run(tiny_config, tmp_path)


def test_bfloat16_compute_keeps_float32_params_and_trains(tiny_config, tmp_path):
    tiny_config.model.dtype = "bfloat16"
    tiny_config.eval_every = 0
    metrics, params = _run(tiny_config, tmp_path)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert np.isfinite(metrics["train/loss"]) and metrics["train/loss"] < 1.3  # ln 4 = 1.39


def test_compile_only_prints_memory_and_flops_without_training(tmp_path, capsys):
    code = main.main(["--config", "configs/mnist1d.py", "--compile_only", "--config.mesh.data=2"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert stats["memory/state_bytes_per_device"] > 0
    assert stats["memory/temp_bytes_per_device"] > 0
    # MNIST-1D CNN, 128 examples over 2 devices: forward + backward is ~3x the forward FLOPs,
    # which are dominated by the convolutions; a loose check that the figure is per device.
    assert 1e7 < stats["perf/flops_per_step_per_device"] < 1e9
    assert not list(tmp_path.iterdir())


def test_accumulation_reports_the_flops_of_the_whole_step(tiny_config):
    tiny_config.mesh.data = 1
    one = train.compile_only(tiny_config)["perf/flops_per_step_per_device"]
    tiny_config.optim.accum_steps = 4
    four = train.compile_only(tiny_config)["perf/flops_per_step_per_device"]
    assert four == pytest.approx(one, rel=0.1)


def test_mfu_is_logged_against_the_configured_peak(tiny_config, tmp_path):
    tiny_config.peak_flops_per_device = 1e12
    tiny_config.mesh.data = 1
    train.run(tiny_config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "perf/mfu" in r]
    assert logged, "no perf/mfu in metrics.jsonl"
    flops = next(
        r["perf/flops_per_step_per_device"] for r in rows if "perf/flops_per_step_per_device" in r
    )
    for r in logged:
        expected = flops * r["perf/steps_per_sec"] / 1e12
        assert r["perf/mfu"] == pytest.approx(expected, rel=1e-6)


def test_cpu_peak_is_measured_when_not_configured(tiny_config):
    assert tiny_config.peak_flops_per_device == 0.0
    peak = train._peak_flops(tiny_config)
    assert peak == train.measured_cpu_peak() and 1e8 < peak < 1e14
