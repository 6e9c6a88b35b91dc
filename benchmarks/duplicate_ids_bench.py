#!/usr/bin/env python
"""Cost of counting duplicate ids at the end of ``bigalign import``
(:func:`bigalign.execution.pairing.duplicate_ids`; run by hand, not a test).

Writes an ``ids`` Zarr array as an import would (chunks of the store's row chunk: 21,845
rows for 384-d float32 vectors; int64, or variable-length strings ``doc-<n>``), then times
``duplicate_ids`` on it in fresh subprocesses, each reporting wall time and the growth of
peak RSS (VmHWM) over the process after opening the array. Two cases per kind: unique ids
(one ``n_unique`` pass) and ids with 1% repeated (the count, and an example).

    python benchmarks/duplicate_ids_bench.py                      # 1e7 int, 1e6 string
    python benchmarks/duplicate_ids_bench.py --int-rows 100000000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from bench import peak_rss_mb as peak_rss_mib  # VmHWM, one helper for every benchmark

CHUNK = 21_845


def write_ids(path: str, n: int, kind: str, repeated: float, seed: int = 0) -> None:
    import zarr

    rng = np.random.default_rng(seed)
    arr = zarr.create_array(path, shape=(n,), chunks=(CHUNK,),
                            dtype=np.int64 if kind == "int" else str, compressors=None,
                            fill_value=-1 if kind == "int" else "")
    step = CHUNK * 46
    for a in range(0, n, step):
        v = rng.permutation(np.arange(a, min(a + step, n), dtype=np.int64)) * 7 + 3
        if repeated:
            k = rng.random(len(v)) < repeated
            v[k] = rng.integers(0, n, k.sum()) * 7 + 3
        arr[a:a + len(v)] = v if kind == "int" else \
            np.array([f"doc-{x}" for x in v], dtype=np.dtypes.StringDType())


def child(path: str) -> None:
    import time

    import zarr

    from bigalign.execution.pairing import duplicate_ids

    ids = zarr.open_array(path, mode="r")
    base = peak_rss_mib()
    t0 = time.perf_counter()
    count, example = duplicate_ids(ids)
    print(json.dumps({"seconds": time.perf_counter() - t0, "count": count,
                      "rss_mib": peak_rss_mib() - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int-rows", type=int, default=10_000_000)
    ap.add_argument("--string-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    with tempfile.TemporaryDirectory(prefix="dup-bench-") as tmp:
        print(f"{'ids':>24}  {'seconds (median)':>16}  {'ids/s':>12}  {'peak RSS +MiB':>13}  "
              "duplicates")
        for kind, n in (("int", args.int_rows), ("string", args.string_rows)):
            for repeated in (0.0, 0.01):
                path = os.path.join(tmp, f"{kind}-{repeated}.zarr")
                write_ids(path, n, kind, repeated)
                runs = [json.loads(subprocess.run(
                    [sys.executable, __file__, "--child", path], check=True,
                    capture_output=True, text=True).stdout) for _ in range(args.repeats)]
                sec = statistics.median(r["seconds"] for r in runs)
                label = f"{n:,} {kind}{' 1% repeated' if repeated else ' unique'}"
                print(f"{label:>24}  {sec:>16.2f}  {n / sec:>12,.0f}  "
                      f"{max(r['rss_mib'] for r in runs):>13.0f}  {runs[0]['count']:,}")


if __name__ == "__main__":
    main()
