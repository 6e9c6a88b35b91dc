#!/usr/bin/env python
"""Rows per second per core of bigalign's fit and apply (run by hand, not a test): the
rates `bigalign plan` estimates time with (bigalign.planning.estimates.CORE_RATES).

For d in 384, 1024, 4096 it writes a float32 pair (uncompressed Zarr, 16 MiB chunks) under
--workdir, reads it once (page cache), then times, each in this process with one Dask
thread per core (--threads, default all cores; BLAS pinned to one thread per task): fit
with Gram matrices (the default), fit --no-diagnostics, and apply (no checkpoint). The rate
per core is rows/s divided by the threads: every core busy, Zarr's reads and writes
included, as on a cluster worker. Prints the best of --repeat runs per case (on a shared
machine the best is the least disturbed) and a CORE_RATES literal.

    python benchmarks/core_rates.py [--workdir core-rates-data] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

import bigalign

#: rows per case: each run takes ~3-10 s on two Haswell-class cores
ROWS = {384: 400_000, 1024: 64_000, 4096: 8_000}


def make(path: Path, rows: int, d: int, seed: int) -> str:
    chunk = (16 * 2**20) // (d * 4)
    arr = zarr.create_array(str(path), shape=(rows, d), chunks=(chunk, d), dtype="f4",
                            compressors=None, overwrite=True)
    rng = np.random.default_rng(seed)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        arr[s:s + n] = (rng.standard_normal((n, d)) + 0.5).astype(np.float32)
    arr[:]  # into the page cache
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="core-rates-data")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dims", default="384,1024,4096")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    n = args.threads
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rates: dict = {"fit": {}, "fit-nodiag": {}, "apply": {}}
    for d in [int(x) for x in args.dims.split(",")]:
        rows = ROWS.get(d, 200_000 * 384 * 384 // (d * d))
        s, t = make(work / f"a{d}.zarr", rows, d, 1), make(work / f"b{d}.zarr", rows, d, 2)
        tr = bigalign.fit(s, t, center=True, threads=n)
        def fit(**kw):  # the streaming pass only (the SVD is once per fit, not per row)
            run = bigalign.fit(s, t, center=True, threads=n, **kw).metadata["run"]
            return run["rows_per_second"], run["tasks"]

        def apply():
            r = bigalign.apply(tr, s, str(work / f"o{d}.zarr"), restart=True, overwrite=True,
                               threads=n, checkpoint=False)
            return r.rows_per_second, r.tasks

        cases = {"fit": fit, "fit-nodiag": lambda: fit(diagnostics=False), "apply": apply}
        for kind, run in cases.items():
            best = 0.0
            for _ in range(args.repeat):
                rate, tasks = run()  # fewer tasks than threads: fewer cores worked
                best = max(best, rate / min(n, tasks))
            rates[kind][d] = int(round(best, -1 if best < 10_000 else -2))
            print(f"d={d:5d} {kind:11s} {best:12,.0f} rows/s per core", flush=True)
        shutil.rmtree(work / f"o{d}.zarr", ignore_errors=True)
    print("CORE_RATES =", json.dumps(rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
