"""Pairing by id at scale: the polars join's time and peak memory, and the gather's reads.

    python benchmarks/join_bench.py                 # 10^6, 10^7 (int), 10^7 (string) ids
    python benchmarks/join_bench.py --sizes 1e8     # 10^8 int ids (needs ~20 GB free)

Each case runs in a fresh subprocess that reports its wall time and peak RSS (VmHWM). The
corpus side has N ids in storage order (int64 row numbers, or strings "doc-<n>"), stored as a
Zarr ids array in chunks of 2^20; the target side is a uniform sample of N/10 of them in
random order plus N/100 ids the corpus does not have. What is timed is
:func:`bigalign.execution.pairing.join` reading both Zarr id arrays chunk by chunk, so the peak
includes reading the ids, not only the join. The gather case reads a (N, 8) float32 corpus
in chunks of 10,000 rows and reports how many chunks it read for the sampled rows against
the number of distinct chunks that hold them (equal: each needed chunk read once).
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

CHILD = r"""
import json, sys, time, numpy as np, zarr
from bigalign.execution.pairing import join
src = zarr.open_array(sys.argv[1]); tgt = zarr.open_array(sys.argv[2])
t0 = time.perf_counter(); p = join(src, tgt); dt = time.perf_counter() - t0
peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({"seconds": dt, "peak_mb": peak / 1024, "matched": p.matched}))
"""


def ids_arrays(folder: str, n: int, kind: str):
    import zarr

    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=n // 10, replace=False)
    extra = np.arange(n, n + n // 100)
    target = rng.permutation(np.concatenate([sample, extra]))
    chunk = 1 << 20
    out = []
    for name, values in (("source", None), ("target", target)):
        path = os.path.join(folder, f"{kind}-{n}-{name}.zarr")
        count = n if values is None else len(values)
        dtype = np.int64 if kind == "int" else np.dtypes.StringDType()
        arr = zarr.create_array(path, shape=(count,), chunks=(chunk,), dtype=dtype,
                                overwrite=True)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            block = np.arange(start, stop) if values is None else values[start:stop]
            arr[start:stop] = block if kind == "int" else \
                np.char.add("doc-", block.astype(str)).astype(dtype)
        out.append(path)
    return out


def run_join(folder: str, n: int, kind: str) -> dict:
    src, tgt = ids_arrays(folder, n, kind)
    p = subprocess.run([sys.executable, "-c", CHILD, src, tgt], capture_output=True,
                       text=True, check=True)
    return dict(json.loads(p.stdout.strip().splitlines()[-1]), ids=n, kind=kind)


def run_gather(folder: str, n: int) -> dict:
    import zarr

    from bigalign.execution.pairing import GatherReport, gather
    from bigalign.storage.stores import open_embeddings

    path = os.path.join(folder, f"corpus-{n}.zarr")
    arr = zarr.create_array(path, shape=(n, 8), chunks=(10_000, 8), dtype="f4",
                            overwrite=True, compressors=None)
    for start in range(0, n, 10_000 * 64):
        stop = min(start + 10_000 * 64, n)
        arr[start:stop] = np.ones((stop - start, 8), np.float32)
    rows = np.random.default_rng(1).choice(n, size=n // 10, replace=False)
    report = GatherReport()
    t0 = time.perf_counter()
    gather(open_embeddings(path), rows, os.path.join(folder, "g.npy"), report=report)
    return {"rows": n, "sampled": len(rows), "chunks_read": report.chunks_read,
            "chunks_holding_sampled_rows": int(len(np.unique(rows // 10_000))),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7", help="comma-separated id counts")
    ap.add_argument("--strings", default="1e7", help="sizes also run with string ids")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    sizes = [int(float(v)) for v in args.sizes.split(",") if v]
    strings = [int(float(v)) for v in args.strings.split(",") if v]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = [run_join(tmp, n, "int") for n in sizes]
        rows += [run_join(tmp, n, "str") for n in strings]
        print(f"{'ids':>12} {'kind':>5} {'matched':>11} {'seconds':>8} {'peak MB':>8}")
        for r in rows:
            print(f"{r['ids']:>12,} {r['kind']:>5} {r['matched']:>11,} {r['seconds']:>8.2f} "
                  f"{r['peak_mb']:>8.0f}")
        g = run_gather(tmp, min(sizes[-1], 10_000_000))
        print(f"gather: {g['sampled']:,} of {g['rows']:,} rows: read {g['chunks_read']:,} "
              f"chunks; {g['chunks_holding_sampled_rows']:,} chunks hold sampled rows "
              f"({g['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
