#!/usr/bin/env python
"""Throughput of ``bigalign import`` from Parquet against plain Zarr writes of the same rows
(run by hand, not a test).

It writes N rows x d float32 vectors as Parquet shards (a ``List(Float32)`` vector column, as
Hugging Face datasets and most embedding pipelines write, plus a string id column; polars'
default row groups; shard sizes that do not fall on chunk boundaries) and the same rows as
one .npy file, reads everything once to warm the page cache, then times, side by side:

* ``zarr-from-memory``: the rows already in memory (numpy), written chunk by chunk into an
  uncompressed Zarr array with the same chunks as the store, with Zarr's defaults;
  ``zarr-from-memory-wec``: the same with ``write_empty_chunks=True`` (as the store and
  apply's outputs are created), which skips Zarr's per-chunk "is it all fill value?"
  check: the write side alone, the floor for any importer on this disk;
* ``parquet-read``: polars reading every shard and converting the vectors to numpy, writing
  nothing: the read side alone;
* ``naive-parquet-to-zarr``: what one writes by hand: for each shard in order,
  ``pl.read_parquet`` -> numpy -> ``arr[a:b] = x`` (one thread of Python; Zarr does the
  read-modify-write of chunks that straddle shard boundaries; ``write_empty_chunks=True``,
  so it is not slowed by the check above);
* ``bigalign-import``: ``bigalign import SHARDS -o STORE --ids-column doc_id`` (Python API,
  checkpointing on, default threads); ``bigalign-import-noids``: the same without ids;
  ``bigalign-import-npy``: from the .npy file; ``bigalign-import-per-region``: Parquet with
  every region a task of its own (``UNIT_WASTE = inf``), i.e. without the row-group
  aware units, to show what they save.
* ``bigalign-probe``: probing ``--probe-files`` (200) small Parquet shards (1,000 rows x d,
  string ids, one row group) as ``bigalign import`` does before planning (expand the glob,
  read every footer, check columns and dimensions; 16 threads), in a fresh interpreter, so
  the first use of the Parquet metadata library counts; ``bigalign-probe-warm``: the same
  probe a second time in that interpreter (per-file cost alone).

Every run is a fresh subprocess reporting its wall time and peak RSS (VmHWM); repeats go
round-robin over the methods; the table shows medians (of 3 by default) as rows/s and MiB/s
of float32 vectors, and the largest peak RSS. Peak RSS counts pages of memory-mapped files
(the .npy input, and Parquet files, which polars maps) as well as allocated memory.

    python benchmarks/import_bench.py                        # 1M x 384, 8 shards
    python benchmarks/import_bench.py --rows 2000000 --repeats 3
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
METHODS = ("zarr-from-memory", "zarr-from-memory-wec", "parquet-read", "naive-parquet-to-zarr", "bigalign-import",
           "bigalign-import-noids", "bigalign-import-npy", "bigalign-import-per-region",
           "bigalign-probe", "bigalign-probe-warm")
PROBE_ROWS = 1000


def shard_bounds(rows: int, shards: int) -> list[int]:
    """Shard boundaries, deliberately uneven (and so not on chunk boundaries)."""
    weights = np.linspace(0.7, 1.3, shards)
    cuts = np.round(np.cumsum(weights) / weights.sum() * rows).astype(int)
    return [0] + [int(c) for c in cuts[:-1]] + [rows]


def generate(work: Path, rows: int, dim: int, shards: int) -> dict:
    import polars as pl

    meta = {"rows": rows, "dim": dim, "shards": shards, "format": 1}
    stamp = work / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return meta
    shutil.rmtree(work / "data", ignore_errors=True)
    (work / "data").mkdir(parents=True)
    bounds = shard_bounds(rows, shards)
    npy = np.lib.format.open_memmap(work / "data" / "all.npy", mode="w+", dtype=np.float32,
                                    shape=(rows, dim))
    rng = np.random.default_rng(0)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        x = rng.standard_normal((b - a, dim), dtype=np.float32)
        npy[a:b] = x
        df = pl.DataFrame({"doc_id": [f"doc-{j:010d}" for j in range(a, b)], "emb": x})
        df.with_columns(pl.col("emb").arr.to_list()).write_parquet(
            work / "data" / f"part-{i:05d}.parquet")
    npy.flush()
    del npy
    stamp.write_text(json.dumps(meta))
    return meta


def generate_probe(work: Path, files: int, dim: int) -> None:
    """``files`` small Parquet shards of PROBE_ROWS rows under work/probe (made once)."""
    import polars as pl

    meta = {"files": files, "rows": PROBE_ROWS, "dim": dim}
    stamp = work / "probe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return
    shutil.rmtree(work / "probe", ignore_errors=True)
    (work / "probe").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(files):
        x = rng.standard_normal((PROBE_ROWS, dim), dtype=np.float32)
        pl.DataFrame({"doc_id": [f"doc-{i}-{j}" for j in range(PROBE_ROWS)], "emb": x}) \
            .with_columns(pl.col("emb").arr.to_list()) \
            .write_parquet(work / "probe" / f"part-{i:05d}.parquet")
    stamp.write_text(json.dumps(meta))


def shard_files(work: Path) -> list[str]:
    return sorted(str(p) for p in (work / "data").glob("part-*.parquet"))


# ---- one run (in a fresh subprocess) -------------------------------------------------------

def run_one(method: str, work: Path, rows: int, dim: int) -> dict:
    import polars as pl
    import zarr

    from bigalign.commands.ingest import choose_chunk_rows, import_vectors

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.checkpoint", ignore_errors=True)
    chunk = choose_chunk_rows(dim, 4, rows)
    files = shard_files(work)
    t0 = time.perf_counter()
    if method.startswith("zarr-from-memory"):
        x = np.load(work / "data" / "all.npy")  # loaded before the clock restarts
        t0 = time.perf_counter()
        config = {"write_empty_chunks": True} if method.endswith("wec") else None
        arr = zarr.create_array(str(out), shape=x.shape, chunks=(chunk, dim), dtype=x.dtype,
                                compressors=None, config=config)
        for a in range(0, rows, chunk):
            arr[a:a + chunk] = x[a:a + chunk]
    elif method == "parquet-read":
        total = 0
        for f in files:
            v = pl.read_parquet(f, columns=["emb"])["emb"]
            total += len(v.explode().to_numpy().reshape(-1, dim))
        assert total == rows
    elif method == "naive-parquet-to-zarr":
        arr = zarr.create_array(str(out), shape=(rows, dim), chunks=(chunk, dim),
                                dtype=np.float32, compressors=None,
                                config={"write_empty_chunks": True})
        a = 0
        for f in files:
            x = pl.read_parquet(f, columns=["emb"])["emb"].explode().to_numpy().reshape(-1, dim)
            arr[a:a + len(x)] = x
            a += len(x)
    elif method.startswith("bigalign-probe"):
        from bigalign.commands.ingest import expand_inputs, probe_all

        def probe() -> int:
            found = probe_all(expand_inputs([str(work / "probe" / "*.parquet")]),
                              ids_column="doc_id")
            assert all(f.rows == PROBE_ROWS and f.dim == dim for f in found)
            return len(found)

        if method.endswith("warm"):
            probe()
            t0 = time.perf_counter()
        probe()
    elif method.startswith("bigalign-import"):
        if method.endswith("per-region"):
            import bigalign.commands.ingest
            bigalign.commands.ingest.UNIT_WASTE = float("inf")
        inputs = [str(work / "data" / "all.npy")] if method.endswith("npy") else files
        ids = "doc_id" if method == "bigalign-import" else None
        rep = import_vectors(inputs, str(out), ids_column=ids)
        assert rep.rows == rows
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    return {"method": method, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


# ---- driver --------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--probe-files", type=int, default=200)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workdir", default="bench-data/import")
    p.add_argument("--out", default="bench-results/import.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    if args.one:
        print(RESULT_TAG + json.dumps(run_one(args.one, work, args.rows, args.dim)))
        return
    t = time.perf_counter()
    meta = generate(work, args.rows, args.dim, args.shards)
    if any(m.startswith("bigalign-probe") for m in args.methods.split(",")):
        generate_probe(work, args.probe_files, args.dim)
    print(f"data: {args.rows:,} x {args.dim} float32 in {args.shards} Parquet shards "
          f"({sum(os.path.getsize(f) for f in shard_files(work)) / 1e9:.2f} GB) and one .npy "
          f"(ready in {time.perf_counter() - t:.0f}s)", file=sys.stderr)
    for f in [*shard_files(work), str(work / "data" / "all.npy"),  # warm the page cache
              *map(str, (work / "probe").glob("*.parquet"))]:
        with open(f, "rb") as fh:
            while fh.read(64 * MB):
                pass
    methods = args.methods.split(",")
    results = round_robin(__file__, methods, args.repeats,
                          ["--rows", args.rows, "--dim", args.dim, "--workdir", work])
    vec_mb = args.rows * args.dim * 4 / MB
    rows_out = []
    print(f"\n{args.rows:,} rows x {args.dim} float32 ({vec_mb:,.0f} MiB of vectors), "
          f"{args.shards} shards; {os.cpu_count()} CPUs, {platform.machine()}; "
          f"median of {args.repeats}\n")
    print("| method | seconds | rows/s | MiB/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for m in methods:
        s = statistics.median(r["seconds"] for r in results[m])
        peak = max(r["peak_rss_mb"] for r in results[m])
        rows_out.append({"method": m, "seconds": s, "rows_per_second": args.rows / s,
                         "mib_per_second": vec_mb / s, "peak_rss_mib": peak,
                         "runs": [r["seconds"] for r in results[m]]})
        print(f"| {m} | {s:.2f} | {args.rows / s:,.0f} | {vec_mb / s:,.0f} | {peak:,.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "cpus": os.cpu_count(), "results": rows_out},
                              indent=1))


if __name__ == "__main__":
    main()
