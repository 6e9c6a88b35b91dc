"""Throughput of two checkouts of bigalign side by side: apply and import (and fit) on the
same data, alternating old and new in fresh processes, medians and ratios.

    git worktree add /tmp/bigalign-old <commit>
    python benchmarks/ab_checkout.py --old /tmp/bigalign-old [--rows 500000 --dim 384]

Each timed run is ``python -m bigalign.cli COMMAND ...`` with ``PYTHONPATH`` pointing at one
checkout, writing a new output (so the timing includes creating the output, the job
protocol's listings and the completion mark). Runs alternate old, new, old, new, ... so
that drift on a shared machine hits both alike; the inputs are read once first to warm the
page cache. Also times, in this process, writing and reading the same array with and
without Zarr's crc32c codec, to attribute the checksum's share.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = os.path.dirname(HERE)


def timed(checkout: str, *argv) -> float:
    env = dict(os.environ, PYTHONPATH=checkout)
    env.pop("BIGALIGN_FAULTS", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bigalign.cli", *map(str, argv), "-q"], env=env,
                   check=True)
    return time.perf_counter() - t0


def crc_cost(work: str, rows: int, dim: int, repeats: int) -> dict:
    import zarr
    from zarr.codecs import Crc32cCodec

    x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    chunk = max(1, (32 << 20) // (dim * 4))
    out = {}
    for name, codecs in (("none", None), ("crc32c", [Crc32cCodec()])):
        w, r = [], []
        for k in range(repeats):
            path = os.path.join(work, f"crc-{name}-{k}.zarr")
            a = zarr.create_array(path, shape=x.shape, chunks=(chunk, dim), dtype=x.dtype,
                                  compressors=codecs, config={"write_empty_chunks": True})
            t0 = time.perf_counter()
            a[:] = x
            w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            a[:]
            r.append(time.perf_counter() - t0)
            shutil.rmtree(path)
        out[name] = {"write_s": statistics.median(w), "read_s": statistics.median(r)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="the other checkout (a git worktree)")
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default=None, help="folder for the data (default: a temp dir)")
    args = p.parse_args(argv)
    sys.path.insert(0, NEW)
    import zarr

    work = args.work or tempfile.mkdtemp(prefix="bigalign-ab-")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    b = (a @ np.linalg.qr(rng.standard_normal((args.dim, args.dim)))[0]).astype(np.float32)
    chunk = 8192
    for name, x in (("a.zarr", a), ("b.zarr", b)):
        zarr.create_array(os.path.join(work, name), data=x, chunks=(chunk, args.dim),
                          compressors=None, overwrite=True)
    np.save(os.path.join(work, "a.npy"), a)
    timed(NEW, "fit", f"{work}/a.zarr", f"{work}/b.zarr", "-o", f"{work}/T", "--center",
          "--no-diagnostics")
    cases = {
        "fit": lambda o: ("fit", f"{work}/a.zarr", f"{work}/b.zarr", "-o", o, "--center",
                          "--no-diagnostics"),
        "apply": lambda o: ("apply", f"{work}/T", f"{work}/a.zarr", "-o", o),
        "import": lambda o: ("import", f"{work}/a.npy", "-o", o, "--chunk-rows", str(chunk)),
    }
    times: dict = {(c, s): [] for c in cases for s in ("old", "new")}
    for k in range(args.repeats + 1):  # the first round warms the page cache: not counted
        for case, argv_ in cases.items():
            for side, checkout in (("old", args.old), ("new", NEW)):
                out = os.path.join(work, f"{case}-{side}-{k}")
                t = timed(checkout, *argv_(out))
                if k:
                    times[case, side].append(t)
                shutil.rmtree(out, ignore_errors=True)
    gb = args.rows * args.dim * 4 / 1e9
    print(f"{args.rows:,} x {args.dim} float32 ({gb:.2f} GB), chunks of {chunk} rows, "
          f"medians of {args.repeats} alternating runs, wall time of the whole command:")
    print("| command | old (s) | new (s) | new / old |\n|---|---:|---:|---:|")
    for case in cases:
        old, new = (statistics.median(times[case, s]) for s in ("old", "new"))
        print(f"| {case} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    crc = crc_cost(work, args.rows, args.dim, args.repeats)
    print("\nZarr write / read of the same array, in this process (median s):")
    for name, v in crc.items():
        print(f"  {name:7s} write {v['write_s']:.3f}  read {v['read_s']:.3f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
