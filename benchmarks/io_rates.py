#!/usr/bin/env python
"""Storage bandwidth of this machine as ``bigalign plan`` models it (run by hand, not a test):
the read and write bytes per second that bound its time estimates
(:data:`bigalign.planning.estimates.READ_BYTES_PER_WORKER` and ``WRITE_BYTES_PER_WORKER``).

It writes ``--gb`` of float32 rows (``--dim`` wide, chunks of ~16 MiB, uncompressed, as
bigalign writes them) into a Zarr array with ``--workers`` threads, each writing whole
chunks, and syncs them to disk (timed: a write is durable when it is on the disk); then
evicts those files from the page cache (``posix_fadvise(DONTNEED)`` on each chunk file:
no other process's cache is touched) and reads them back with as many threads. Both
rates are printed in total and per worker (total / workers), with the machine's cores, as
the numbers to put in estimates.py.

    python benchmarks/io_rates.py --gb 3 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr


def evict(root: str) -> int:
    """Drop every file under ``root`` from the page cache; returns the bytes evicted."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.0, help="gigabytes to write and read")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    chunk = (16 * 2**20) // (args.dim * 4)
    rows = int(args.gb * 1e9) // (args.dim * 4) // chunk * chunk
    starts = range(0, rows, chunk)
    block = np.random.default_rng(0).standard_normal((chunk, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = os.path.join(tmp, "a.zarr")
        arr = zarr.create_array(url, shape=(rows, args.dim), chunks=(chunk, args.dim),
                                dtype="float32", compressors=None,
                                config={"write_empty_chunks": True})
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda a: arr.__setitem__(slice(a, a + chunk), block), starts))
        nbytes = evict(url)  # fsync (durable), then out of the cache
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda a: arr[a:a + chunk], starts))
        read_s = time.perf_counter() - t0
    w = args.workers
    print(f"{nbytes / 1e9:.2f} GB of float32 rows x {args.dim}, chunks of {chunk:,} rows, "
          f"{w} workers (threads), {os.cpu_count()} cores")
    for what, s in (("write (+fsync)", write_s), ("read (cold)", read_s)):
        print(f"  {what:15s} {s:6.2f} s  {nbytes / s / 1e6:8,.0f} MB/s total  "
              f"{nbytes / s / w / 1e6:8,.0f} MB/s per worker")


if __name__ == "__main__":
    main()
