"""Converter throughput and peak memory on synthetic records (64 float32 features + a label),
and on a folder of PNG images (one subfolder per class).

    python experiments/bench_convert.py                    # 100k and 1M records, 20k PNGs
    python experiments/bench_convert.py --sizes 100000,1000000,10000000   # 2.5 GB source
    python experiments/bench_convert.py --sizes 10000 --images 0          # quick check

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
import shutil
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


def make_images(root: pathlib.Path, n: int, classes: int = 10) -> None:
    """n random 32x32 RGB PNGs in `classes` subfolders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


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
    p.add_argument("--images", type=int, default=20_000, help="PNGs in the folder row; 0 = skip")
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--make-source", nargs=3, metavar=("KIND", "DIR", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.make_source:
        kind, where, n = a.make_source
        (make_source if kind == "arrays" else make_images)(pathlib.Path(where), int(n))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = pathlib.Path(tmp)
        _, base_rss, _ = run([sys.executable, "-c", "import bigtrain.data.convert"])
        rows = [("import only (baseline)", "-", "-", "-", f"{base_rss:,.0f}")]
        jobs = [("arrays", n) for n in sizes] + ([("images", a.images)] if a.images else [])
        for kind, n in jobs:
            src, dst = tmp / f"src-{kind}{n}", tmp / f"dst-{kind}{n}"
            # In a child too: a parent's peak RSS would leak into the child's ru_maxrss via exec.
            run([sys.executable, __file__, "--make-source", kind, str(src), str(n)])
            src_mib = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 2**20
            code = (
                "import json, time, sys; from bigtrain.data import convert; "
                "t = time.perf_counter(); "
                f"m = convert.convert(sys.argv[1], sys.argv[2], shard_size={a.shard_size}); "
                "print(json.dumps({'secs': time.perf_counter() - t, 'kept': "
                "m['splits']['train']['records'] + m['splits']['val']['records'], "
                "'dropped': m['cleaning']['dropped']}))"
            )
            _, rss, out = run([sys.executable, "-c", code, str(src), str(dst)])
            r = json.loads(out.strip().splitlines()[-1])
            what = "records" if kind == "arrays" else "PNG files, 32x32 RGB"
            rows.append(
                (f"{n:,} {what} ({src_mib:,.0f} MiB source)", f"{r['secs']:.1f}",
                 f"{n / r['secs']:,.0f}", f"{r['dropped']:,}", f"{rss:,.0f}")
            )  # fmt: skip
            shutil.rmtree(src)
            shutil.rmtree(dst)
    print("| conversion | seconds | records/s | dropped | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
