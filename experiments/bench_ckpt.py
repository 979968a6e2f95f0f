"""How long a checkpoint save blocks the training thread: async save over a synchronous save.

    python experiments/bench_ckpt.py [--config configs/vit.py:size=S] [--saves 5]

Saves the real train state (params + AdamW moments + step + NaN-guard counters), the data
iterator and the run metadata through bigtrain's Checkpointer, once with Orbax's async
checkpointing and once synchronously, into fresh directories. "Blocked" is the time `save()`
takes to return to the loop; for async the write goes on in the background and is waited for
(untimed), then 3 s pass before the next save, as training between two saves would give it.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import numpy as np
from _bench import host, load, median, train

from bigtrain import checkpoint


def blocked_seconds(
    directory: pathlib.Path, use_async: bool, state, data_iter, saves: int, pause: float = 3.0
):
    ckpt = checkpoint.Checkpointer(directory, keep=2, use_async=use_async)
    blocked, total = [], []
    for i in range(1, saves + 1):
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        ckpt.save(i, state, data_iter, {"step": i})
        blocked.append(time.perf_counter() - t0)
        ckpt._manager.wait_until_finished()
        total.append(time.perf_counter() - t0)
        time.sleep(pause)  # training time until the next save: Orbax finalizes meanwhile
    ckpt.close()
    return median(blocked), median(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/vit.py:size=S")
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    config = load(args.config, ["optim.name=adamw", "mesh.data=1"])
    built = train.build_step(config)
    state = built.init()
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"# {host()}")
    print(f"# {args.config}: train state {size / 2**20:.0f} MiB, {args.saves} saves each, median")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, use_async in [("sync", False), ("async", True), ("sync", False)]:
            d = pathlib.Path(tmp) / f"{name}-{len(rows)}"
            rows.setdefault(name, []).append(
                blocked_seconds(d, use_async, state, built.data.train, args.saves)
            )
    sync_blocked = float(np.mean([b for b, _ in rows["sync"]]))
    async_blocked, async_total = rows["async"][0]
    print("| save | training thread blocked | save committed |")
    print("|---|---|---|")
    print(f"| synchronous | {1e3 * sync_blocked:.0f} ms | {1e3 * sync_blocked:.0f} ms |")
    print(f"| async | {1e3 * async_blocked:.0f} ms | {1e3 * async_total:.0f} ms |")
    print(f"blocked ratio async / sync: {async_blocked / sync_blocked:.3f} (goal <= 0.1)")


if __name__ == "__main__":
    main()
