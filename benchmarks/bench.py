#!/usr/bin/env python
"""Throughput and peak-memory benchmark of bigalign's fit and apply (run by hand, not a test).

For each case (embedding dimension d, N rows) it generates a paired source/target pair of
uncompressed, row-chunked float32 Zarr v3 arrays (a planted rotation plus noise), reads them
once to warm the page cache, then times, side by side:

* bigalign fit (default diagnostics, diagnostics=False, and with output= so checkpointing is
  on) and bigalign apply;
* the practical limit: a hand-written loop over the same chunks with the next chunk read in
  a second thread while the current one is multiplied (BLAS on one thread), computing the
  same statistics with bigalign.maths.stats (fit) or the same map (apply, with write-behind);
* naive Dask: ``da.from_zarr`` then ``(a.T @ b).compute()`` / ``(a @ Q).to_zarr(...)``, and
  the naive Dask code for a fit's result (centred cross-covariance, then the SVD);
* scipy.linalg.orthogonal_procrustes on arrays loaded into memory (small cases only).

Every run of every method is a fresh subprocess (``bench.py --one METHOD ...``) that reports
its wall time and its peak RSS (VmHWM), so peaks do not contaminate each other. Repeats are
round-robin over methods (drift on a shared machine hits all methods alike); the table shows
the median. Results: a Markdown table on stdout and JSON at ``--out``.

    python benchmarks/bench.py --quick                 # smoke check, ~2 minutes
    python benchmarks/bench.py                         # full: d=384,1024 at ~1.5 GB and 4x
    python benchmarks/bench.py --scale-run             # plus 10^7 x 384 (flat memory)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MB = 2**20
GB = 10**9
RESULT_TAG = "BENCH-RESULT "
DATA_FORMAT = 1  # bump when generate_pair changes, so old data is regenerated


# ---- methods ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A benchmarked method: fit or apply, the loop it is compared with, what it does."""

    name: str
    kind: str  # "fit" or "apply"
    baseline: str
    about: str


METHODS = {m.name: m for m in [
    Method("loop-fit", "fit", "loop-fit",
           "prefetch loop: cross-covariance only (block_moments + merge)"),
    Method("loop-fit-diag", "fit", "loop-fit-diag",
           "prefetch loop: cross-covariance + Gram matrices"),
    Method("bigalign-fit", "fit", "loop-fit-diag",
           "bigalign.fit(center=True) defaults (diagnostics: cross + Gram), no checkpoint"),
    Method("bigalign-fit-nodiag", "fit", "loop-fit",
           "bigalign.fit(center=True, diagnostics=False), no checkpoint"),
    Method("bigalign-fit-ckpt", "fit", "loop-fit-diag",
           "bigalign.fit(center=True, output=...): checkpointing on"),
    Method("dask-fit", "fit", "loop-fit",
           "naive dask: (a.T @ b).compute(), threaded scheduler, default settings"),
    Method("dask-fit-pinned", "fit", "loop-fit",
           "naive dask: (a.T @ b).compute(), BLAS pinned to 1 thread per Dask thread"),
    Method("dask-procrustes-pinned", "fit", "loop-fit",
           "naive dask Procrustes, the same result as a fit: ((a - a.mean(0)).T @ (b - "
           "b.mean(0))).compute() with BLAS pinned, then numpy's SVD (all threads)"),
    Method("scipy-fit", "fit", "loop-fit",
           "in memory: load both arrays, centre, scipy orthogonal_procrustes"),
    Method("loop-apply", "apply", "loop-apply",
           "prefetch loop: read i+1 | (x - mu_a) @ Q + mu_b on i | write i-1"),
    Method("bigalign-apply", "apply", "loop-apply",
           "bigalign.apply(transform, src, out, overwrite=True) (done-markers per region)"),
    Method("bigalign-apply-nockpt", "apply", "loop-apply",
           "bigalign.apply(..., checkpoint=False): no done-markers (checkpoint overhead)"),
    Method("dask-apply", "apply", "loop-apply",
           "naive dask: (a @ Q).to_zarr(out, overwrite=True, compressors=None)"),
    Method("dask-apply-pinned", "apply", "loop-apply",
           "naive dask: (a @ Q).to_zarr(...), BLAS pinned to 1 thread per Dask thread"),
]}


