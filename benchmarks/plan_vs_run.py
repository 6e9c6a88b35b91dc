#!/usr/bin/env python
"""``bigalign plan apply``'s estimated time against a measured apply on this machine (run
by hand, not a test): the factor the README's sizing guide states.

It writes a float32 source of ``--rows`` x ``--dim`` (chunks of 16 MiB, uncompressed), fits
a transform on a small planted pair of the same width, evicts the source from the page
cache (``posix_fadvise(DONTNEED)`` on its files only: benchmarks/io_rates.py), then runs
``bigalign apply`` with ``--workers`` local worker processes of one thread, and syncs the
output to disk (timed apart: the model's write bandwidth is of synced writes). It prints
the plan's estimate (compute, reads, writes and the bound) next to the measured seconds
and their ratio, for each of ``--repeats`` runs.

    python benchmarks/plan_vs_run.py --rows 2000000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import zarr

sys.path.insert(0, os.path.dirname(__file__))
from io_rates import evict  # noqa: E402


def bigalign_cli(*argv: str) -> str:
    code = "import sys; from bigalign.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], check=True,
                          capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import bigalign
    from distributed import LocalCluster

    d = args.dim
    chunk = (16 * 2**20) // (d * 4)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        src = os.path.join(tmp, "source.zarr")
        arr = zarr.create_array(src, shape=(args.rows, d), chunks=(chunk, d),
                                dtype="float32", compressors=None)
        for a in range(0, args.rows, chunk):
            arr[a:a + chunk] = rng.standard_normal((min(chunk, args.rows - a), d),
                                                   dtype=np.float32)
        x = rng.standard_normal((20_000, d)).astype(np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        pair = [os.path.join(tmp, n) for n in ("a.zarr", "b.zarr")]
        for path, data in zip(pair, (x, (x @ q).astype(np.float32))):
            zarr.create_array(path, data=data, chunks=(5000, d), compressors=None)
        transform = os.path.join(tmp, "t")
        bigalign.fit(*pair, output=transform)
        est = json.loads(bigalign_cli("plan", "apply", transform, src, "--workers",
                                      str(args.workers), "--threads-per-worker", "1",
                                      "--json"))
        t = est["time"]
        print(f"{args.rows:,} rows x {d} float32 -> {d}: {est['bytes_read'] / 1e9:.2f} GB "
              f"read, {est['bytes_written'] / 1e9:.2f} GB written, {args.workers} workers x 1 "
              f"thread on {os.cpu_count()} cores")
        print(f"  model: {t['seconds']:.2f} s, bound by {t['bound']} (compute "
              f"{t['compute_seconds']:.2f} s, reads {t['read_seconds']:.2f} s, writes "
              f"{t['write_seconds']:.2f} s); {t['serial_seconds']:.2f} s if nothing "
              "overlaps")
        for i in range(args.repeats):
            out = os.path.join(tmp, f"out{i}.zarr")
            evict(src)
            t0 = time.perf_counter()
            with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                              dashboard_address=":0", host="127.0.0.1") as cluster:
                started = time.perf_counter()  # as apply --workers, the start apart
                report = bigalign.apply(transform, src, output=out,
                                        scheduler=cluster.scheduler_address, progress=False)
                run_s = time.perf_counter() - started
                evict(out)  # fsync every output file, then drop it from the cache
                total = time.perf_counter() - started
            print(f"  run {i + 1}: apply {run_s:.2f} s ({report.rows:,} rows; the cluster's "
                  f"start, {started - t0:.1f} s, apart) + sync {total - run_s:.2f} s = "
                  f"{total:.2f} s: {total / t['seconds']:.2f}x the model's bound, "
                  f"{total / t['serial_seconds']:.2f}x its serial time")
            subprocess.run(["rm", "-rf", out, f"{out}.checkpoint"], check=True)


if __name__ == "__main__":
    main()
