#!/usr/bin/env python
"""Where a fresh process's first CUDA run spends its time (run by hand on a GPU machine):
CuPy start, the first block_moments at a few shapes (kernel compilation; CuPy caches
compiled kernels in ~/.cupy/kernel_cache), pinned host allocations, per-thread start."""

import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T0 = time.perf_counter()


def timed(label, fn, limit=40.0):
    import cupy as cp
    if time.perf_counter() - T0 > limit:
        print(f"{label}: skipped (past {limit:.0f}s)", flush=True)
        return None
    t = time.perf_counter()
    out = fn()
    cp.cuda.Device().synchronize()
    print(f"{label}: {time.perf_counter() - t:.3f}s", flush=True)
    return out


def main():
    t = time.perf_counter()
    import cupy as cp
    import cupyx
    from bigalign.execution import gpu
    from bigalign.maths.mapping import map_rows
    from bigalign.maths.stats import block_moments
    print(f"import cupy: {time.perf_counter() - t:.3f}s", flush=True)
    timed("first kernel (arange.sum)", lambda: cp.arange(10).sum())
    held = []
    for mib in (2, 2, 32, 32, 32, 32, 256):
        held.append(timed(f"empty_pinned {mib} MiB (new)",
                          lambda: cupyx.empty_pinned((mib << 20,), np.uint8), limit=25))
    for d, n in [(1024, 8192), (1024, 8192), (1024, 4096), (4096, 2048), (4096, 2048)]:
        a = cp.random.RandomState(0).standard_normal((n, d), dtype=cp.float32)
        b = a + 1
        timed(f"block_moments+merge gram d={d} n={n}",
              lambda: gpu.merge(cp, *[block_moments(a, b, gram=True, dtype=np.float32)] * 2))
        timed(f"map_rows d={d} n={n}",
              lambda: map_rows(a.copy(), cp.eye(d, dtype=cp.float32), cp.zeros(d),
                               cp.zeros(d), inplace=True, flags=[]))
    for h in held:
        if h is not None:
            h[...] = 0  # touch

    def worker(out, i):
        t = time.perf_counter()
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            x = cp.ones((64, 64), cp.float32)
            float((x @ x).sum())
        out[i] = time.perf_counter() - t
    res = [0.0] * 8
    t = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(res, i)) for i in range(8)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    print(f"8 new threads, first stream + matmul each: {time.perf_counter() - t:.3f}s "
          f"(per thread max {max(res):.3f}s)", flush=True)
    print(f"total {time.perf_counter() - T0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
