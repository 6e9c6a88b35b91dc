#!/usr/bin/env python
"""How much of a fit read's cost is memory traffic: the fit kernel (``Accumulator.add``:
float64 mean, centred float32 copy, row norms, float32 GEMM, float64 state) against its
GEMM alone (what naive Dask's ``a.T @ b`` runs), on one core, first alone and then while a
second process streams memory (``np.copyto`` of 512 MB arrays) on another core, as the other
workers of a many-core machine do. Run by hand on a quiet machine; not a test.

    python benchmarks/kernel_contention.py                 # d = 1024, 8,192 rows per read
    python benchmarks/kernel_contention.py --dim 4096 --rows 2048

Each read is a fresh array from a ring of four (not cache-hot); medians of --repeat reads.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np


def _hog(stop) -> None:
    """Copy 512 MB arrays until ``stop`` is set: a stand-in for other cores' memory use."""
    a = np.ones(2**26)
    b = np.empty_like(a)
    while not stop.is_set():
        np.copyto(b, a)


def measure(dim: int, rows: int, repeat: int) -> tuple[float, float]:
    """(kernel ms, GEMM ms): medians over ``repeat`` reads, BLAS on one thread."""
    from threadpoolctl import threadpool_limits

    from bigalign.maths.stats import Accumulator

    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal((rows, dim)) + 3).astype(np.float32) for _ in range(4)]
    ys = [(rng.standard_normal((rows, dim)) + 1).astype(np.float32) for _ in range(4)]
    scratch = (np.empty_like(xs[0]), np.empty_like(ys[0]))
    acc = Accumulator(dim, dim)
    with threadpool_limits(1, user_api="blas"):
        acc.add(xs[0], ys[0], scratch=scratch)
        kernel, gemm = [], []
        for r in range(repeat):
            x, y = xs[r % 4], ys[r % 4]
            t0 = time.perf_counter()
            acc.add(x, y, scratch=scratch)
            kernel.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            x.T @ y
            gemm.append(time.perf_counter() - t0)
    return statistics.median(kernel) * 1e3, statistics.median(gemm) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rows", type=int, default=8192, help="rows per read (default 8192)")
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args(argv)
    for label in ("alone", "with a memory-streaming process on another core"):
        stop = mp.Event()
        hog = None
        if label != "alone":
            hog = mp.Process(target=_hog, args=(stop,), daemon=True)
            hog.start()
            time.sleep(1.0)
        try:
            kernel, gemm = measure(args.dim, args.rows, args.repeat)
        finally:
            if hog is not None:
                stop.set()
                hog.join()
        print(f"d={args.dim} rows={args.rows} {label}: kernel {kernel:.1f} ms, GEMM alone "
              f"{gemm:.1f} ms, overhead {100 * (kernel / gemm - 1):+.1f} %")


if __name__ == "__main__":
    main()
