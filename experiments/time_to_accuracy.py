"""Wall-clock seconds from `python -m bigtrain.main` to a test accuracy, everything included.

    python experiments/time_to_accuracy.py [--target 0.94] [--runs 3] [--eval-every 250]

Starts the README's default command (MNIST-1D, the 1D CNN) in a fresh workdir, evaluating every
`--eval-every` steps on the whole test split, and reports the seconds from process start
(interpreter, imports, dataset generation, compile, training, evaluation) until metrics.jsonl
first shows `eval/accuracy >= target`; then stops the run. Goal on 2 cores: <= 60 s to 94%.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def one_run(target: float, eval_every: int, workdir: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "bigtrain.main", "--config", "configs/mnist1d.py"]
    cmd += ["--workdir", str(workdir), f"--config.eval_every={eval_every}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, seen = workdir / "metrics.jsonl", 0
    try:
        while True:
            done = proc.poll() is not None
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            for line in rows[seen:]:
                row = json.loads(line)
                if row.get("eval/accuracy", 0.0) >= target:
                    return {
                        "secs": time.perf_counter() - t0,
                        "step": row["step"],
                        "accuracy": row["eval/accuracy"],
                    }
            seen = len(rows)
            if done:
                err = proc.stderr.read().decode()[-2000:]
                raise RuntimeError(f"the run ended below {target} (exit {proc.returncode}): {err}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.94)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=250)
    args = parser.parse_args()
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            r = one_run(args.target, args.eval_every, pathlib.Path(tmp))
        results.append(r)
        print(
            f"run {i}: {r['secs']:.1f} s to eval/accuracy {r['accuracy']:.3f} at step {r['step']}",
            flush=True,
        )
    secs = [r["secs"] for r in results]
    print(
        f"time to {100 * args.target:.0f}%: median {statistics.median(secs):.1f} s "
        f"(min {min(secs):.1f}, max {max(secs):.1f}) over {len(secs)} runs (goal <= 60 s)"
    )


if __name__ == "__main__":
    main()
