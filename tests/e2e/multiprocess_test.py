"""2 processes x 1 device (launch/local.py, gloo on loopback) == 1 process x 2 devices; kill -9.

Each multi-process start costs ~4 s of distributed set-up plus imports and compiles in both
processes on 2 cores, so the runs are shared by the tests through one module fixture.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigtrain import checkpoint
from tests.conftest import REPO, make_tiny_config, write_config_file
from tests.e2e.resume_test import _assert_bitwise_equal

TOTAL, EVERY = 100, 20
PROGRESS = re.compile(r"\[[#.]{20}\] \d+/\d+ \| loss")


def _config():
    """conftest's tiny config (synthetic data, MLP 2x32, plain SGD lr 0.05), 100 steps."""
    c = make_tiny_config()
    c.total_steps, c.eval_every, c.checkpoint_every = TOTAL, 50, EVERY
    return c


def _config_file(directory):
    return write_config_file(directory, _config())


def _env(devices):
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    # conftest gives this process 8 devices through XLA_FLAGS; children get their own count.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _two_processes(cfg, workdir):
    cmd = [sys.executable, "launch/local.py", "-n", "2", "--"]
    cmd += ["--config", str(cfg), "--workdir", str(workdir)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _one_process(cfg, workdir):
    """The same config in one process with two devices."""
    cmd = [sys.executable, "-m", "bigtrain.main", "--config", str(cfg), "--workdir", workdir]
    one = subprocess.run(cmd, cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-4000:]


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _load_state(ckpt_dir):
    """checkpoint.load_arrays with the state's handler named, so no saved sharding is needed.

    An independent reader for test_load_arrays_reads_a_multiprocess_checkpoint.
    """
    manager = ocp.CheckpointManager(
        ckpt_dir.absolute(), item_handlers={"state": ocp.StandardCheckpointHandler()}
    )
    step = manager.latest_step()
    meta = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    manager.close()
    return jax.tree.map(np.asarray, restored["state"])


def _rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config trained by 2 processes x 1 device and by 1 process x 2 devices."""
    root = tmp_path_factory.mktemp("multiprocess")
    cfg = _config_file(root)
    two = _two_processes(cfg, root / "two")
    out_two = _finish(two)
    _one_process(cfg, root / "one")
    return {"root": root, "cfg": cfg, "two": root / "two", "one": root / "one", "out": out_two}


def test_two_processes_equal_one_process_with_two_devices(runs):
    out = runs["out"]
    assert "[0] " in out and "[1] " in out
    assert "process 1 of 2" in out and "2 global devices" in out
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert list(two) == list(range(10, TOTAL + 1, 10))  # one row per logging step, no duplicates
    assert list(one) == list(two)
    np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-5, atol=1e-6)
    a, b = _load_state(runs["one"] / "ckpt"), _load_state(runs["two"] / "ckpt")
    assert int(a["step"]) == int(b["step"]) == TOTAL
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_only_process_0_writes_logs(runs):
    workdir, lines = runs["two"], runs["out"].splitlines()
    assert sorted(p.name for p in workdir.iterdir()) == ["ckpt", "metrics.jsonl", "tb"]
    assert len(list((workdir / "tb").iterdir())) == 1  # one TensorBoard event file
    steps = [r["step"] for r in _rows(workdir)]
    assert len(steps) == len(set(steps))
    assert any(PROGRESS.search(line) for line in lines if line.startswith("[0] "))
    assert not any(PROGRESS.search(line) for line in lines if line.startswith("[1] "))


def test_kill_9_mid_run_then_resume_equals_the_uninterrupted_run(runs):
    workdir = runs["root"] / "killed"
    proc = _two_processes(runs["cfg"], workdir)
    pids = []
    while len(pids) < 2:  # the launcher names its children first
        line = proc.stdout.readline()
        assert line, "the launcher ended before starting its processes"
        if m := re.match(r"\[launcher\] process \d: pid (\d+)", line):
            pids.append(int(m.group(1)))
    deadline = time.monotonic() + 180
    while not (workdir / "ckpt" / str(EVERY)).is_dir():  # the first committed checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint committed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the children die with the launcher (PR_SET_PDEATHSIG)
    proc.communicate(timeout=30)
    for pid in pids:
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived its launcher"
            time.sleep(0.05)
    committed = sorted(int(p.name) for p in (workdir / "ckpt").iterdir() if p.name.isdigit())
    assert committed and max(committed) < TOTAL, f"the kill came too late: {committed}"
    print(f"killed with steps {committed} committed")

    out = _finish(_two_processes(runs["cfg"], workdir))
    assert re.search(rf"\[0\] .*resumed from step {max(committed)}\b", out), out[-3000:]
    assert re.search(rf"\[1\] .*resumed from step {max(committed)}\b", out)
    _assert_bitwise_equal(_load_state(runs["two"] / "ckpt"), _load_state(workdir / "ckpt"))
    assert list(_losses(workdir)) == list(range(10, TOTAL + 1, 10))  # logs read as one run
    assert _losses(workdir) == _losses(runs["two"])


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent (the killed launcher) is gone and init reaps it soon.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_load_arrays_reads_a_multiprocess_checkpoint(runs):
    _assert_bitwise_equal(
        checkpoint.load_arrays(runs["two"] / "ckpt"), _load_state(runs["two"] / "ckpt")
    )


def test_uneven_converted_shards_over_two_processes_equal_one_process(tmp_path):
    """Converted shards whose train and val counts do not divide over the processes: both
    processes finish (no host waits on a missing eval batch), augmentation agrees, every val
    record is evaluated once, and the run equals one process with two devices."""
    from bigtrain.data import convert

    rng = np.random.default_rng(0)
    templates = rng.standard_normal((4, 6, 2)).astype(np.float32)
    y = rng.integers(0, 4, 217)
    x = (0.5 * templates[y] + rng.standard_normal((217, 6, 2))).astype(np.float32)
    np.savez(tmp_path / "src.npz", x=x, y=y)
    manifest = convert.convert(tmp_path / "src.npz", tmp_path / "dst", val_fraction=0.2)
    n_val = manifest["splits"]["val"]["records"]
    # 165 train records: odd; 52 val: the last eval batch of 10 (5 per process) holds 2 real
    # rows, all on process 0, so process 1 evaluates padding only.
    assert manifest["splits"]["train"]["records"] % 2 and n_val % 10 in (1, 2, 3, 4)
    c = _config()
    c.data.name, c.data.path = "arrayrecord", str(tmp_path / "dst")
    c.data.pp, c.data.pp_eval = "random_crop(4, pad=1)|flip_lr|standardize", "center_crop(4)"
    c.batch_size, c.eval_batch_size = 16, 10
    c.total_steps, c.eval_every, c.checkpoint_every = 30, 15, 0
    cfg = write_config_file(tmp_path, c)
    _finish(_two_processes(cfg, tmp_path / "two"))
    _one_process(cfg, tmp_path / "one")
    evals = lambda w: [(r["eval/count"], r["eval/accuracy"]) for r in _rows(w) if "eval/count" in r]
    assert [count for count, _ in evals(tmp_path / "two")] == [n_val, n_val]
    np.testing.assert_allclose(evals(tmp_path / "two"), evals(tmp_path / "one"), rtol=1e-5)
    one_losses, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert list(one_losses) == list(two_losses) == [10, 20, 30]
    np.testing.assert_allclose(list(two_losses.values()), list(one_losses.values()), rtol=1e-5)
