"""MNIST-1D (Greydanus & Kobak), generated offline by the `mnist1d` package.

    python -m bigtrain.main --config configs/mnist1d.py --workdir runs/mnist1d
    python -m bigtrain.main --config configs/mnist1d.py:model=mlp --workdir runs/mnist1d-mlp
    python -m bigtrain.main --config configs/mnist1d.py:model=logreg,shuffle=1 --workdir runs/x

Variants: model=cnn|mlp|logreg, shuffle=0|1 (a fixed spatial permutation of the signal).
Measured on a 2-core x86_64 CPU VM (shared with other jobs), jax 0.10.2, 2026-12-03:
  default (cnn): 95.0% test accuracy; 25.9 s wall for the command (2026-12-04, after the
  input and loop changes in docs/performance.md), ~406 steps/s, 1.7 s compile; 94% is reached
  in 10.3 s from process start (experiments/time_to_accuracy.py).
  experiments/mnist1d_table.py, seeds 0-2 (2026-12-04): cnn 94.4 ± 0.5%, mlp 65.7 ± 0.3%,
  logreg 32.9 ± 0.3%; shuffled inputs: cnn 64.8 ± 1.3%, mlp 66.1 ± 1.3%, logreg 32.5 ± 0.5%.
"""

from bigtrain.config import base, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base()
    c.data.name = "mnist1d"
    c.data.permute_positions = args.get("shuffle", "0") == "1"
    c.total_steps = 6000
    c.batch_size = 128
    c.eval_every = 1000
    model = args.get("model", "cnn")
    if model == "cnn":
        c.model.name = "cnn1d"
        c.model.width, c.model.depth, c.model.kernel_size = 32, 4, 5
    elif model == "mlp":
        c.model.name = "mlp"
        c.model.width, c.model.depth = 100, 2
    elif model == "logreg":
        c.model.name = "logreg"
    else:
        raise ValueError(f"model={model!r}: choose cnn, mlp or logreg")
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.weight_decay = 0.05
    return c
