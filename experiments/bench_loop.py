"""Throughput of the whole bigtrain loop over the bare jitted step on device-resident batches.

    python experiments/bench_loop.py [--scale 1.0]

For each config, `train.run` trains with the config's own cadence of logging, evaluation and
checkpoints (MNIST-1D: log every 100, eval and checkpoint every 1000 steps) and its input
pipeline; its throughput is read from metrics.jsonl (`perf/steps_per_sec`, which leaves out
evaluation time but includes everything else: waiting for data, checkpoint saves, logging),
skipping the first logged interval (compile and warm-up). The bare step is the same compiled
program fed one batch already on the device, timed before and after the loop run over the same
number of steps (median of 10 timings). Goal: loop / bare >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from _bench import bare_step_seconds, host, load, median, train

ROWS = [  # name, config, steps, overrides
    ("MLP (MNIST-1D)", "configs/mnist1d.py:model=mlp", 3000, []),
    ("1D CNN (MNIST-1D)", "configs/mnist1d.py", 2000, []),
    ("ViT-Ti/8 (32x32)", "configs/vit.py", 100, []),
    ("ResNet-20 (32x32)", "configs/resnet.py:variant=cifar", 100, []),
]


def loop_steps_per_sec(workdir: pathlib.Path) -> tuple[float, float, int]:
    """Steps/s over the logged intervals after the first, their data-wait share, and steps."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/steps_per_sec" in r]
    steps = [b["step"] - a["step"] for a, b in zip(rows, rows[1:], strict=False)]
    secs = [n / r["perf/steps_per_sec"] for n, r in zip(steps, rows[1:], strict=True)]
    wait = sum(s * r["perf/data_wait_frac"] for s, r in zip(secs, rows[1:], strict=True))
    return sum(steps) / sum(secs), wait / sum(secs), sum(steps)


def bench_row(spec: str, steps: int, overrides: list[str], repeats: int = 5) -> dict:
    config = load(spec, [f"total_steps={steps}", *overrides])
    # The bare step: the plain program on one device-resident batch (data.chunk=1, no
    # stacked input to index), the fastest way to run these steps without a loop around them.
    built = train.build_step(load(spec, [f"total_steps={steps}", *overrides, "data.chunk=1"]))
    bare, state = [], None
    for _ in range(repeats):
        t, state = bare_step_seconds(built, max(steps // (2 * repeats), 5), state=state)
        bare.append(t)
    with tempfile.TemporaryDirectory() as tmp:
        train.run(config, tmp)
        loop, wait, measured = loop_steps_per_sec(pathlib.Path(tmp))
    for _ in range(repeats):
        t, state = bare_step_seconds(built, max(steps // (2 * repeats), 5), state=state)
        bare.append(t)
    rate = 1 / median(bare)  # steps/s
    return {"loop": loop, "bare": rate, "ratio": loop / rate, "wait": wait, "steps": measured}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every row's steps")
    parser.add_argument("--only", default="", help="substring of the row names to run")
    args = parser.parse_args()
    print(f"# {host()}")
    print("| config | steps timed | loop steps/s | bare step steps/s | loop / bare | data wait |")
    print("|---|---|---|---|---|---|")
    for name, spec, steps, overrides in ROWS:
        if args.only and args.only.lower() not in name.lower():
            continue
        r = bench_row(spec, max(int(steps * args.scale), 20), overrides)
        print(
            f"| {name} | {r['steps']} | {r['loop']:.1f} | {r['bare']:.1f} | {r['ratio']:.3f} | "
            f"{100 * r['wait']:.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
