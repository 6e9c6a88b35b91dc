#!/usr/bin/env python
"""Throughput of ``bigalign export STORE --format parquet`` against polars writing the same
rows from memory once (run by hand, not a test).

It writes an embedding store of N rows x d float32 vectors with string ids (``doc-0000000001``;
chunks of ~32 MiB, as ``bigalign import`` makes them), reads it once to warm the page cache,
then times, side by side:

* ``polars-write-once``: the whole store already in memory as one polars frame (string ids,
  ``Array(Float32, d)`` vectors; built before the clock starts), written with
  ``write_parquet`` to one file (snappy, as the export): the write side alone, one thread
  of Python, no store reads, no checkpoint;
* ``bigalign-export``: ``export_parquet(STORE, DIR)`` (Python API: default threads, files
  of ~256 MB, snappy, checkpointing on): reads the store, checks every row, writes the
  files and the manifest.

Every run is a fresh subprocess reporting its wall time and peak RSS (VmHWM); repeats go
round-robin over the methods; the table shows medians (of 3 by default) as rows/s and MiB/s
of float32 vectors, and the largest peak RSS.

    python benchmarks/export_bench.py                        # 1M x 384, ~1.5 min
    python benchmarks/export_bench.py --rows 2000000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import RESULT_TAG, round_robin  # noqa: E402  (one driver for every benchmark)
from bench import peak_rss_mb as _peak_rss_mb  # noqa: E402  (VmHWM)

MB = 2**20
METHODS = ("polars-write-once", "bigalign-export")


def generate(work: Path, rows: int, dim: int) -> dict:
    from bigalign.storage.embedding_store import create_store
    from bigalign.commands.ingest import choose_chunk_rows

    meta = {"rows": rows, "dim": dim, "format": 1}
    stamp = work / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return meta
    shutil.rmtree(work / "s.store", ignore_errors=True)
    chunk = choose_chunk_rows(dim, 4, rows)
    g = create_store(str(work / "s.store"), rows=rows, dim=dim, dtype=np.float32,
                     chunk_rows=chunk, ids_kind="string", model="bench")
    rng = np.random.default_rng(0)
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        g["embeddings"][a:b] = rng.standard_normal((b - a, dim), dtype=np.float32)
        g["ids"][a:b] = np.array([f"doc-{j:010d}" for j in range(a, b)])
    g.attrs["bigalign"] = dict(g.attrs["bigalign"], complete=True)
    stamp.write_text(json.dumps(meta))
    return meta


# ---- one run (in a fresh subprocess) -------------------------------------------------------

def run_one(method: str, work: Path, rows: int, dim: int) -> dict:
    import polars as pl

    from bigalign.storage.embedding_store import open_store
    from bigalign.commands.parquet_export import export_parquet

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.checkpoint", ignore_errors=True)
    store = str(work / "s.store")
    if method == "polars-write-once":
        emb, ids, _ = open_store(store)
        frame = pl.DataFrame([pl.Series("id", ids[:], dtype=pl.String),
                              pl.Series("embedding", emb[:], dtype=pl.Array(pl.Float32, dim))])
        out.mkdir()
        t0 = time.perf_counter()
        frame.write_parquet(out / "all.parquet", compression="snappy")
        files = 1
    elif method == "bigalign-export":
        t0 = time.perf_counter()
        rep = export_parquet(store, str(out))
        assert rep.rows == rows
        files = rep.units_total
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.glob("*.parquet"))
    return {"method": method, "seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
            "files": files, "bytes": size}


# ---- driver --------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workdir", default="bench-data/export")
    p.add_argument("--out", default="bench-results/export.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    if args.one:
        print(RESULT_TAG + json.dumps(run_one(args.one, work, args.rows, args.dim)))
        return
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    generate(work, args.rows, args.dim)
    print(f"data: {args.rows:,} x {args.dim} float32 store with string ids (ready in "
          f"{time.perf_counter() - t:.0f}s)", file=sys.stderr)
    for root, _, names in os.walk(work / "s.store"):  # warm the page cache
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                while fh.read(64 * MB):
                    pass
    methods = args.methods.split(",")
    results = round_robin(__file__, methods, args.repeats,
                          ["--rows", args.rows, "--dim", args.dim, "--workdir", work])
    shutil.rmtree(work / "out", ignore_errors=True)
    vec_mb = args.rows * args.dim * 4 / MB
    print(f"\n{args.rows:,} rows x {args.dim} float32 ({vec_mb:,.0f} MiB of vectors) with "
          f"string ids; {os.cpu_count()} CPUs, {platform.machine()}; median of "
          f"{args.repeats}\n")
    print("| method | files | seconds | rows/s | MiB/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for m in methods:
        s = statistics.median(r["seconds"] for r in results[m])
        peak = max(r["peak_rss_mb"] for r in results[m])
        files = results[m][0]["files"]
        summary[m] = {"seconds": s, "rows_per_second": args.rows / s,
                      "mib_per_second": vec_mb / s, "peak_rss_mb": peak, "files": files,
                      "bytes": results[m][0]["bytes"], "runs": results[m]}
        print(f"| {m} | {files} | {s:.2f} | {args.rows / s:,.0f} | {vec_mb / s:,.0f} | "
              f"{peak:,.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": args.rows, "dim": args.dim,
                                          "cpus": os.cpu_count(), "results": summary},
                                         indent=1))


if __name__ == "__main__":
    main()
