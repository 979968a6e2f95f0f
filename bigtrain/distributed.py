"""Multi-process start-up: explicit flags, else SLURM or Cloud TPU from the environment, else one.

`resolve()` only reads the environment (testable without JAX); `initialize()` acts on its plan.
`python -m bigtrain.distributed` prints the plan for the current environment (the SLURM dry run).

- Explicit `--coordinator/--num_processes/--process_id` win over anything detected.
- SLURM (`SLURM_JOB_ID` set, `SLURM_NTASKS` > 1): the coordinator is the first host of the step's
  (else the job's) node list on port `BIGTRAIN_COORDINATOR_PORT` (default 12355); process id and
  count are `SLURM_PROCID` and `SLURM_NTASKS`. Each process uses every device it can see: run one
  task per node owning its GPUs, or `--gpus-per-task=1` (SLURM then sets CUDA_VISIBLE_DEVICES).
- Cloud TPU VM slices (`TPU_WORKER_HOSTNAMES`, `TPU_PROCESS_ADDRESSES`,
  `MEGASCALE_COORDINATOR_ADDRESS` or `CLOUD_TPU_TASK_ID` set, or `BIGTRAIN_DISTRIBUTED=jax`,
  which `launch/tpu_vm.sh` sets because a VM's ssh shell has none of them):
  `jax.distributed.initialize()` without arguments; JAX reads the TPU metadata itself.
- `BIGTRAIN_DISTRIBUTED=none` never initializes (one process, whatever the environment says).

CPU collectives: jax 0.10.2 defaults `jax_cpu_collectives_implementation` to gloo, which is what
multi-process CPU runs (`launch/local.py`) need; nothing is set here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

DEFAULT_PORT = 12355
TPU_ENV_VARS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "CLOUD_TPU_TASK_ID",
)
MODES = ("auto", "jax", "none")  # values of BIGTRAIN_DISTRIBUTED


class DistributedError(ValueError):
    """The flags and environment do not describe a multi-process run we can start."""


@dataclasses.dataclass(frozen=True)
class Plan:
    source: str  # "flags", "slurm", "tpu" or "single"
    kwargs: dict[str, Any] | None  # for jax.distributed.initialize; None: do not call it

    def describe(self) -> str:
        if self.kwargs is None:
            return "single process (no jax.distributed.initialize)"
        if self.source == "tpu" and "coordinator_address" not in self.kwargs:
            return "Cloud TPU: jax.distributed.initialize() detects the slice's workers"
        k = self.kwargs
        return (
            f"{self.source}: process {k.get('process_id', '?')} of {k.get('num_processes', '?')}, "
            f"coordinator {k.get('coordinator_address', '?')}"
        )


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'node[01-03,07],gpu5' -> node01..node03, ..."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            options = [literal]
            if ranges:
                options = [literal + n for n in _expand_ranges(ranges, nodelist)]
            expanded = [head + tail for head in expanded for tail in options]
        hosts.extend(h for h in expanded if h)
    if not hosts:
        raise DistributedError(f"cannot read a host from the SLURM node list {nodelist!r}")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise DistributedError(f"cannot read {part!r} in the SLURM node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise DistributedError(f"range {part!r} runs backwards in {nodelist!r}")
        width = len(lo)  # zero padding comes from the lower bound: 01-10 -> 01..10
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Plan:
    """What `initialize` would do with these flags in this environment; calls nothing."""
    env = os.environ if env is None else env
    flags = {
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    mode = env.get("BIGTRAIN_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise DistributedError(f"BIGTRAIN_DISTRIBUTED={mode!r}; use one of {', '.join(MODES)}")
    if mode == "none":
        if given:
            raise DistributedError(
                f"BIGTRAIN_DISTRIBUTED=none but --{', --'.join(_flag(k) for k in given)} given"
            )
        return Plan("single", None)

    detected, source = {}, "flags"
    if mode == "jax" or any(env.get(v) for v in TPU_ENV_VARS):
        return Plan("tpu", given)  # JAX fills in whatever the flags leave out
    if _slurm_multi_task(env):
        detected, source = _from_slurm(env), "slurm"
    if not given and not detected:
        return Plan("single", None)
    merged = {**detected, **given}
    missing = [k for k, v in flags.items() if k not in merged and v is None]
    if missing:
        raise DistributedError(
            f"multi-process run needs --{', --'.join(_flag(k) for k in missing)} as well "
            "(or run under SLURM / on a Cloud TPU VM, where they are detected)"
        )
    n, i = merged["num_processes"], merged["process_id"]
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f"--process_id must be in [0, {n}) for {n} processes; got {i}")
    if ":" not in merged["coordinator_address"]:
        raise DistributedError(
            f"--coordinator {merged['coordinator_address']!r} needs a port: host:port"
        )
    # Our resolution is complete: stop JAX's own SLURM detection from narrowing the visible
    # devices to SLURM_LOCALID (wrong for one task per node owning all its GPUs).
    return Plan(source, {**merged, "cluster_detection_method": "deactivate"})


def _flag(key: str) -> str:
    return "coordinator" if key == "coordinator_address" else key


def _slurm_multi_task(env: Mapping[str, str]) -> bool:
    try:
        return bool(env.get("SLURM_JOB_ID")) and int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _from_slurm(env: Mapping[str, str]) -> dict[str, Any]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if not nodelist:
        raise DistributedError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is not set")
    port = env.get("BIGTRAIN_COORDINATOR_PORT", str(DEFAULT_PORT))
    if not port.isdigit():
        raise DistributedError(f"BIGTRAIN_COORDINATOR_PORT={port!r} is not a port number")
    if "SLURM_PROCID" not in env:
        raise DistributedError(
            "SLURM_NTASKS > 1 but SLURM_PROCID is not set: start one process per task with srun"
        )
    return {
        "coordinator_address": f"{expand_nodelist(nodelist)[0]}:{port}",
        "num_processes": int(env["SLURM_NTASKS"]),
        "process_id": int(env["SLURM_PROCID"]),
    }


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> str:
    """Starts jax.distributed when the flags or the environment ask for it; returns a log line.

    Call before anything touches a JAX backend (jax.devices(), an array, a jit).
    """
    plan = resolve(coordinator, num_processes, process_id)
    if plan.kwargs is None:
        return plan.describe()
    import jax

    jax.distributed.initialize(**plan.kwargs)
    return (
        f"{plan.describe()}; jax sees process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices"
    )


if __name__ == "__main__":
    try:
        print(resolve().describe())
    except DistributedError as e:
        print(f"distributed error: {e}", file=sys.stderr)
        sys.exit(2)
