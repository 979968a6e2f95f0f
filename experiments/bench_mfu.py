"""Achieved FLOP/s of the compiled train step over the machine's measured matmul peak.

    python experiments/bench_mfu.py [--repeats 5] [--only vit]
    python experiments/bench_mfu.py --only "ViT-B/16" --peak 989e12   # on an accelerator

FLOPs per step come from XLA's cost analysis of the compiled step (what `perf/mfu` uses);
the step time is the median over repeats of the bare step on a device-resident batch. The peak
is measured in the same run: the best of several jitted float32 n x n matmuls (CPU), unless
`--peak` gives a vendor figure (accelerators: use the dense bf16 peak, as the MFU table in
bigtrain/train.py does).
"""

from __future__ import annotations

import argparse

from _bench import bare_step_seconds, host, load, median, train

SYN = ["data.name=synthetic", "data.synthetic_size=2048", "data.chunk=1", "mesh.data=1"]
ROWS = [  # name, config, overrides
    (
        "MLP 784-1024x3 (batch 512)",
        "configs/mnist1d.py:model=mlp",
        [*SYN, "data.synthetic_shape=(784,)", "model.width=1024", "model.depth=3"]
        + ["batch_size=512"],
    ),
    ("1D CNN (MNIST-1D, batch 128)", "configs/mnist1d.py", ["data.chunk=1", "mesh.data=1"]),
    ("ViT-Ti/4 32x32 (batch 128)", "configs/vit.py:patch=4", [*SYN, "batch_size=128"]),
    ("ResNet-18 32x32 (batch 64)", "configs/resnet.py:variant=resnet18", [*SYN]),
    ("ResNet-20 32x32 (batch 128)", "configs/resnet.py:variant=cifar", [*SYN, "batch_size=128"]),
    (
        "ViT-B/16 224x224 bf16 (batch 256)",
        "configs/vit.py:size=B,patch=16,image=224",
        [*SYN, "batch_size=256", "eval_batch_size=256", "model.dtype=bfloat16"],
    ),
]
DEFAULT = [r[0] for r in ROWS if "ViT-B" not in r[0]]  # ViT-B/16 is for accelerators


def matmul_peak() -> float:
    return train.measured_cpu_peak(n=2048, repeats=10)  # the loop's perf/mfu uses 1024^2


def bench_row(spec: str, overrides: list[str], repeats: int, budget: float = 2.0) -> dict:
    built = train.build_step(load(spec, overrides))
    flops = built.stats["perf/flops_per_step_per_device"]
    probe, state = bare_step_seconds(built, 2)
    steps = max(3, int(budget / repeats / probe))
    times = []
    for _ in range(repeats):
        t, state = bare_step_seconds(built, steps, warmup=1, state=state)
        times.append(t)
    return {"flops": flops, "secs": median(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="substring of the row names to run")
    parser.add_argument("--peak", type=float, default=0.0, help="FLOP/s; default: measured")
    args = parser.parse_args()
    wanted = lambda name: args.only.lower() in name.lower() if args.only else name in DEFAULT
    rows = [r for r in ROWS if wanted(r[0])]
    peak_before = args.peak or matmul_peak()
    results = [(name, bench_row(spec, o, args.repeats)) for name, spec, o in rows]
    train.measured_cpu_peak.cache_clear()  # measure again after the rows; keep the best
    peak = args.peak or max(peak_before, matmul_peak())
    print(f"# {host()}")
    what = "given" if args.peak else "measured, best jitted float32 2048^2 matmul"
    print(f"# peak {peak / 1e9:.1f} GFLOP/s per device ({what})")
    print("| model | GFLOP/step (XLA) | ms/step | achieved GFLOP/s | achieved / peak |")
    print("|---|---|---|---|---|")
    for name, r in results:
        rate = r["flops"] / r["secs"]
        print(
            f"| {name} | {r['flops'] / 1e9:.2f} | {1e3 * r['secs']:.1f} | {rate / 1e9:.1f} | "
            f"{rate / peak:.2f} |"
        )


if __name__ == "__main__":
    main()
