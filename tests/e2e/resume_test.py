"""Resume exactness: 2N steps straight == N steps, then a fresh process resumes for N more."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigtrain import checkpoint, train
from tests.conftest import REPO, write_config_file


def _resume_config(tiny_config):
    c = tiny_config
    c.optim.name = "adamw"  # Adam state must round-trip too
    c.optim.warmup_steps = 5
    c.model.name = "cnn1d"
    c.model.width = 8
    c.model.depth = 2
    c.data.synthetic_shape = (16, 2)
    c.total_steps = 24
    c.checkpoint_every = 6
    c.eval_every = 12
    c.log_every = 4
    return c


def _assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def _cli(cfg_path, workdir):
    return [
        sys.executable,
        "-m",
        "bigtrain.main",
        "--config",
        str(cfg_path),
        "--workdir",
        str(workdir),
    ]


def test_resume_in_a_fresh_process_is_bitwise_exact(tiny_config, tmp_path):
    config = _resume_config(tiny_config)
    straight = train.run(config, tmp_path / "straight")
    train.run(config, tmp_path / "resumed", stop_at_step=12)
    assert checkpoint.load_arrays(tmp_path / "resumed" / "ckpt")["step"] == 12
    proc = subprocess.run(
        _cli(write_config_file(tmp_path, config), tmp_path / "resumed"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 12" in proc.stderr
    a = checkpoint.load_arrays(tmp_path / "straight" / "ckpt")
    b = checkpoint.load_arrays(tmp_path / "resumed" / "ckpt")
    assert int(a["step"]) == int(b["step"]) == 24
    _assert_bitwise_equal(a, b)
    # The logs read as one run: one row per logging step, the same final eval.
    rows = [r for r in _rows(tmp_path / "resumed") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(4, 25, 4))
    assert _rows(tmp_path / "resumed")[-1]["eval/accuracy"] == straight["eval/accuracy"]


@pytest.mark.parametrize("stop", [5, 8])
def test_resume_mid_chunk_is_bitwise_exact(tiny_config, tmp_path, stop):
    """Batches travel 4 to a transfer (data.chunk=4, one device); stopping inside a chunk (5)
    or at its end (8) and resuming gives the uninterrupted run's parameters, bit for bit."""
    config = _resume_config(tiny_config)
    config.mesh.data, config.data.chunk = 1, 4
    config.total_steps, config.checkpoint_every = 14, 0
    train.run(config, tmp_path / "straight")
    train.run(config, tmp_path / "resumed", stop_at_step=stop)
    train.run(config, tmp_path / "resumed")
    _assert_bitwise_equal(
        checkpoint.load_arrays(tmp_path / "straight" / "ckpt"),
        checkpoint.load_arrays(tmp_path / "resumed" / "ckpt"),
    )


def _rows(workdir):
    import json

    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bitwise_exact(tiny_config, tmp_path):
    config = _resume_config(tiny_config)
    config.total_steps = 400
    config.checkpoint_every = 25
    config.eval_every = 100
    train.run(config, tmp_path / "straight")
    cfg_path = write_config_file(tmp_path, config)
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen(
            _cli(cfg_path, tmp_path / "killed"),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(4.0, 9.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc = subprocess.run(
        _cli(cfg_path, tmp_path / "killed"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_bitwise_equal(
        checkpoint.load_arrays(tmp_path / "straight" / "ckpt"),
        checkpoint.load_arrays(tmp_path / "killed" / "ckpt"),
    )
