"""A tiny config trains for real: loss falls, metrics.jsonl and TensorBoard files read back."""

import json

import pytest

import bigtrain


def test_tiny_run_learns_and_writes_logs(tiny_config, tmp_path):
    final = bigtrain.run(tiny_config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    assert train_rows[-1]["train/loss"] < 0.7 * train_rows[0]["train/loss"]
    assert final["eval/count"] == 64  # every synthetic test example, padded batch masked
    assert final["eval/accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert all(r["perf/examples_per_sec"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [20, 40]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30, 40]
    assert loss[-1].value == pytest.approx(train_rows[-1]["train/loss"], rel=1e-6)
    assert "eval/accuracy" in events.Tags()["scalars"]


def test_run_twice_in_same_workdir_resumes_and_does_nothing_more(tiny_config, tmp_path):
    first = bigtrain.run(tiny_config, tmp_path)
    again = bigtrain.run(tiny_config, tmp_path)  # already at total_steps: no new steps
    assert again["eval/accuracy"] == first["eval/accuracy"]
    assert again["eval/loss"] == pytest.approx(first["eval/loss"], rel=1e-6)