# ---- memory ---------------------------------------------------------------------------------

def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    VmHWM (the high-water mark of this process's own address space) where available:
    ``getrusage().ru_maxrss`` of a process started by fork+exec carries the *parent's*
    peak over exec, so it overstates a small child of a large parent."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size in MiB."""
    cur = _proc_status_mb("VmRSS")
    if cur is not None:
        return cur
    import psutil
    return psutil.Process().memory_info().rss / MB


# ---- the hand-written loops (the practical limit) -----------------------------------------

def _chunk_starts(arr) -> list[int]:
    step = int(arr.chunks[0])
    return list(range(0, arr.shape[0], step))


def loop_fit(src: str, tgt: str, gram: bool, blas_threads: int = 1) -> int:
    """Stream paired chunks, reading chunk i+1 in a second thread while chunk i is reduced
    with bigalign.maths.stats.block_moments (float64 mean, float32 centring and GEMMs, float64
    accumulation) and merged; then solve as bigalign.fit does (SVD, plus the discrepancy
    with Gram matrices; BLAS at its default threads, as in bigalign). Returns rows."""
    import zarr
    from threadpoolctl import threadpool_limits
    from bigalign.maths.solve import discrepancy, procrustes
    from bigalign.maths.stats import block_moments, merge

    a = zarr.open_array(src, mode="r")
    b = zarr.open_array(tgt, mode="r")
    step = int(a.chunks[0])
    starts = _chunk_starts(a)

    def read(start):
        return a[start:start + step], b[start:start + step]

    total = None
    with threadpool_limits(limits=blas_threads), ThreadPoolExecutor(1) as reader:
        nxt = reader.submit(read, starts[0])
        for i, start in enumerate(starts):
            x, y = nxt.result()
            if i + 1 < len(starts):
                nxt = reader.submit(read, starts[i + 1])
            m = block_moments(x, y, gram=gram, dtype=np.float32, start=start)
            total = m if total is None else merge(total, m)
    procrustes(total, center=True)
    if gram:
        discrepancy(total, center=True)
    return int(total.n)


def loop_apply(src: str, out: str, transform, blas_threads: int = 1) -> int:
    """Map every chunk with ``(x - mu_a) @ Q + mu_b`` in float32 into a pre-created
    uncompressed array with the same chunks: read chunk i+1 and write chunk i-1 in two
    other threads while chunk i is multiplied. Returns rows written."""
    import zarr
    from threadpoolctl import threadpool_limits

    a = zarr.open_array(src, mode="r")
    step = int(a.chunks[0])
    y_arr = zarr.create_array(out, shape=a.shape, chunks=a.chunks, dtype="float32",
                              compressors=None, fill_value=np.nan, overwrite=True,
                              config={"write_empty_chunks": True})
    q = transform.matrix(np.float32)
    mu_a = transform.source_mean.astype(np.float32)
    mu_b = transform.target_mean.astype(np.float32)
    starts = _chunk_starts(a)

    def write(start, y):
        y_arr[start:start + len(y)] = y

    with threadpool_limits(limits=blas_threads), ThreadPoolExecutor(1) as reader, \
            ThreadPoolExecutor(1) as writer:
        nxt = reader.submit(lambda s: a[s:s + step], starts[0])
        pending = None
        for i, start in enumerate(starts):
            x = nxt.result()
            if i + 1 < len(starts):
                nxt = reader.submit(lambda s: a[s:s + step], starts[i + 1])
            y = (x - mu_a) @ q
            y += mu_b
            if pending is not None:
                pending.result()
            pending = writer.submit(write, start, y)
        pending.result()
    return int(a.shape[0])


# ---- the other methods ------------------------------------------------------------------

def _dask_settings(threads, pinned: bool):
    """Context for a naive Dask run: ``threads`` threaded-scheduler workers (None: Dask's
    default, one per CPU), and with ``pinned`` BLAS limited to one thread, so that each
    Dask thread runs a single-threaded GEMM (the fair comparison: bigalign pins BLAS per
    task the same way). OpenBLAS's thread count is process-wide, so setting it once from
    this thread holds inside every Dask thread."""
    import contextlib

    import dask
    from threadpoolctl import threadpool_limits

    stack = contextlib.ExitStack()
    if threads:
        stack.enter_context(dask.config.set(scheduler="threads", num_workers=threads))
    if pinned:
        stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
    return stack


def dask_fit(src: str, tgt: str, threads=None, pinned: bool = False) -> int:
    """Naive Dask: the uncentred cross product, default settings (or pinned BLAS)."""
    import dask.array as da

    a, b = da.from_zarr(src), da.from_zarr(tgt)
    with _dask_settings(threads, pinned):
        (a.T @ b).compute()
    return int(a.shape[0])


def dask_procrustes(src: str, tgt: str, threads=None) -> int:
    """Naive Dask written for what a fit returns: centre by the means (Dask's float32 means,
    as ``a.mean(0)`` gives), the cross-covariance with BLAS pinned, then the rotation from
    numpy's SVD with BLAS's default threads (bigalign's solve runs the same way)."""
    import dask.array as da

    a, b = da.from_zarr(src), da.from_zarr(tgt)
    with _dask_settings(threads, pinned=True):
        c = ((a - a.mean(axis=0)).T @ (b - b.mean(axis=0))).compute()
    u, _, vt = np.linalg.svd(c.astype(np.float64), full_matrices=False)
    if not np.isfinite(u @ vt).all():
        raise RuntimeError("non-finite rotation")
    return int(a.shape[0])


def dask_apply(src: str, out: str, transform, threads=None, pinned: bool = False) -> int:
    """Naive Dask apply: ``a @ Q`` stored uncompressed (like every other output here)."""
    import dask.array as da

    a = da.from_zarr(src)
    q = transform.matrix(np.float32)
    with _dask_settings(threads, pinned):
        (a @ q).to_zarr(out, overwrite=True, compressors=None)
    return int(a.shape[0])


def scipy_fit(src: str, tgt: str) -> int:
    """Load both arrays into memory, centre them, scipy's orthogonal_procrustes (BLAS with
    its default threads)."""
    import zarr
    from scipy.linalg import orthogonal_procrustes

    a = zarr.open_array(src, mode="r")[...]
    b = zarr.open_array(tgt, mode="r")[...]
    a -= a.mean(axis=0, dtype=np.float64).astype(np.float32)
    b -= b.mean(axis=0, dtype=np.float64).astype(np.float32)
    orthogonal_procrustes(a, b)
    return int(a.shape[0])


def make_runner(name: str, src: str, tgt: str, transform_path: str, scratch: str,
                loop_blas_threads: int = 1, threads=None):
    """A zero-argument callable that runs method ``name`` once and returns the number of
    rows it processed (the transform of the apply methods is loaded here, untimed).
    ``threads``: Dask threads of the bigalign and naive-Dask methods (None: one per CPU)."""
    import bigalign

    out = str(Path(scratch) / f"{name}.zarr")
    transform = bigalign.Transform.load(transform_path) if METHODS[name].kind == "apply" \
        else None
    runners = {
        "loop-fit": lambda: loop_fit(src, tgt, gram=False, blas_threads=loop_blas_threads),
        "loop-fit-diag": lambda: loop_fit(src, tgt, gram=True,
                                          blas_threads=loop_blas_threads),
        "bigalign-fit": lambda: bigalign.fit(src, tgt, center=True,
                                             threads=threads).metadata["n_pairs"],
        "bigalign-fit-nodiag": lambda: bigalign.fit(
            src, tgt, center=True, diagnostics=False, threads=threads).metadata["n_pairs"],
        "bigalign-fit-ckpt": lambda: bigalign.fit(
            src, tgt, center=True, output=out, overwrite=True,
            threads=threads).metadata["n_pairs"],
        "dask-fit": lambda: dask_fit(src, tgt, threads),
        "dask-fit-pinned": lambda: dask_fit(src, tgt, threads, pinned=True),
        "dask-procrustes-pinned": lambda: dask_procrustes(src, tgt, threads),
        "scipy-fit": lambda: scipy_fit(src, tgt),
        "loop-apply": lambda: loop_apply(src, out, transform, blas_threads=loop_blas_threads),
        "bigalign-apply": lambda: bigalign.apply(transform, src, out, overwrite=True,
                                                 threads=threads).rows,
        "bigalign-apply-nockpt": lambda: bigalign.apply(transform, src, out, overwrite=True,
                                                        checkpoint=False,
                                                        threads=threads).rows,
        "dask-apply": lambda: dask_apply(src, out, transform, threads),
        "dask-apply-pinned": lambda: dask_apply(src, out, transform, threads, pinned=True),
    }
    return runners[name]


def child_main(args) -> None:
    """``--one METHOD``: import everything, run the method once, print one JSON line."""
    import bigalign  # noqa: F401  (imports before the baseline RSS, not inside the timing)
    import dask.array  # noqa: F401
    import scipy.linalg  # noqa: F401
    import zarr  # noqa: F401

    run = make_runner(args.one, args.src, args.tgt, args.transform, args.scratch,
                      args.loop_blas_threads, args.threads)
    base = rss_mb()
    t0 = time.perf_counter()
    rows = run()
    seconds = time.perf_counter() - t0
    print(RESULT_TAG + json.dumps({"method": args.one, "rows": rows, "seconds": seconds,
                                   "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}),
          flush=True)


# ---- data ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One benchmark input: ``rows`` x ``dim`` float32 pairs chunked ``chunk_rows`` rows."""

    label: str
    dim: int
    rows: int
    chunk_rows: int
    methods: tuple
    repeat: int
    threads: tuple = (None,)  # Dask thread counts to run each method with (None: default)

    @property
    def runs(self) -> list[tuple[str, object]]:
        """(method, threads) pairs, in round-robin order."""
        return [(m, t) for t in self.threads for m in self.methods]

    @property
    def array_bytes(self) -> int:
        return self.rows * self.dim * 4

    def title(self) -> str:
        return f"d={self.dim} N={self.rows:,} ({self.array_bytes / GB:.2f} GB/array)"


def chunk_rows_for(dim: int, chunk_mb: float) -> int:
    """Rows per chunk so one chunk holds about ``chunk_mb`` MiB of float32."""
    return max(1, int(chunk_mb * MB) // (4 * dim))


def case_dir(workdir: Path, case: Case) -> Path:
    return workdir / f"d{case.dim}_n{case.rows}_c{case.chunk_rows}"


def _is_complete(path: Path, case: Case, seed: int) -> bool:
    """Whether ``path`` holds a fully generated array of the case's shape and chunks."""
    import zarr

    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception:
        return False
    info = dict(arr.attrs.get("bench", {}))
    return (tuple(arr.shape) == (case.rows, case.dim) and
            tuple(arr.chunks) == (case.chunk_rows, case.dim) and
            np.dtype(arr.dtype) == np.float32 and not arr.compressors and
            info.get("complete") is True and info.get("seed") == seed and
            info.get("format") == DATA_FORMAT)


def _planted(dim: int, seed: int):
    """Planted rotation (float64) and the two offsets of a case."""
    from bigalign.commands.demo import planted_rotation

    rng = np.random.default_rng([seed, dim, 1])
    return (planted_rotation(dim, seed + dim), rng.normal(0, 0.5, dim),
            rng.normal(0, 0.5, dim))


def _unit_noise(rng, shape) -> np.ndarray:
    """Zero-mean, unit-variance float32 noise (uniform: ten times faster than normal, and
    the distribution does not matter for throughput)."""
    u = rng.random(shape, dtype=np.float32)
    u -= 0.5
    u *= np.float32(12 ** 0.5)
    return u


def generate_pair(case: Case, src: Path, tgt: Path, seed: int) -> None:
    """Write source x = z * spread + mu_a and target y = z * spread @ R + noise + mu_b chunk
    by chunk (memory: one chunk), each chunk from its own seeded generator."""
    import zarr

    rot, mu_a, mu_b = _planted(case.dim, seed)
    rot32, mu_a32, mu_b32 = (v.astype(np.float32) for v in (rot, mu_a, mu_b))
    spread = np.linspace(2.0, 0.2, case.dim, dtype=np.float32)  # distinct singular values
    kw = dict(shape=(case.rows, case.dim), chunks=(case.chunk_rows, case.dim),
              dtype="float32", compressors=None, fill_value=0.0, overwrite=True)
    a = zarr.create_array(str(src), **kw)
    b = zarr.create_array(str(tgt), **kw)
    t0 = last = time.perf_counter()
    for i, start in enumerate(range(0, case.rows, case.chunk_rows)):
        n = min(case.chunk_rows, case.rows - start)
        rng = np.random.default_rng([seed, case.dim, i])
        z = _unit_noise(rng, (n, case.dim)) * spread
        a[start:start + n] = z + mu_a32
        y = z @ rot32
        y += 0.1 * _unit_noise(rng, (n, case.dim))
        y += mu_b32
        b[start:start + n] = y
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log(f"  generating {case.title()}: {start + n:,}/{case.rows:,} rows "
                f"({last - t0:.0f} s)")
    for arr in (a, b):
        arr.attrs["bench"] = {"complete": True, "seed": seed, "format": DATA_FORMAT}


def save_transform(case: Case, path: Path, seed: int) -> None:
    """The planted map as a bigalign Transform (what the apply methods apply)."""
    from bigalign import Transform

    rot, mu_a, mu_b = _planted(case.dim, seed)
    Transform(rot, mu_a, mu_b, options={"center": True}).save(str(path), overwrite=True)


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def ensure_data(case: Case, workdir: Path, seed: int) -> tuple[str, str, str]:
    """Source, target and transform paths of ``case``, generated unless already there."""
    d = case_dir(workdir, case)
    src, tgt, tr = d / "source.zarr", d / "target.zarr", d / "transform"
    missing = [p for p in (src, tgt) if not _is_complete(p, case, seed)]
    if missing:
        need = len(missing) * case.array_bytes + 2 * GB
        if free_bytes(workdir) < need:
            raise SystemExit(f"not enough disk under {workdir} for {case.title()}: need "
                             f"{need / GB:.1f} GB, have {free_bytes(workdir) / GB:.1f} GB")
        log(f"generating {case.title()} under {d}")
        t0 = time.perf_counter()
        generate_pair(case, src, tgt, seed)
        os.sync()  # written data reaches disk before anything is timed
        log(f"  generated in {time.perf_counter() - t0:.0f} s")
    else:
        log(f"reusing {case.title()} under {d}")
    save_transform(case, tr, seed)
    return str(src), str(tgt), str(tr)


def warm_up(paths) -> tuple[float, float]:
    """Read every chunk of each array once (warm page cache). Returns (GB read, seconds)."""
    import zarr

    t0, total = time.perf_counter(), 0
    for p in paths:
        arr = zarr.open_array(p, mode="r")
        step = int(arr.chunks[0])
        for start in range(0, arr.shape[0], step):
            total += arr[start:start + step].nbytes
    return total / GB, time.perf_counter() - t0


# ---- orchestration ------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_child(method: str, src: str, tgt: str, transform: str, scratch: Path,
              loop_blas_threads: int, threads=None) -> dict:
    """Run one method once in a fresh interpreter and return its result record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--src", src,
           "--tgt", tgt, "--transform", transform, "--scratch", str(scratch),
           "--loop-blas-threads", str(loop_blas_threads)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def round_robin(script: str, methods: list, repeats: int, args: list) -> dict:
    """Run ``script --one METHOD *args`` in a fresh interpreter per run, ``repeats`` times
    round-robin over ``methods`` (drift on a shared machine hits every method alike), and
    return {method: [result record, ...]} (the JSON each child prints after RESULT_TAG).
    The import and export benchmarks drive their methods with it."""
    results: dict = {m: [] for m in methods}
    for rep in range(repeats):
        for m in methods:
            proc = subprocess.run([sys.executable, script, "--one", m, *map(str, args)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
            if proc.returncode or not line:
                raise SystemExit(f"{m} failed:\n{proc.stdout}\n{proc.stderr}")
            r = json.loads(line[0][len(RESULT_TAG):])
            results[m].append(r)
            print(f"  run {rep + 1} {m}: {r['seconds']:.2f}s", file=sys.stderr)
    return results


def clean_outputs(scratch: Path) -> None:
    """Remove what a method wrote (outputs and checkpoints) so disk use stays one output,
    and flush dirty pages so one run's writeback does not stall the next one's fsyncs."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    os.sync()


def skip_reasons(case: Case, args, scratch: Path) -> dict[str, str]:
    """Methods of ``case`` that are not run, with why."""
    skip = {}
    if 2 * case.array_bytes > args.inmem_max_gb * GB and "scipy-fit" in case.methods:
        skip["scipy-fit"] = (f"both arrays {2 * case.array_bytes / GB:.1f} GB > "
                             f"--inmem-max-gb {args.inmem_max_gb:g}")
    if free_bytes(scratch) < case.array_bytes + GB:
        for m in case.methods:
            if METHODS[m].kind == "apply":
                skip[m] = f"not enough free disk for a {case.array_bytes / GB:.1f} GB output"
    return skip


def run_case(case: Case, args) -> list[dict]:
    """Generate/reuse data, warm the cache, run every method ``repeat`` times round-robin,
    and return one summary record per method."""
    workdir = Path(args.workdir)
    src, tgt, transform = ensure_data(case, workdir, args.seed)
    cache = cache_state(case)
    if cache == "warm":
        gb, secs = warm_up([src, tgt])
        log(f"warm-up read of {gb:.2f} GB in {secs:.1f} s ({gb / secs:.2f} GB/s)")
    else:
        log(f"not warming the cache: {cache}")
    scratch = case_dir(workdir, case) / "scratch"
    clean_outputs(scratch)
    skip = skip_reasons(case, args, scratch)
    runs: dict[tuple, list] = {(m, t): [] for m, t in case.runs if m not in skip}
    failed: dict[tuple, str] = {}
    for rep in range(case.repeat):
        for method, threads in [k for k in runs if k not in failed]:
            label = method + (f" @{threads} threads" if threads else "")
            try:
                r = run_child(method, src, tgt, transform, scratch, args.loop_blas_threads,
                              threads)
            except RuntimeError as e:  # one broken method must not end an hour-long run
                log(str(e))
                failed[(method, threads)] = "failed: " + (str(e).strip().splitlines()
                                                          or ["?"])[-1]
                continue
            finally:
                clean_outputs(scratch)
            runs[(method, threads)].append(r)
            log(f"[{case.title()} rep {rep + 1}/{case.repeat}] {label}: "
                f"{r['seconds']:.2f} s, {r['rows'] / r['seconds']:,.0f} rows/s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB")
    shutil.rmtree(scratch, ignore_errors=True)
    return summarise(case, runs, {**{(m, t): why for m, why in skip.items()
                                     for t in case.threads}, **failed}, cache)


def cache_state(case: Case) -> str:
    """"warm" when both arrays fit in 3/4 of the available memory (then they are read once
    before timing), else why not: such a case reads from disk."""
    import psutil

    avail = psutil.virtual_memory().available
    if 2 * case.array_bytes <= 0.75 * avail:
        return "warm"
    return (f"cold: both arrays ({2 * case.array_bytes / GB:.1f} GB) exceed 3/4 of the "
            f"available memory ({avail / GB:.1f} GB)")


def summarise(case: Case, runs: dict, skip: dict, cache: str) -> list[dict]:
    """Median rows/s per (method, threads), its ratio to the matching loop (same threads),
    and peak RSS; skipped and failed runs keep their reason."""
    rate = {k: case.rows / statistics.median(r["seconds"] for r in rs)
            for k, rs in runs.items() if k not in skip and rs}
    out = []
    for m, t in case.runs:
        rec = {"case": case.label, "dim": case.dim, "rows": case.rows,
               "chunk_rows": case.chunk_rows, "gb_per_array": case.array_bytes / GB,
               "method": m, "threads": t, "kind": METHODS[m].kind,
               "baseline": METHODS[m].baseline, "about": METHODS[m].about, "cache": cache}
        if (m, t) in skip or (m, t) not in rate:
            out.append({**rec, "skipped": skip.get((m, t), "not run")})
            continue
        base = rate.get((METHODS[m].baseline, t))
        one = rate.get((m, 1))
        rs = runs[(m, t)]
        out.append({**rec, "repeat": len(rs),
                    "seconds": [r["seconds"] for r in rs],
                    "median_seconds": statistics.median(r["seconds"] for r in rs),
                    "rows_per_second": rate[(m, t)],
                    "ratio_to_loop": rate[(m, t)] / base if base else None,
                    "speedup": rate[(m, t)] / one if one and t else None,
                    "efficiency": rate[(m, t)] / (one * t) if one and t else None,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "base_rss_mb": min(r["base_rss_mb"] for r in rs)})
    return out


def markdown_table(results: list[dict]) -> str:
    """The results as a Markdown table (one row per case, method and thread count)."""
    lines = ["| case | method | threads | median s | median rows/s | vs loop | speedup | "
             "efficiency | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for r in results:
        case = f"{r['case']} d={r['dim']} N={r['rows']:,} ({r['gb_per_array']:.2f} GB)"
        if r["cache"] != "warm":
            case += " cold"
        threads = r.get("threads") or "all"
        if "skipped" in r:
            lines.append(f"| {case} | {r['method']} | {threads} | skipped: {r['skipped']} "
                         "| | | | | |")
            continue
        lines.append(f"| {case} | {r['method']} | {threads} | {r['median_seconds']:.2f} | "
                     f"{r['rows_per_second']:,.0f} | {fmt(r['ratio_to_loop'], '.2f')} | "
                     f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('efficiency'), '.0%')} | "
                     f"{r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def _git_commit(repo: Path):
    """Short HEAD commit of the checkout, "+dirty" when bigalign/ differs from it (read-only
    git calls); None outside git."""
    def git(*a):
        return subprocess.run(["git", "--no-optional-locks", *a], cwd=repo,
                              capture_output=True, text=True)
    try:
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("diff", "--quiet", "HEAD", "--", "bigalign").returncode == 1
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def environment() -> dict:
    """Command line, machine, versions and BLAS configuration."""
    import dask
    import psutil
    import scipy
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS so threadpoolctl lists it)
    import threadpoolctl
    import zarr

    import bigalign

    commit = _git_commit(Path(__file__).resolve().parent.parent)
    return {"command": shlex.join([sys.executable] + sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "ram_gb": psutil.virtual_memory().total / GB,
            "python": platform.python_version(),
            "versions": {"bigalign": bigalign.__version__, "numpy": np.__version__,
                         "scipy": scipy.__version__, "dask": dask.__version__,
                         "zarr": zarr.__version__},
            "git_commit": commit,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "blas": threadpoolctl.threadpool_info(),
            "cache": "warm cache: each case's arrays are read once before timing (the page "
                     "cache is not dropped); cases over 3/4 of free memory run cold"}


def print_header(env: dict) -> None:
    print(f"command: {env['command']}")
    print(f"machine: {env['cpus']} CPUs, {env['ram_gb']:.0f} GB RAM, {env['platform']}; "
          f"bigalign {env['versions']['bigalign']} ({env['git_commit']})")
    core = env["openblas_coretype"]
    print(f"OPENBLAS_CORETYPE: {'set to ' + repr(core) if core is not None else 'not set'}")
    for lib in env["blas"]:
        print(f"BLAS: {lib.get('internal_api')} {lib.get('version')} "
              f"({lib.get('architecture')}, {lib.get('threading_layer')}, "
              f"{lib.get('num_threads')} threads) {lib.get('filepath')}")
    print(f"cache: {env['cache']}")
    print(f"loops: BLAS limited to {env['loop_blas_threads']} thread(s); bigalign: its "
          f"default in-process session ({env['cpus']} Dask threads, 1 BLAS thread each)")
    print()


def build_cases(args) -> list[Case]:
    """The cases the options ask for, in run order."""
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    mults = [int(m) for m in args.multipliers.split(",") if m.strip()]
    methods = tuple(args.methods.split(","))
    cases = []
    for d in dims:
        base = int(args.size_gb * GB) // (4 * d)
        for k in mults:
            cases.append(Case(f"{k}x", d, base * k, chunk_rows_for(d, args.chunk_mb), methods,
                              args.repeat, (args.threads,)))
    if args.scaling:
        threads, t = [], 1
        while t < (os.cpu_count() or 1):
            threads.append(t)
            t *= 2
        threads.append(os.cpu_count() or 1)
        cases.append(Case("scaling", args.scaling_dim,
                          int(args.size_gb * GB) // (4 * args.scaling_dim),
                          chunk_rows_for(args.scaling_dim, args.chunk_mb),
                          tuple(args.scaling_methods.split(",")), args.repeat,
                          tuple(threads)))
    if args.scale_run:
        scale_methods = tuple(args.scale_methods.split(","))
        cases.append(Case("scale", 384, args.scale_rows, chunk_rows_for(384, args.chunk_mb),
                          scale_methods, args.scale_repeat))
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="384,1024,4096",
                   help="embedding dimensions (default 384,1024,4096; '' for the scaling or "
                        "scale run only)")
    p.add_argument("--size-gb", type=float, default=1.5,
                   help="GB per array of the 1x cases (default 1.5)")
    p.add_argument("--multipliers", default="1,4", help="N multipliers (default 1,4)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per method, round-robin; the median is reported (default 3)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--chunk-mb", type=float, default=16, help="MiB per chunk (default 16)")
    p.add_argument("--loop-blas-threads", type=int, default=1,
                   help="BLAS threads of the prefetch loops (default 1: the single-stream "
                        "limit; the CPU count gives the loops every core, as bigalign has)")
    p.add_argument("--inmem-max-gb", type=float, default=4.0,
                   help="run scipy-fit only when both arrays together are at most this "
                        "many GB (default 4)")
    p.add_argument("--scaling", action="store_true",
                   help="also run a thread-scaling case: each of --scaling-methods with 1, 2, "
                        "4, ... and all cores' Dask threads (speedup and parallel efficiency "
                        "against 1 thread)")
    p.add_argument("--scaling-dim", type=int, default=1024, help="d of the scaling case")
    p.add_argument("--scaling-methods",
                   default="bigalign-fit-nodiag,bigalign-fit,bigalign-apply,dask-fit-pinned",
                   help="methods of the scaling case")
    p.add_argument("--threads", type=int, default=None,
                   help="Dask threads of the bigalign and naive-Dask methods (default: one "
                        "per CPU)")
    p.add_argument("--scale-run", action="store_true",
                   help="also run 10^7 x 384 (15.4 GB per array) to show flat memory")
    p.add_argument("--scale-rows", type=int, default=10**7, help="rows of the scale run")
    p.add_argument("--scale-methods",
                   default="loop-fit-diag,bigalign-fit,loop-apply,bigalign-apply",
                   help="methods of the scale run (apply ones are skipped if disk is short)")
    p.add_argument("--scale-repeat", type=int, default=1, help="runs per scale-run method")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: defaults become 0.05 GB, 4 MiB chunks, repeat 1, "
                        "--inmem-max-gb 0.2, --scale-rows 200000 (about 2 minutes)")
    p.add_argument("--workdir", default="bench-data", help="generated data (reused)")
    p.add_argument("--out", default=None,
                   help="JSON results (default bench-results/results.json, quick.json "
                        "with --quick)")
    p.add_argument("--seed", type=int, default=0, help="data seed (part of the reuse check)")
    # internal: one method, one run, in this (fresh) process
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--tgt", help=argparse.SUPPRESS)
    p.add_argument("--transform", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; explicit options still win
        p.set_defaults(size_gb=0.05, repeat=1, chunk_mb=4, inmem_max_gb=0.2,
                       scale_rows=200_000)
    args = p.parse_args(argv)
    args.out = args.out or ("bench-results/quick.json" if args.quick
                            else "bench-results/results.json")
    unknown = [m for m in (args.methods + "," + args.scale_methods + "," +
                           args.scaling_methods).split(",")
               if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        child_main(args)
        return
    env = {**environment(), "loop_blas_threads": args.loop_blas_threads}
    print_header(env)
    results: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for case in build_cases(args):
        results += run_case(case, args)
        # written after every case so a long run that dies keeps what it measured
        out.write_text(json.dumps({**env, "results": results}, indent=1))
    print(markdown_table(results))
    print()
    print("rows/s: median over repeats; vs loop: rows/s over the matching "
          "prefetch loop (fit methods vs loop-fit or loop-fit-diag, apply methods vs "
          "loop-apply); peak RSS: VmHWM of a fresh process per run, max over repeats.")
    print(f"total {time.perf_counter() - t0:.0f} s; JSON: {out}")


if __name__ == "__main__":
    main()
