"""Metric sinks: WORKDIR/metrics.jsonl, TensorBoard events under WORKDIR/tb/, a console line.

Only process 0 writes. On resume from step S, JSONL rows and TensorBoard events after S (written by
the interrupted run) are dropped, so the logs read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any


class Writer:
    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        enabled: bool,
        start_step: int,
        total_steps: int,
        batch_size: int,
    ):
        self.enabled = enabled
        self.total_steps, self.batch_size = total_steps, batch_size
        self._progress = Progress(total_steps, start_step, enabled=enabled)
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = workdir / "metrics.jsonl"
        _truncate_after(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step or None, flush_secs=30)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in sorted(metrics.items())}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, float | int):
                self._tb.add_scalar(key, value, global_step=step)
        self._progress.update(step, row)

    def write_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, global_step=0)

    def close(self) -> None:
        if self.enabled:
            self._progress.close()
            self._jsonl.close()
            self._tb.close()


def _scalar(value: Any) -> float | int:
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, int) else float(value)


def _truncate_after(path: pathlib.Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a torn last line of a killed run
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


class Progress:
    """One console line: step, loss, accuracy, examples/s, ETA. Redrawn in place on a terminal."""

    def __init__(self, total: int, start: int, *, enabled: bool, stream=sys.stderr):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.tty = enabled and stream.isatty()
        self._t0, self._step0 = time.perf_counter(), start

    def update(self, step: int, row: dict) -> None:
        if not self.enabled or "train/loss" not in row:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        width = 20
        filled = int(width * step / max(self.total, 1))
        parts = [
            f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total}",
            f"loss {row['train/loss']:.4f}",
        ]
        if "eval/accuracy" in row:
            parts.append(f"eval acc {row['eval/accuracy']:.4f}")
        if "perf/examples_per_sec" in row:
            parts.append(f"{row['perf/examples_per_sec']:,.0f} ex/s")
        parts.append(f"ETA {_clock(eta)}")
        line = " | ".join(parts)
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
