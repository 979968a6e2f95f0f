"""Shared by the benchmark scripts: load a config, time the bare compiled step, name the host."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax

from bigtrain import config as config_lib
from bigtrain import train


def load(spec: str, overrides: list[str] = ()):
    """`configs/x.py[:arg]` plus `key=value` overrides, validated."""
    return config_lib.load(spec, list(overrides))


def bare_step_seconds(built, steps: int, warmup: int = 3, state=None) -> tuple[float, object]:
    """Seconds per step of the compiled step fed one device-resident batch, no loop around it."""
    state = built.init() if state is None else state
    batch = built.data.next_train()
    for _ in range(warmup):
        state, _ = built.step(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = built.step(state, batch)
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / steps, state


def best_of(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def median(xs) -> float:
    return statistics.median(xs)


def host() -> str:
    return (
        f"{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, python {platform.python_version()}"
    )


__all__ = ["bare_step_seconds", "best_of", "host", "load", "median", "train"]
