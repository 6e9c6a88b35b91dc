#!/usr/bin/env python
"""GPU backend benchmark: bigalign fit and apply with device="cpu" and device="cuda" on the
same machine, against the Zarr read / write ceiling measured there (run by hand, not a test).

For each case (d, N) it generates a paired float32 Zarr pair (uncompressed, chunks of 32 MiB
of whole rows, a planted rotation plus noise and a common offset; on the GPU when CuPy is
there), then measures, all with the same number of threads:

* ceilings: every fit read (the fit plan's reads of source and target) by the threads into
  reused buffers, no compute (``read``); every apply region written from a buffer
  (``write``); every apply region read and written back to a new array of the same layout
  (``copy``, the apply's own I/O, no compute); median of ``--ceiling-repeats`` passes;
* bigalign.fit(center=True) with and without diagnostics, device cpu and cuda;
* bigalign.apply (done-markers on, as by default) with device cpu and cuda;
* accuracy: the CUDA statistics, rotation and mapped rows against the CPU ones;
* the GPU kernels alone on device-resident data (the compute ceiling) and pinned H2D speed.

CUDA runs are repeated (``--cuda-repeats``; the first pays pinned-memory allocation, the
rest reuse CuPy's pools); CPU runs are single. A fit's rows/s is N over its streaming pass
(open, plan, read, reduce, merge: ``metadata['run']['seconds']``); its total with the SVD
is listed too. Before each write-heavy step the page cache is flushed (``os.sync``, not
timed) so write-back of earlier data does not throttle it. Results: a table on stdout and
JSON at ``OUT/gpu_bench.json`` (written after every step).

    python benchmarks/gpu_bench.py --out results/ [--cases 1024:2097152,4096:425984]
    python benchmarks/gpu_bench.py --quick --out /tmp/q   # smoke run, CPU-only machines too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bigalign  # noqa: E402
from bigalign.execution import gpu  # noqa: E402
from bigalign.maths.mapping import map_rows  # noqa: E402
from bigalign.maths.stats import Accumulator  # noqa: E402
from bigalign.planning.plan import (DEFAULT_BLOCK_BYTES, MIN_BLOCKS, choose_block_rows,  # noqa: E402
                           common_step, plan_blocks)
from bigalign.storage.stores import create_output, open_embeddings, read_rows, write_rows  # noqa: E402

T0 = time.perf_counter()
RESULTS: dict = {"cases": []}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def save(out: Path) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e})"


def cupy_or_none():
    try:
        return gpu._cupy()
    except bigalign.InputError as e:
        log(f"no CUDA: {e}")
        return None


# ---- environment ------------------------------------------------------------------------------

def environment(cp, data: Path) -> dict:
    import dask
    import zarr
    env = {
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "cpu_model": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "numpy": np.__version__, "zarr": zarr.__version__, "dask": dask.__version__,
        "blas_env": {k: v for k, v in os.environ.items()
                     if k.startswith(("OPENBLAS", "OMP_", "MKL_", "CUPY_"))},
        "data_dir": str(data), "data_fs": sh(f"df -hT {data} | tail -1"),
    }
    if cp is not None:
        props = cp.cuda.runtime.getDeviceProperties(0)
        env.update(gpu=props["name"].decode(), cupy=cp.__version__,
                   cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                   cuda_driver=cp.cuda.runtime.driverGetVersion(),
                   gpu_memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
                   nvidia_smi=sh("nvidia-smi --query-gpu=name,driver_version,memory.total,"
                                 "pcie.link.gen.max,pcie.link.width.max --format=csv,noheader"))
    try:
        import numpy.__config__ as npc
        env["numpy_blas"] = npc.CONFIG["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001
        pass
    return env


# ---- data ------------------------------------------------------------------------------------

def generate(case_dir: Path, n: int, d: int, chunk: int, threads: int, cp) -> tuple[str, str]:
    """Source A (offset + noise) and target B = A Q + 0.1 noise + offset, float32."""
    import zarr
    xp = cp if cp is not None else np
    src, tgt = str(case_dir / "source.zarr"), str(case_dir / "target.zarr")
    arrs = [zarr.create_array(p, shape=(n, d), chunks=(chunk, d), dtype="float32",
                              compressors=None, fill_value=0.0, overwrite=True)
            for p in (src, tgt)]
    rng = np.random.default_rng(7)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    off_a = (2.0 + rng.standard_normal(d)).astype(np.float32)
    off_b = (-1.0 + rng.standard_normal(d)).astype(np.float32)
    qx, oa, ob = xp.asarray(q), xp.asarray(off_a), xp.asarray(off_b)
    slab = chunk * 8
    pending: list = []
    with ThreadPoolExecutor(threads) as pool:
        for s in range(0, n, slab):
            e = min(n, s + slab)
            if cp is not None:
                g = cp.random.RandomState(s)
                a = g.standard_normal((e - s, d), dtype=cp.float32)
                b = a @ qx + 0.1 * g.standard_normal((e - s, d), dtype=cp.float32) + ob
                a += oa
                ha, hb = a.get(), b.get()
            else:
                g = np.random.default_rng(s)
                a = g.standard_normal((e - s, d), dtype=np.float32)
                hb = a @ q + 0.1 * g.standard_normal((e - s, d), dtype=np.float32) + off_b
                ha = a + off_a
            while len(pending) > 2 * (slab // chunk) * 2:
                pending.pop(0).result()
            for c in range(s, e, chunk):
                for arr, h in zip(arrs, (ha, hb)):
                    pending.append(pool.submit(arr.__setitem__, slice(c, min(e, c + chunk)),
                                               h[c - s:min(e, c + chunk) - s]))
        for f in pending:
            f.result()
    return src, tgt


def fit_reads(src, tgt) -> list:
    """The reads of the fit bigalign would plan for these arrays (with diagnostics)."""
    from dataclasses import asdict

    from bigalign.planning.plan import make_fit_plan

    plan = asdict(make_fit_plan(0, src.rows, (src.row_step, tgt.row_step), (src.dim, tgt.dim),
                                (src.dtype.itemsize, tgt.dtype.itemsize), True,
                                DEFAULT_BLOCK_BYTES,
                                read_steps=(src.read_step, tgt.read_step)))
    return plan_blocks(0, src.rows, plan["step"], plan["rows_per_read"]), plan


def apply_blocks(src, dim_b: int) -> list:
    row_bytes = src.row_bytes + dim_b * 4
    step, _ = common_step([src.row_step, src.row_step], row_bytes, DEFAULT_BLOCK_BYTES)
    per = choose_block_rows(src.rows, step, row_bytes, DEFAULT_BLOCK_BYTES, MIN_BLOCKS)
    return plan_blocks(0, src.rows, step, per)


# ---- ceilings -----------------------------------------------------------------------------

def _per_thread(threads, work, items) -> float:
    local = threading.local()

    def run(item):
        work(local, item)

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, items))
    return time.perf_counter() - t


def _buf(local, name, rows, dim, dtype=np.float32):
    b = getattr(local, name, None)
    if b is None or b.shape[0] < rows:
        b = np.empty((rows, dim), dtype)
        setattr(local, name, b)
    return b[:rows]


def read_ceiling(src, tgt, reads, threads) -> float:
    def work(local, r):
        read_rows(src, r.start, r.stop, out=_buf(local, "a", r.rows, src.dim))
        read_rows(tgt, r.start, r.stop, out=_buf(local, "b", r.rows, tgt.dim))
    return _per_thread(threads, work, reads)


def write_ceiling(out_url, src, blocks, threads) -> float:
    out = create_output(out_url, rows=src.rows, dim=src.dim, chunk_rows=src.row_step,
                        dtype="float32", overwrite=True)

    def work(local, r):
        y = _buf(local, "y", r.rows, src.dim)
        if not getattr(local, "filled", False):
            y[...] = 1.0
            local.filled = True
        write_rows(out, r.start, y)
    return _per_thread(threads, work, blocks)


def copy_ceiling(out_url, src, blocks, threads) -> float:
    out = create_output(out_url, rows=src.rows, dim=src.dim, chunk_rows=src.row_step,
                        dtype="float32", overwrite=True)

    def work(local, r):
        write_rows(out, r.start, read_rows(src, r.start, r.stop, out=_buf(local, "x", r.rows,
                                                                            src.dim)))
    return _per_thread(threads, work, blocks)


def compare_arrays(p1: str, p2: str, blocks, threads) -> dict:
    import zarr
    a1, a2 = zarr.open_array(p1, mode="r"), zarr.open_array(p2, mode="r")
    lock = threading.Lock()
    acc = {"max_abs_diff": 0.0, "max_abs": 0.0, "nonfinite": 0}

    def work(local, r):
        x, y = a1[r.start:r.stop], a2[r.start:r.stop]
        diff = float(np.abs(x - y).max())
        m = float(np.abs(x).max())
        bad = int((~np.isfinite(y)).sum())
        with lock:
            acc["max_abs_diff"] = max(acc["max_abs_diff"], diff)
            acc["max_abs"] = max(acc["max_abs"], m)
            acc["nonfinite"] += bad
    _per_thread(threads, work, blocks)
    return acc


# ---- GPU kernels alone --------------------------------------------------------------------

def kernel_only(cp, d: int, rows: int, reps: int = 8) -> dict:
    """The statistics kernel (Accumulator.add, deferred checks) and map_rows on
    device-resident data (one stream), and the
    pinned host -> device copy speed: what the GPU does when Zarr is not in the way."""
    g = cp.random.RandomState(0)
    a = g.standard_normal((rows, d), dtype=cp.float32) + 2
    b = g.standard_normal((rows, d), dtype=cp.float32) - 1
    sa, sb = cp.empty_like(a), cp.empty_like(b)
    out = {}
    for gram in (False, True):
        acc = Accumulator(d, d, gram=gram, dtype=np.float32)
        for k in range(reps + 2):
            if k == 2:
                cp.cuda.Device().synchronize()
                t = time.perf_counter()
            acc.add(a, b, scratch=(sa, sb), flags=[])
        cp.cuda.Device().synchronize()
        out["fit_diag" if gram else "fit"] = rows * reps / (time.perf_counter() - t)
    m = cp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0]
                   .astype(np.float32))
    mu_a, mu_b = cp.zeros(d), cp.zeros(d)
    y = cp.empty_like(a)
    for k in range(reps + 2):
        if k == 2:
            cp.cuda.Device().synchronize()
            t = time.perf_counter()
        x = a.copy()
        map_rows(x, m, mu_a, mu_b, inplace=True, out=y, flags=[])
    cp.cuda.Device().synchronize()
    out["apply"] = rows * reps / (time.perf_counter() - t)
    import cupyx
    host = cupyx.empty_pinned((rows, d), np.float32)
    host[...] = 1
    s = cp.cuda.Stream(non_blocking=True)
    a.set(host, stream=s)
    s.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a.set(host, stream=s)
    s.synchronize()
    out["h2d_pinned_GBps"] = host.nbytes * reps / (time.perf_counter() - t) / 1e9
    del host
    return out


# ---- one case -----------------------------------------------------------------------------

def timed_fit(src_url, tgt_url, device, diag, threads) -> tuple[dict, object]:
    t = time.perf_counter()
    tr = bigalign.fit(src_url, tgt_url, center=True, diagnostics=diag, threads=threads,
                      device=device)
    wall = time.perf_counter() - t
    run = tr.metadata["run"]
    return {"stream_s": run["seconds"], "wall_s": wall, "tasks": run["tasks"],
            "rows_per_s": run["rows_per_second"]}, tr


def timed_apply(tr, src_url, out_url, device, threads) -> dict:
    shutil.rmtree(out_url, ignore_errors=True)  # not timed: a rerun deletes its old output
    os.sync()
    r = bigalign.apply(tr, src_url, out_url, overwrite=True, threads=threads, device=device)
    return {"wall_s": r.seconds, "tasks": r.tasks, "rows_per_s": r.rows_per_second}


def run_case(d: int, n: int, args, cp, data: Path, out: Path) -> None:
    case = {"d": d, "rows": n}
    RESULTS["cases"].append(case)
    case_dir = data / f"d{d}_n{n}"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    chunk = max(1, (32 * 2**20) // (4 * d))
    t = time.perf_counter()
    src_url, tgt_url = generate(case_dir, n, d, chunk, args.threads, cp)
    case["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    os.sync()
    case["sync_s"] = time.perf_counter() - t
    gb = 2 * n * d * 4 / 1e9
    case["pair_gb"] = gb
    log(f"d={d} n={n:,}: generated {gb:.1f} GB in {case['generate_s']:.1f}s "
        f"(+{case['sync_s']:.1f}s sync), chunks of {chunk} rows")
    src, tgt = open_embeddings(src_url), open_embeddings(tgt_url, side="target")
    reads, plan = fit_reads(src, tgt)
    blocks = apply_blocks(src, d)
    case["plan"] = dict(plan, reads=len(reads), apply_regions=len(blocks))
    if cp is not None:  # CuPy compiles reduction kernels per shape class: warm them up
        t = time.perf_counter()
        few = (0, 4 * plan["rows_per_read"])
        for diag in (True, False):
            bigalign.fit(src_url, tgt_url, rows=few, center=True, diagnostics=diag,
                         threads=args.threads, device="cuda")
        case["warmup_s"] = time.perf_counter() - t
        log(f"  CUDA warm-up at d={d} (fits of {few[1]} rows) {case['warmup_s']:.1f}s")

    # ceilings
    rs = [read_ceiling(src, tgt, reads, args.threads) for _ in range(args.ceiling_repeats)]
    case["read_ceiling"] = {"s": rs, "rows_per_s": n / statistics.median(rs),
                            "GBps": gb / statistics.median(rs)}
    scratch = str(case_dir / "ceiling.zarr")
    ws, cs = [], []
    for _ in range(max(1, args.ceiling_repeats - 1)):
        os.sync()
        ws.append(write_ceiling(scratch, src, blocks, args.threads))
        os.sync()
        cs.append(copy_ceiling(scratch, src, blocks, args.threads))
    shutil.rmtree(scratch, ignore_errors=True)
    case["write_ceiling"] = {"s": ws, "rows_per_s": n / statistics.median(ws)}
    case["copy_ceiling"] = {"s": cs, "rows_per_s": n / statistics.median(cs)}
    log(f"  ceilings rows/s: read {case['read_ceiling']['rows_per_s']:,.0f} "
        f"({case['read_ceiling']['GBps']:.1f} GB/s) | "
        f"write {case['write_ceiling']['rows_per_s']:,.0f}"
        f" | copy (read+write) {case['copy_ceiling']['rows_per_s']:,.0f}")
    save(out)

    devices = ["cpu"] + (["cuda"] if cp is not None else [])
    transforms = {}

    def repeats(dev, first=True):
        """Runs to do now: CUDA's repeats, CPU's one; past --budget seconds only the first
        run of a measurement that has none yet (the rest are skipped and say so)."""
        k = args.cuda_repeats if dev == "cuda" else 1
        if time.perf_counter() - T0 > args.budget:
            log(f"  (past the {args.budget:.0f}s budget: {'1 run' if first else 'skipped'})")
            return 1 if first else 0
        return k

    def fits(diag):
        key = "fit_diag" if diag else "fit"
        case[key] = {}
        for dev in devices:
            runs = []
            for _ in range(repeats(dev, first=diag)):
                r, tr = timed_fit(src_url, tgt_url, dev, diag, args.threads)
                runs.append(r)
                log(f"  {key:8s} {dev:4s}: {r['rows_per_s']:,.0f} rows/s "
                    f"(stream {r['stream_s']:.2f}s,"
                    f" total {r['wall_s']:.2f}s, {r['tasks']} tasks)")
            if not runs:
                continue
            case[key][dev] = runs
            transforms[(key, dev)] = tr
            save(out)
        if ("cpu" in case[key]) and ("cuda" in case[key]):
            c, g = transforms[(key, "cpu")], transforms[(key, "cuda")]
            acc = {"rotation_max_abs_diff": float(np.abs(c.rotation - g.rotation).max())}
            for f in ("cross", "gram_a", "gram_b", "mean_a"):
                x, y = getattr(c.statistics, f), getattr(g.statistics, f)
                if x is not None:
                    acc[f"{f}_max_rel_diff"] = float(np.abs(x - y).max() / np.abs(x).max())
            acc["sq_a_rel_diff"] = abs(c.statistics.sq_a - g.statistics.sq_a) / c.statistics.sq_a
            case[key]["accuracy"] = acc
            log(f"  {key} cuda vs cpu: " + ", ".join(f"{k} {v:.2e}" for k, v in acc.items()))

    def applies():
        tr = transforms[("fit_diag", "cpu")]
        case["apply"] = {}
        outs = {}
        for dev in devices:
            runs = []
            outs[dev] = str(case_dir / f"out-{dev}.zarr")
            for _ in range(repeats(dev)):
                r = timed_apply(tr, src_url, outs[dev], dev, args.threads)
                runs.append(r)
                log(f"  apply    {dev:4s}: {r['rows_per_s']:,.0f} rows/s ({r['wall_s']:.2f}s, "
                    f"{r['tasks']} tasks)")
            case["apply"][dev] = runs
            save(out)
        if "cuda" in devices:
            acc = compare_arrays(outs["cpu"], outs["cuda"], blocks, args.threads)
            case["apply"]["accuracy"] = acc
            log(f"  apply cuda vs cpu: max |diff| {acc['max_abs_diff']:.2e} of max |y| "
                f"{acc['max_abs']:.2f}; non-finite {acc['nonfinite']}")
            case["kernels"] = kernel_only(cp, d, plan["rows_per_read"])
            log("  GPU kernels alone (device-resident, one stream): " + ", ".join(
                f"{k} {v:,.0f}" for k, v in case["kernels"].items()))

    # most important first: fits with diagnostics, applies, then fits without
    fits(True)
    applies()
    fits(False)
    save(out)
    shutil.rmtree(case_dir, ignore_errors=True)


# ---- table --------------------------------------------------------------------------------

def best(runs):
    return max(r["rows_per_s"] for r in runs)


def table() -> str:
    lines = ["| d | rows | step | ceiling (rows/s) | CPU rows/s | CUDA rows/s (runs) | "
             "CUDA / ceiling | CPU / ceiling | CUDA / CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in RESULTS["cases"]:
        for key, ceil_key, label in (("fit_diag", "read_ceiling", "fit, diagnostics"),
                                     ("fit", "read_ceiling", "fit, no diagnostics"),
                                     ("apply", "copy_ceiling", "apply")):
            if ceil_key not in c or not ({"cpu", "cuda"} & set(c.get(key, {}))):
                continue
            ceil = c[ceil_key]["rows_per_s"]
            cpu = best(c[key]["cpu"]) if "cpu" in c[key] else float("nan")
            if "cuda" in c[key]:
                runs = [r["rows_per_s"] for r in c[key]["cuda"]]
                cu = max(runs)
                cus = " / ".join(f"{x:,.0f}" for x in runs)
                tail = f"{cu / ceil:.0%} | {cpu / ceil:.0%} | {cu / cpu:.2f}x |"
            else:
                cus, tail = "-", f"- | {cpu / ceil:.0%} | - |"
            lines.append(f"| {c['d']} | {c['rows']:,} | {label} | {ceil:,.0f} "
                         f"({ceil_key.split('_')[0]}) | {cpu:,.0f} | {cus} | {tail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results/gpu", help="folder for gpu_bench.json")
    p.add_argument("--data", default=None,
                   help="where the data goes (default: /tmp/bigalign-gpu-bench)")
    p.add_argument("--cases", default="1024:2097152,4096:425984",
                   help="d:rows,... (default: 16 GiB and 13 GiB pairs; at d=4096 with "
                        "diagnostics 16 fit tasks of 26,624 rows)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ceiling-repeats", type=int, default=3)
    p.add_argument("--cuda-repeats", type=int, default=2)
    p.add_argument("--budget", type=float, default=1e9,
                   help="seconds after which repeats and no-diagnostics fits are skipped")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the global warm-up (each case still warms up at its d)")
    p.add_argument("--quick", action="store_true", help="tiny cases (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.cases = "64:200000,256:60000"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data or "/tmp/bigalign-gpu-bench")
    data.mkdir(parents=True, exist_ok=True)
    cp = cupy_or_none()
    RESULTS["environment"] = environment(cp, data)
    RESULTS["threads"] = args.threads
    log(json.dumps(RESULTS["environment"], indent=1))
    save(out)
    if cp is not None and not args.no_warmup:  # compile kernels, start cuBLAS: untimed
        t = time.perf_counter()
        warm = data / "warmup"
        shutil.rmtree(warm, ignore_errors=True)
        warm.mkdir()
        s, tt = generate(warm, 40960, 128, 4096, args.threads, cp)
        for diag in (True, False):
            tr = bigalign.fit(s, tt, center=True, diagnostics=diag, device="cuda",
                              threads=args.threads)
        bigalign.apply(tr, s, str(warm / "o.zarr"), device="cuda", threads=args.threads)
        bigalign.apply(tr, s, str(warm / "o.zarr"), device="cuda", overwrite=True,
                       renormalize=True, threads=args.threads)
        shutil.rmtree(warm, ignore_errors=True)
        RESULTS["warmup_s"] = time.perf_counter() - t
        log(f"CUDA warm-up (kernel compilation, cuBLAS) {RESULTS['warmup_s']:.1f}s")
    for item in args.cases.split(","):
        d, n = (int(x) for x in item.split(":"))
        free = shutil.disk_usage(data).free
        need = 4 * n * d * 4 * 1.1  # pair + two apply outputs
        if need > 0.9 * free:
            n2 = int(n * 0.9 * free / need) // 2048 * 2048
            log(f"d={d}: {need / 1e9:.0f} GB needed, {free / 1e9:.0f} GB free: rows {n} -> {n2}")
            n = n2
        try:
            run_case(d, n, args, cp, data, out)
        except Exception as e:  # keep the other cases' results
            import traceback
            traceback.print_exc()
            RESULTS["cases"][-1]["error"] = f"{type(e).__name__}: {e}"
            save(out)
    RESULTS["table"] = table()
    RESULTS["total_s"] = time.perf_counter() - T0
    save(out)
    print("\n" + RESULTS["table"], flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
