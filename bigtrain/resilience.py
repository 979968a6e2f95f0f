"""Surviving failures: preemption signals, hung steps, non-finite steps, incompatible resumes."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax

log = logging.getLogger("bigtrain")


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

    Multi-process: every process must stop at the same step, so the decision goes through JAX's
    preemption sync point (all processes agree on the step at which any of them was signalled).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final save
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: finishing this step, saving a checkpoint, then exiting", self.signal_name
        )

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step) or (
                self.signal_name is not None and _any_process(True)
            )
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _any_process(flag: bool) -> bool:
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(jax.numpy.asarray(flag)).any())


class Watchdog:
    """Exits the process when no step completes for `timeout` seconds, after dumping stacks.

    A hung collective or a stuck input pipeline otherwise holds the job's machines forever; exiting
    non-zero lets the scheduler restart it, and the stacks in the log say where it hung.
    """

    EXIT_CODE = 70

    def __init__(self, timeout: float, dump_path: pathlib.Path | None) -> None:
        self.timeout, self.dump_path = timeout, dump_path
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout > 0:
            self._thread = threading.Thread(
                target=self._watch, name="bigtrain-watchdog", daemon=True
            )
            self._thread.start()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._beat
            if idle > self.timeout:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        message = (
            f"watchdog: no training step completed in {idle:.0f} s (limit "
            f"{self.timeout:.0f} s, config key watchdog_secs); dumping all thread stacks "
            f"and exiting with status {self.EXIT_CODE} so the job can be restarted"
        )
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.dump_path is not None:
            try:
                self.dump_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.dump_path, "w") as f:
                    f.write(message + "\n")
                    faulthandler.dump_traceback(file=f, all_threads=True)
            except OSError:
                pass
        sys.stderr.flush()
        os._exit(self.EXIT_CODE)

    def close(self) -> None:
        self._stop.set()


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf under the `halt` policy or too many times in a row."""


def batch_record_indices(num_records: int, seed: int, global_batch: int, step: int) -> list[int]:
    """Train-split record indices in global batch `step` (1-based): the pipeline's order."""
    from bigtrain.data.pipeline import stream_indices

    return stream_indices(num_records, seed, (step - 1) * global_batch, global_batch).tolist()


def write_nonfinite_dump(path: pathlib.Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


# Keys whose change makes a checkpoint a different run: the model, the data or its order.
STRUCTURAL = (
    "model.",
    "data.name",
    "data.path",
    "data.synthetic_",
    "data.permute_positions",
    "data.num_train",
    "data.standardize",
    "optim.name",
    "loss.name",
    "seed",
    "batch_size",
)


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every flattened key that differs."""
    a, b = _flatten(saved), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def incompatible(differences: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    return [d for d in differences if any(d[0] == s or d[0].startswith(s) for s in STRUCTURAL)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
