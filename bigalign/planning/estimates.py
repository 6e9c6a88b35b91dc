"""What a plan costs, from shapes alone (``bigalign plan``): tasks, bytes read and written,
storage requests, memory per task and per worker, and time: the longest of computing at
measured per-core rates (:data:`CORE_RATES`), reading the bytes read and writing the bytes
written at the storage bandwidth (:class:`Bandwidth`: per worker, measured here by default,
and an optional ceiling for the whole cluster). The plans themselves are
:mod:`bigalign.planning.plan`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .plan import (COUNT_FAN_IN, ApplyPlan, ExportPlan, FitPlan, apply_task_bytes,
                   count_blocks, export_row_bytes, fit_task_bytes, partial_bytes, tree_nodes)

__all__ = ["CORE_RATES", "core_rate", "estimate_fit", "estimate_apply", "estimate_export",
           "estimate_import", "EXPORT_BYTES_PER_CORE", "IMPORT_BYTES_PER_CORE", "Bandwidth",
           "READ_BYTES_PER_WORKER", "WRITE_BYTES_PER_WORKER"]

#: Rows per second per core, measured with benchmarks/core_rates.py on this project's 2-core
#: dev machine (OpenBLAS 0.3.31 Haswell kernels, float32 Zarr in the page cache, 16 MiB
#: chunks, one Dask thread per core and every core busy, reads and writes included, the
#: final SVD not): fit with Gram matrices (the default), fit without them
#: (--no-diagnostics), and apply. Other d interpolate in the arithmetic per row
#: (:func:`core_rate`). Cores with AVX-512 or faster memory run faster; a cluster on an
#: object store may be bound by its bandwidth instead (:class:`Bandwidth` bounds the time).
CORE_RATES = {
    "fit": {384: 137_400, 1024: 19_500, 4096: 830},
    "fit-nodiag": {384: 220_800, 1024: 40_100, 4096: 2_420},
    "apply": {384: 197_900, 1024: 43_600, 4096: 3_000},
}
#: Where CORE_RATES come from, printed with every estimate.
CORE_RATES_SOURCE = "measured 2026-11-27 by benchmarks/core_rates.py on a 2-core Haswell VM"

#: Storage bandwidth of one worker (bytes/s) when none is given: this machine's local disk
#: as Zarr reads (cold: evicted from the page cache) and writes (synced) it, float32 chunks
#: of 16 MiB, 2 threads on 2 cores (benchmarks/io_rates.py, medians of 5: 859 and 1,603
#: MB/s in total). A worker on an object store gets what its network and the store's
#: request rate give it: measure it and pass ``--read-mb-s`` / ``--write-mb-s``.
READ_BYTES_PER_WORKER = 430e6
WRITE_BYTES_PER_WORKER = 800e6
#: Where the default bandwidths come from, printed with every estimate.
BANDWIDTH_SOURCE = ("a local disk, benchmarks/io_rates.py 2026-12-07; set yours: "
                    "--read-mb-s/--write-mb-s, --max-read-gb-s/--max-write-gb-s")


@dataclass(frozen=True)
class Bandwidth:
    """Storage bandwidth a plan's time assumes: bytes/s each worker reads and writes, and
    the most the storage gives the whole cluster (None: no ceiling but the workers')."""

    read_per_worker: float = READ_BYTES_PER_WORKER
    write_per_worker: float = WRITE_BYTES_PER_WORKER
    max_read: Optional[float] = None
    max_write: Optional[float] = None
    source: str = BANDWIDTH_SOURCE

    def total(self, workers: int) -> tuple[float, float]:
        """(read, write) bytes/s of ``workers`` workers, under the storage's ceilings."""
        read = self.read_per_worker * workers
        write = self.write_per_worker * workers
        return (min(read, self.max_read or math.inf), min(write, self.max_write or math.inf))


#: Memory of a Dask worker process before any task (Python, numpy, Dask, Zarr, s3fs).
WORKER_BASE_BYTES = 300 * 2**20

#: Seconds between lease renewals (storage.lease.Lease: ttl 120 s / 4).
LEASE_RENEWAL_S = 30.0

#: Keys of one object-store listing page (S3 ListObjectsV2).
LIST_PAGE = 1000


def _work_per_row(kind: str, dim_a: int, dim_b: int) -> float:
    """Multiply-adds per row: the cross product, plus half of each Gram matrix (syrk)."""
    if kind == "fit":
        return dim_a * dim_b + (dim_a * dim_a + dim_b * dim_b) / 2
    return float(dim_a * dim_b)


def core_rate(kind: str, dim_a: int, dim_b: int) -> float:
    """Rows/s per core for ``kind`` ("fit", "fit-nodiag", "apply") at these dims: CORE_RATES
    interpolated (log-log) in the multiply-adds per row, extrapolated with the end
    segments' slopes."""
    table = CORE_RATES[kind]
    pts = sorted((math.log(_work_per_row(kind, d, d)), math.log(r)) for d, r in table.items())
    x = math.log(_work_per_row(kind, dim_a, dim_b))
    if x <= pts[0][0]:
        (x0, y0), (x1, y1) = pts[0], pts[1]
    elif x >= pts[-1][0]:
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
    else:
        i = max(j for j in range(len(pts)) if pts[j][0] <= x)
        (x0, y0), (x1, y1) = pts[i], pts[min(i + 1, len(pts) - 1)]
    if x1 == x0:
        return math.exp(y0)
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _reads_of(rows_total: int, per_read: int, n_blocks: int) -> int:
    """Read calls: each task's rows in reads of ``per_read`` (the last of a task shorter)."""
    return max(n_blocks, math.ceil(rows_total / max(per_read, 1)) + n_blocks - 1)


def _chunk_gets(rows: int, chunk: int, shard: Optional[int], reads: int,
                aligned: bool, n_blocks: int) -> tuple[int, int]:
    """(chunk GETs, shard-index GETs) to read ``rows`` rows of an array: one GET per chunk
    (a range GET per inner chunk when sharded), and when sharded one index GET per read
    call per shard it touches; chunks straddling task boundaries (not aligned) twice."""
    gets = math.ceil(rows / chunk) + (0 if aligned else n_blocks)
    index = (reads + math.ceil(rows / shard)) if shard else 0
    return gets, index


def estimate_fit(plan: FitPlan, dims: tuple[int, int], itemsizes: tuple[int, int], gram: bool,
                 chunks: tuple[int, int], shards=(None, None), work: int = 4,
                 workers: Optional[int] = None, threads: int = 1,
                 rate: Optional[float] = None, bandwidth: Optional[Bandwidth] = None) -> dict:
    """What ``plan`` costs: tasks, checkpoint files and bytes, bytes and storage requests,
    memory per thread and worker, and (given ``workers``) time at CORE_RATES (or ``rate``
    rows/s per core). ``chunks``/``shards``: the inputs' (inner) chunk and shard rows."""
    rows = plan.stop - plan.start
    n_blocks = count_blocks(plan.start, plan.stop, plan.step, plan.rows_per_block)
    units = len(plan.units())
    partial = partial_bytes(dims[0], dims[1], gram)
    row_bytes = [d * i for d, i in zip(dims, itemsizes)]
    reads = _reads_of(rows, plan.rows_per_read, n_blocks)
    gets = [_chunk_gets(rows, c, s, reads, plan.aligned or side == 0, n_blocks)
            for side, (c, s) in enumerate(zip(chunks, shards))]
    per_thread = fit_task_bytes(plan.rows_per_read, dims[0], dims[1], itemsizes[0],
                                itemsizes[1], work, gram, plan.fan_in)
    out = {
        "kind": "fit", "rows": rows, "dims": list(dims),
        "tasks": plan.tasks(), "leaf_tasks": n_blocks, "merge_tasks": plan.tasks() - n_blocks,
        "rows_per_task": plan.rows_per_block,
        "input_bytes_per_task": plan.rows_per_block * sum(row_bytes),
        "rows_per_read": plan.rows_per_read, "fan_in": plan.fan_in,
        "checkpoint": {"units": units, "files": units, "blocks_per_unit": plan.blocks_per_unit,
                       "partial_bytes": partial, "bytes_written": units * partial,
                       "fraction_of_input": units * partial / max(rows * sum(row_bytes), 1)},
        "bytes_read": rows * sum(row_bytes),
        "bytes_written": units * partial + 8 * (dims[0] * dims[1] + dims[0] + dims[1]),
        "requests": {
            "chunk_gets": sum(g[0] for g in gets), "shard_index_gets": sum(g[1] for g in gets),
            "checkpoint_puts": units, "fence_checks": units,
            "resume_list_pages": math.ceil(units / LIST_PAGE) or 1,
        },
        "memory": {"per_thread": per_thread,
                   "client": (plan.fan_in + 3) * partial + 8 * 3 * dims[0] * dims[1]},
    }
    _time(out, rate or core_rate("fit" if gram else "fit-nodiag", *dims), rows, workers,
          threads, per_thread, bandwidth)
    return out


def estimate_apply(plan: ApplyPlan, dims: tuple[int, int], item_in: int, item_out: int,
                   source_chunk: int, source_shard: Optional[int], out_chunk: int,
                   out_shard: Optional[int], workers: Optional[int] = None, threads: int = 1,
                   rate: Optional[float] = None, ids: Optional[tuple[str, bool]] = None,
                   bandwidth: Optional[Bandwidth] = None) -> dict:
    """What ``plan`` costs (as :func:`estimate_fit`): regions and markers, bytes read and
    written, storage requests (source GETs, output PUTs, markers, fence checks, the
    listings that verify and ``status`` read), memory and time. ``ids``: (kind, stored) when
    the output is a store with ids (the source is a store): "int64" or "string" as written,
    and whether the source has an ids array to read (else its row numbers are written);
    each write then reads the ids of its rows (whole source chunks) and writes them in
    chunks of the output's shards (or chunks), as the vectors."""
    rows = plan.rows
    n = count_blocks(0, rows, plan.step, plan.rows_per_block)
    write_step, per_write, read_step, per_read = plan.layout()
    writes = _reads_of(rows, per_write, n)
    reads = _reads_of(rows, per_read, n)
    gets = _chunk_gets(rows, source_chunk, source_shard, reads, plan.aligned, n)
    puts = math.ceil(rows / out_shard) if out_shard else math.ceil(rows / out_chunk)
    per_thread = apply_task_bytes(per_read, dims[0], dims[1], item_in, item_out, per_write,
                                  out_shard is not None)
    out = {
        "kind": "apply", "rows": rows, "dims": list(dims),
        "tasks": plan.tasks(), "region_tasks": n, "count_tasks": plan.tasks() - n,
        "rows_per_task": plan.rows_per_block, "rows_per_write": per_write,
        "rows_per_read": per_read,
        "output": {"chunk_rows": out_chunk, "shard_rows": out_shard},
        "checkpoint": {"markers": n, "files": n,
                       "list_pages": math.ceil(n / LIST_PAGE) or 1},
        "bytes_read": rows * dims[0] * item_in,
        "bytes_written": rows * dims[1] * item_out,
        "requests": {"chunk_gets": gets[0], "shard_index_gets": gets[1], "output_puts": puts,
                     "marker_puts": n, "fence_checks": writes + n,
                     "verify_list_pages": math.ceil(n / LIST_PAGE) or 1},
        "memory": {"per_thread": per_thread, "client": 8 * dims[0] * dims[1]},
    }
    if ids is not None:
        kind, stored = ids
        id_bytes = rows * export_row_bytes(0, 0, kind)
        out["ids"] = kind if stored else "row numbers (int64)"
        out["bytes_read"] += id_bytes if stored else 0
        out["bytes_written"] += id_bytes
        out["requests"].update(ids_gets=max(writes, math.ceil(rows / source_chunk))
                               if stored else 0, ids_puts=puts)
    _time(out, rate or core_rate("apply", *dims), rows, workers, threads, per_thread,
          bandwidth)
    return out


#: Export throughput per core in bytes of rows written (vectors + ids): 1M x 384 float32 with
#: string ids in 2.37 s on 2 cores (benchmarks/export_bench.py, median of 5, noisy: single
#: runs 1.7-4.1 s), i.e. ~327 MB/s per core. Parquet encoding and the reads scale with bytes,
#: not with d, so the rate in rows/s is this over the row's bytes.
EXPORT_BYTES_PER_CORE = 327e6


def estimate_export(plan: ExportPlan, dim: int, item_in: int, item_out: int,
                    ids_kind: str, ids_stored: bool, source_chunk: int,
                    source_shard: Optional[int], workers: Optional[int] = None,
                    threads: int = 1, rate: Optional[float] = None,
                    bandwidth: Optional[Bandwidth] = None) -> dict:
    """What an export ``plan`` costs (as :func:`estimate_apply`): files, bytes read and
    written (uncompressed: float vectors barely compress), storage requests, memory and
    time at :data:`EXPORT_BYTES_PER_CORE`. ``ids_kind``: "int64" or "string" as written;
    ``ids_stored``: the source has an ids array to read (else row numbers are written)."""
    rows = plan.rows
    n = count_blocks(plan.start, plan.stop, plan.step, plan.rows_per_file)
    id_bytes = export_row_bytes(0, 0, ids_kind)
    row_out = export_row_bytes(dim, item_out, ids_kind)
    reads = _reads_of(rows, plan.rows_per_group, n)
    gets = _chunk_gets(rows, source_chunk, source_shard, reads, True, n)
    # a task holds one row group as read, as a polars frame, and as encoded Parquet
    per_thread = plan.rows_per_group * (dim * item_in + 2 * row_out + id_bytes)
    out = {
        "kind": "export", "rows": rows, "dims": [dim],
        "tasks": plan.tasks(), "files": n, "count_tasks": plan.tasks() - n,
        "rows_per_file": plan.rows_per_file, "rows_per_group": plan.rows_per_group,
        "bytes_per_file": plan.rows_per_file * row_out,
        "checkpoint": {"markers": n, "files": n, "list_pages": math.ceil(n / LIST_PAGE) or 1},
        "bytes_read": rows * (dim * item_in + (id_bytes if ids_stored else 0)),
        "bytes_written": rows * row_out,
        "requests": {"chunk_gets": gets[0] * (2 if ids_stored else 1),
                     "shard_index_gets": gets[1], "file_puts": n, "marker_puts": n,
                     "fence_checks": 2 * n,
                     "verify_list_pages": math.ceil(n / LIST_PAGE) or 1},
        "memory": {"per_thread": per_thread, "client": 0},
    }
    _time(out, rate or EXPORT_BYTES_PER_CORE / row_out, rows, workers, threads, per_thread,
          bandwidth)
    if rate is None:
        out["rate"]["source"] = ("~327 MB/s of rows per core, measured by "
                                 "benchmarks/export_bench.py on a 2-core Haswell VM (noisy)")
    return out


#: Import throughput per core in bytes of input vectors (README, benchmarks/import_bench.py
#: on a 2-core VM, medians): Parquet 1M x 384 float32 with string ids in 3.96 s (~194 MB/s
#: a core: decoding dominates); .npy 1.24M rows/s (~952 MB/s a core: copies and writes).
IMPORT_BYTES_PER_CORE = {"parquet": 194e6, "direct": 952e6}


def estimate_import(plan, dim: int, item_in: int, item_out: int, ids_kind: Optional[str],
                    fmt: str = "parquet", files: Optional[int] = None,
                    workers: Optional[int] = None, threads: int = 1,
                    rate: Optional[float] = None,
                    bandwidth: Optional[Bandwidth] = None) -> dict:
    """What an import ``plan`` (:class:`~bigalign.planning.import_plan.ImportPlan`) costs,
    as :func:`estimate_apply`: tasks (units and the count tree), regions and markers,
    bytes read (vectors of ``item_in`` bytes a value, and ids) and written (the store:
    ``item_out``, ids of ``ids_kind``: "int64", "string" or None), storage requests,
    memory and time at :data:`IMPORT_BYTES_PER_CORE` of ``fmt`` ("parquet" or "direct":
    .npy/.fvecs)."""
    rows, chunk = plan.rows, plan.chunk_rows
    regions = plan.regions
    n = count_blocks(0, rows, regions.step, regions.rows_per_block)
    _, per_write, _, _ = regions.layout()
    writes = _reads_of(rows, per_write, n)
    units = len(plan.units())
    id_bytes = export_row_bytes(0, 0, ids_kind) if ids_kind else 0
    puts = math.ceil(rows / chunk)
    # a thread holds one write of the store's dtype, the batch in hand, and (Parquet) the
    # row group polars decodes (about a batch again)
    batch = per_write * (dim * item_in + id_bytes)
    per_thread = per_write * (dim * item_out + id_bytes) + batch * (2 if fmt == "parquet"
                                                                   else 1)
    out = {
        "kind": "import", "rows": rows, "dims": [dim], "format": fmt,
        "files": len(plan.file_rows) if files is None else files,
        "tasks": units + tree_nodes(units, COUNT_FAN_IN), "unit_tasks": units,
        "count_tasks": tree_nodes(units, COUNT_FAN_IN), "regions": n,
        "rows_per_region": regions.rows_per_block, "rows_per_write": per_write,
        "output": {"chunk_rows": chunk, "shard_rows": None},
        "checkpoint": {"markers": n, "files": n, "list_pages": math.ceil(n / LIST_PAGE) or 1},
        "bytes_read": rows * (dim * item_in + id_bytes),
        "bytes_written": rows * (dim * item_out + id_bytes),
        "requests": {"chunk_gets": 0, "shard_index_gets": 0,
                     "output_puts": puts * (2 if ids_kind else 1), "marker_puts": n,
                     "fence_checks": writes + n,
                     "verify_list_pages": math.ceil(n / LIST_PAGE) or 1},
        "memory": {"per_thread": per_thread, "client": 0},
    }
    per_core = IMPORT_BYTES_PER_CORE["parquet" if fmt == "parquet" else "direct"]
    _time(out, rate or per_core / (dim * item_in), rows, workers, threads, per_thread,
          bandwidth)
    if rate is None:
        out["rate"]["source"] = (f"~{per_core / 1e6:,.0f} MB/s of input vectors per core, "
                                 "measured by benchmarks/import_bench.py on a 2-core VM")
    return out


def _time(out: dict, rate: float, rows: int, workers: Optional[int], threads: int,
          per_thread: int, bandwidth: Optional[Bandwidth] = None) -> None:
    """Add the per-core rate, the storage bandwidth assumed, and with ``workers`` the cores,
    memory per worker and time to an estimate: the longest of computing (``rows`` at
    ``rate`` rows/s per core), reading ``bytes_read`` and writing ``bytes_written`` at the
    cluster's bandwidth (``time.bound`` says which): a lower bound, as the three overlap
    across tasks; ``time.serial_seconds``, their sum, is the time when nothing overlaps
    (one disk and few cores doing all three, as on the machine that measured them)."""
    bw = bandwidth or Bandwidth()
    threads = max(1, int(threads or 1))
    out["memory"]["per_worker"] = WORKER_BASE_BYTES + threads * per_thread
    out["memory"]["threads_per_worker"] = threads
    out["rate"] = {"rows_per_second_per_core": rate, "source": CORE_RATES_SOURCE}
    out["bandwidth"] = {"read_per_worker": bw.read_per_worker,
                        "write_per_worker": bw.write_per_worker,
                        "max_read": bw.max_read, "max_write": bw.max_write,
                        "source": bw.source}
    if workers:
        cores = int(workers) * threads
        read, write = bw.total(int(workers))
        parts = {"compute": rows / (rate * cores), "read": out["bytes_read"] / read,
                 "write": out["bytes_written"] / write}
        bound = max(parts, key=parts.get)
        seconds = parts[bound]
        out["time"] = {"workers": int(workers), "threads_per_worker": threads, "cores": cores,
                       "seconds": seconds, "bound": bound,
                       "serial_seconds": sum(parts.values()),
                       "compute_seconds": parts["compute"], "read_seconds": parts["read"],
                       "write_seconds": parts["write"],
                       "read_bytes_per_second": read, "write_bytes_per_second": write}
        reqs = out["requests"]
        reqs["lease_renewals"] = 3 * math.ceil(seconds / LEASE_RENEWAL_S)
