"""Each failure is injected for real: signals, damaged checkpoints, NaNs, hangs, full disks."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from bigtrain import checkpoint, resilience, train
from bigtrain.config import ConfigError
from tests.conftest import REPO, write_config_file
from tests.e2e.resume_test import _assert_bitwise_equal, _cli

SLOW_STEPS = """
import time
import bigtrain.data as _d
_next = _d.Data.next_train
def _slow(self):
    time.sleep(0.01)
    return _next(self)
_d.Data.next_train = _slow
"""


def _wait_for_step(workdir: pathlib.Path, step: int, proc, timeout=120.0) -> None:
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, "training exited before the fault was injected"
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if rows and rows[-1]["step"] >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_cleanly_and_resumes_exactly(tiny_config, tmp_path, sig):
    c = tiny_config
    c.total_steps, c.checkpoint_every, c.log_every, c.eval_every = 400, 1000, 5, 0
    train.run(c, tmp_path / "straight")
    cfg = write_config_file(tmp_path, c, SLOW_STEPS)
    proc = subprocess.Popen(
        _cli(cfg, tmp_path / "run"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(tmp_path / "run", 20, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted: checkpoint saved; run the same command again to resume" in out
    stopped = checkpoint.load_arrays(tmp_path / "run" / "ckpt")
    assert 20 <= int(stopped["step"]) < 400  # saved where it stopped, not at a periodic step
    proc = subprocess.run(
        _cli(cfg, tmp_path / "run"), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_bitwise_equal(
        checkpoint.load_arrays(tmp_path / "straight" / "ckpt"),
        checkpoint.load_arrays(tmp_path / "run" / "ckpt"),
    )


def _damage_truncate(step_dir: pathlib.Path) -> None:
    """Cuts the array data files in half, like a disk that filled up mid-write."""
    blobs = list((step_dir / "state" / "d").iterdir())
    assert blobs
    for blob in blobs:
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])


def _damage_delete(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "state" / "d")


def _damage_metadata(step_dir: pathlib.Path) -> None:
    (step_dir / "state" / "_METADATA").write_text("{not json")


def _damage_data_state(step_dir: pathlib.Path) -> None:
    (step_dir / "data" / "process_0-of-1.json").write_text("garbage")


@pytest.mark.parametrize(
    "damage", [_damage_truncate, _damage_delete, _damage_metadata, _damage_data_state]
)
def test_damaged_latest_checkpoint_falls_back_to_previous(tiny_config, tmp_path, damage, caplog):
    caplog.set_level(logging.INFO)
    c = tiny_config  # checkpoints at 20 and 40
    train.run(c, tmp_path)
    good = checkpoint.load_arrays(tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / "40")
    # A killed save's leftovers are ignored too.
    (tmp_path / "ckpt" / "60.orbax-checkpoint-tmp-1234").mkdir()
    final = train.run(c, tmp_path)  # falls back to 20, retrains 21..40
    assert "checkpoint step 40" in caplog.text and "unreadable" in caplog.text
    assert "resumed from step 20" in caplog.text
    assert final["eval/count"] == 64
    _assert_bitwise_equal(good, checkpoint.load_arrays(tmp_path / "ckpt"))


def test_all_checkpoints_unreadable_stops_instead_of_starting_over(tiny_config, tmp_path):
    train.run(tiny_config, tmp_path)
    for step in ("20", "40"):
        _damage_delete(tmp_path / "ckpt" / step)
    with pytest.raises(checkpoint.CheckpointError, match="nothing was deleted"):
        train.run(tiny_config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["20", "40"]


def test_changed_model_stops_with_the_difference(tiny_config, tmp_path):
    train.run(tiny_config, tmp_path)
    tiny_config.model.width = 64
    tiny_config.total_steps = 60
    with pytest.raises(ConfigError, match=r"(?s)model.width: checkpoint 32, config 64.*init_from"):
        train.run(tiny_config, tmp_path)


def test_init_from_copies_chosen_parts_and_excludes(tiny_config, tmp_path):
    train.run(tiny_config, tmp_path / "a")
    a = checkpoint.load_arrays(tmp_path / "a" / "ckpt")
    c = tiny_config
    c.init_from.path = str(tmp_path / "a")
    c.optim.learning_rate = 1e-12  # effectively frozen: the copied values show through
    c.total_steps, c.checkpoint_every, c.eval_every = 1, 0, 0
    train.run(c, tmp_path / "b")
    b = checkpoint.load_arrays(tmp_path / "b" / "ckpt")
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-9)
    c.model.width = 48  # a changed body: shapes differ, named in the error
    with pytest.raises(ConfigError, match="has shape .* exclude it"):
        train.run(c, tmp_path / "c")
    c.init_from.exclude = ".*"  # nothing matches any more, so nothing is copied
    train.run(c, tmp_path / "d")


def _nan_at(steps):
    import bigtrain.data as d

    original = d.Data.next_train
    calls = {"n": 0}

    def planted(self):
        calls["n"] += 1
        batch = original(self)
        if calls["n"] in steps:  # poison this step's batch: its row of the chunk it is in
            row = (calls["n"] - 1) % self.chunk if self.chunk > 1 else slice(None)
            batch["x"] = batch["x"].at[row].set(np.nan)
        return batch

    return planted


def test_nan_batch_is_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
    import bigtrain.data as d

    monkeypatch.setattr(d.Data, "next_train", _nan_at({7}))
    final = train.run(tiny_config, tmp_path)
    assert final["train/nonfinite_steps"] == 1
    assert final["eval/accuracy"] > 0.5  # training went on
    state = checkpoint.load_arrays(tmp_path / "ckpt")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert int(state["guard"]["last_bad_step"]) == 7


def test_nan_streak_halts_under_skip_policy(tiny_config, tmp_path, monkeypatch):
    import bigtrain.data as d

    tiny_config.nan_max_consecutive = 3
    monkeypatch.setattr(d.Data, "next_train", _nan_at(set(range(12, 100))))
    with pytest.raises(resilience.NonFiniteError, match="longest streak"):
        train.run(tiny_config, tmp_path)
    state = checkpoint.load_arrays(tmp_path / "ckpt")  # step 20 was saved: finite params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_nan_halt_policy_dumps_diagnostics(tiny_config, tmp_path, monkeypatch):
    import bigtrain.data as d

    tiny_config.nan_policy = "halt"
    monkeypatch.setattr(d.Data, "next_train", _nan_at({9}))
    with pytest.raises(resilience.NonFiniteError, match="at step 9"):
        train.run(tiny_config, tmp_path)
    dump = json.loads((tmp_path / "nonfinite.json").read_text())
    assert dump["step"] == 9 and dump["nonfinite"]["loss"] == "nan"
    assert len(dump["batch_record_indices"]) == tiny_config.batch_size
    # The indices are the records the pipeline really served at step 9.
    from bigtrain.data import pipeline, sources
    from bigtrain.data.pipeline import Standardizer

    ds = sources.load(tiny_config.data)
    it = pipeline.iterate(
        pipeline.train_dataset(
            ds,
            Standardizer.identity(1),
            seed=tiny_config.seed,
            global_batch=32,
            process_index=0,
            process_count=1,
        ),
        threads=1,
        prefetch=0,
    )
    batch9 = [next(it) for _ in range(9)][-1]
    np.testing.assert_array_equal(batch9["y"], ds.y_train[dump["batch_record_indices"]])
    assert not any(p.name.isdigit() for p in (tmp_path / "ckpt").iterdir())  # nothing saved


def test_watchdog_dumps_stacks_and_exits_on_a_hung_step(tiny_config, tmp_path):
    tiny_config.watchdog_secs = 3.0
    tiny_config.total_steps = 1000
    hang = """
    import time
    import bigtrain.data as _d
    _next, _n = _d.Data.next_train, [0]
    def _hang(self):
        _n[0] += 1
        if _n[0] == 15:
            time.sleep(120)
        return _next(self)
    _d.Data.next_train = _hang
    """
    cfg = write_config_file(tmp_path, tiny_config, hang)
    t0 = time.time()
    proc = subprocess.run(
        _cli(cfg, tmp_path / "run"), cwd=REPO, capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == resilience.Watchdog.EXIT_CODE, proc.stderr[-2000:]
    assert time.time() - t0 < 100
    assert "no training step completed" in proc.stderr
    assert "_hang" in proc.stderr  # the stack of the stuck thread names where it hung
    assert "_hang" in (tmp_path / "run" / "watchdog_stacks.txt").read_text()


def test_failed_save_reports_errno_and_keeps_older_checkpoints(tiny_config, tmp_path):
    c = tiny_config
    c.model.width = 256  # ~70k params: a checkpoint file far bigger than the limit below
    c.total_steps, c.checkpoint_every, c.log_every, c.eval_every = 60, 20, 1000, 0
    limit = """
    import resource, signal
    import bigtrain.checkpoint as _c
    _save, _n = _c.Checkpointer.save, [0]
    def _limited(self, *args, **kwargs):
        _n[0] += 1
        if _n[0] == 2:  # the second save hits a file-size limit, like a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        return _save(self, *args, **kwargs)
    _c.Checkpointer.save = _limited
    """
    cfg = write_config_file(tmp_path, c, limit)
    proc = subprocess.run(
        _cli(cfg, tmp_path / "run"), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "checkpoint error: saving step 40" in proc.stderr
    assert "EFBIG" in proc.stderr or "File too large" in proc.stderr
    assert str(tmp_path / "run" / "ckpt") in proc.stderr
    # (tensorstore's failed writers may print tracebacks from C++; our report is one line)
    saved = checkpoint.load_arrays(tmp_path / "run" / "ckpt", step=20)  # intact and readable
    assert int(saved["step"]) == 20


def test_keep_last_n_plus_best_k(tiny_config, tmp_path):
    c = tiny_config
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 40, 5, 5, 5
    c.keep_checkpoints, c.keep_best_checkpoints, c.best_metric, c.best_mode = (
        2,
        1,
        "eval/loss",
        "min",
    )
    train.run(c, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    best = min(losses, key=lambda s: (losses[s], -s))
    kept = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert kept == sorted({35, 40, best})


def test_time_based_checkpoints(tiny_config, tmp_path):
    c = tiny_config
    c.checkpoint_every, c.checkpoint_every_minutes, c.keep_checkpoints = 0, 1e-6, 100
    train.run(c, tmp_path)
    kept = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()]
    assert len(kept) > 5  # saved on the clock, not only at the end


def test_signal_handlers_are_restored_after_run(tiny_config, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    train.run(tiny_config, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.getpid() > 0
