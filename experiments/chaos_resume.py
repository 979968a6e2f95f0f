"""Kill training with SIGKILL at random moments, resume, and compare with a run never interrupted.

    python experiments/chaos_resume.py [--trials 10] [--kills 2] [--steps 600] [--seed 0]

Each trial starts the real CLI on MNIST-1D (the default CNN), kills it `--kills` times at random
moments during training (checkpoints every 20 steps, so some kills land inside an async save),
restarts it each time and lets the last start finish. The final checkpoint (params, optimizer
state, step, guard counters) must be bitwise identical to the uninterrupted run's. Prints
`identical: k/K`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigtrain.checkpoint import load_arrays  # noqa: E402


def command(workdir: pathlib.Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "bigtrain.main", "--config", "configs/mnist1d.py",
        "--workdir", str(workdir), f"--config.total_steps={steps}",
        "--config.checkpoint_every=20", "--config.log_every=20", "--config.eval_every=200",
    ]  # fmt: skip


def first_row_time(workdir: pathlib.Path, proc: subprocess.Popen, t0: float) -> float | None:
    """Seconds from start until the first metrics row appears (None if the run ended first)."""
    path = workdir / "metrics.jsonl"
    while proc.poll() is None:
        if path.exists() and path.read_text().strip():
            return time.perf_counter() - t0
        time.sleep(0.05)
    return None


def identical(a: dict, b: dict) -> bool:
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = pathlib.Path(tempfile.mkdtemp(prefix="chaos_"))
    quiet = dict(cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    t0 = time.perf_counter()
    proc = subprocess.Popen(command(root / "straight", args.steps), **quiet)
    startup = first_row_time(root / "straight", proc, t0) or 0.0
    proc.wait()
    total = time.perf_counter() - t0
    assert proc.returncode == 0, "the uninterrupted run failed"
    reference = load_arrays(root / "straight" / "ckpt")
    print(f"uninterrupted run: {total:.1f} s ({startup:.1f} s to the first logged step)")

    results, during_save = [], 0
    for trial in range(args.trials):
        workdir = root / f"trial{trial}"
        kills = []
        for _ in range(args.kills):
            t0 = time.perf_counter()
            proc = subprocess.Popen(command(workdir, args.steps), **quiet)
            started = first_row_time(workdir, proc, t0)
            if started is None:
                break  # already finished: nothing left to kill
            time.sleep(rng.uniform(0.0, max(total - startup, 0.5)))
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            ckpt = workdir / "ckpt"
            saving = any("tmp" in p.name for p in ckpt.iterdir()) if ckpt.exists() else False
            during_save += saving
            rows = (workdir / "metrics.jsonl").read_text().splitlines()
            kills.append(f"{json.loads(rows[-1])['step']}{'*' if saving else ''}")
        proc = subprocess.run(
            command(workdir, args.steps), capture_output=True, text=True, cwd=REPO
        )
        ok = proc.returncode == 0 and identical(reference, load_arrays(workdir / "ckpt"))
        results.append(ok)
        print(
            f"trial {trial}: killed after logged steps {kills or ['-']} -> "
            f"{'identical' if ok else 'DIFFERENT'}",
            flush=True,
        )

    print(f"\nkills landing inside an async save (tmp dir left behind, marked *): {during_save}")
    print(f"identical: {sum(results)}/{len(results)}")


if __name__ == "__main__":
    main()
