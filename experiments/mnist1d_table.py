"""Reproduces the MNIST-1D paper's table (Greydanus & Kobak, 2020) with bigtrain.

    python experiments/mnist1d_table.py [--steps N] [--seeds 0,1,2] [--workdir DIR]

Trains logistic regression, the MLP and the CNN on MNIST-1D and on its spatially shuffled variant
(one fixed permutation of the 40 positions) and prints our test accuracy beside the paper's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import bigtrain  # noqa: E402

PAPER = {  # test accuracy (%) from the paper's table: (regular, shuffled)
    "logreg": (32, 32),
    "mlp": (68, 68),
    "cnn": (94, 56),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=0, help="override total_steps (0: config's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the mean is shown")
    parser.add_argument("--workdir", default="", help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="mnist1d_table_"))

    rows = []
    for model, (paper_plain, paper_shuffled) in PAPER.items():
        for shuffled, paper in ((0, paper_plain), (1, paper_shuffled)):
            accs, secs = [], []
            for seed in seeds:
                overrides = [f"seed={seed}"] + ([f"total_steps={args.steps}"] if args.steps else [])
                spec = f"{REPO / 'configs/mnist1d.py'}:model={model},shuffle={shuffled}"
                config = bigtrain.load_config(spec, overrides)
                t0 = time.perf_counter()
                final = bigtrain.run(config, root / f"{model}-shuffle{shuffled}-seed{seed}")
                secs.append(time.perf_counter() - t0)
                accs.append(100 * final["eval/accuracy"])
            rows.append((model, "shuffled" if shuffled else "regular", paper, accs, np.mean(secs)))
            print(f"  {rows[-1][0]} {rows[-1][1]}: {np.mean(accs):.1f}%", flush=True)

    print(f"\nMNIST-1D test accuracy (%), seeds {seeds}; runs in {root}\n")
    print("| model  | input    | paper | bigtrain (mean ± sd) | diff  | secs/run |")
    print("|--------|----------|-------|----------------------|-------|----------|")
    for model, kind, paper, accs, secs in rows:
        mean, sd = np.mean(accs), np.std(accs)
        print(
            f"| {model:6} | {kind:8} | {paper:5} | {mean:13.1f} ± {sd:4.1f} | "
            f"{mean - paper:+5.1f} | {secs:8.1f} |"
        )


if __name__ == "__main__":
    main()
