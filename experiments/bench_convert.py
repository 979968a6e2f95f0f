"""Converter throughput and peak memory on synthetic records (64 float32 features + a label).

    python experiments/bench_convert.py                    # 100k and 1M records
    python experiments/bench_convert.py --sizes 10000      # quick check

Each size is written as x.npy/y.npy (in chunks, never whole in memory), then converted in a fresh
process whose peak RSS comes from os.wait4 (both in children, as Linux carries the parent's peak
RSS into a child's ru_maxrss across exec, which would inflate the figure). Peak RSS
that stays flat while the record count grows 10x is the bounded-memory claim; the baseline row
is a process that only imports the converter (jax and grain come with it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FEATURES = 64


def make_source(root: pathlib.Path, n: int, chunk: int = 100_000) -> None:
    """x.npy (n, 64) float32 and y.npy (n,) int32 with 0.1% NaN rows, written chunk by chunk."""
    root.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(root / "x.npy", "w+", np.float32, (n, FEATURES))
    y = np.lib.format.open_memmap(root / "y.npy", "w+", np.int32, (n,))
    rng = np.random.default_rng(0)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x[lo:hi] = rng.standard_normal((hi - lo, FEATURES), dtype=np.float32)
        y[lo:hi] = rng.integers(0, 10, hi - lo)
        x[lo:hi:1000, 0] = np.nan
    x.flush()
    y.flush()
    del x, y


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB and stdout of one child process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"{cmd} failed with status {status}: {out}")
    return secs, usage.ru_maxrss / 1024, out  # ru_maxrss is KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--make-source", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.make_source:
        make_source(pathlib.Path(a.make_source[0]), int(a.make_source[1]))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = pathlib.Path(tmp)
        _, base_rss, _ = run([sys.executable, "-c", "import bigtrain.data.convert"])
        rows = [("import only (baseline)", "-", "-", "-", f"{base_rss:,.0f}")]
        for n in sizes:
            # In a child too: a parent's peak RSS would leak into the child's ru_maxrss via exec.
            run([sys.executable, __file__, "--make-source", str(tmp / f"src{n}"), str(n)])
            src_mib = sum(f.stat().st_size for f in (tmp / f"src{n}").iterdir()) / 2**20
            code = (
                "import json, time, sys; from bigtrain.data import convert; "
                "t = time.perf_counter(); "
                f"m = convert.convert(sys.argv[1], sys.argv[2], shard_size={a.shard_size}); "
                "print(json.dumps({'secs': time.perf_counter() - t, 'kept': "
                "m['splits']['train']['records'] + m['splits']['val']['records'], "
                "'dropped': m['cleaning']['dropped']}))"
            )
            _, rss, out = run(
                [sys.executable, "-c", code, str(tmp / f"src{n}"), str(tmp / f"d{n}")]
            )
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(
                (f"{n:,} records ({src_mib:,.0f} MiB source)", f"{r['secs']:.1f}",
                 f"{n / r['secs']:,.0f}", f"{r['dropped']:,}", f"{rss:,.0f}")
            )  # fmt: skip
            for f in (tmp / f"src{n}").iterdir():
                f.unlink()
    print("| conversion | seconds | records/s | dropped (NaN) | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
