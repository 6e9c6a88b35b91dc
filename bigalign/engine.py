"""Execution: Dask task graphs for the streaming fit (a reduction of statistics) and the
parallel apply (one task per whole-chunk region), and the task functions they run.

The graphs are plain dicts, as in dask/array/reductions.py and rechunker: one leaf task per
block of rows, merged in a fixed tree per checkpoint unit; the unit roots write their
statistics to storage; a second fixed tree merges the units. Fixed trees make the float64
result independent of worker count and finishing order, and identical after a resume.
"""

from __future__ import annotations

import threading
import uuid
from typing import Optional

import numpy as np

from . import faults, gpu
from .checkpoint import Job
from .plan import Block, FitPlan, merge_tree, plan_blocks
from .errors import NonFiniteError
from .stats import Moments, block_moments, merge, merge_all
from .stores import EmbeddingArray, read_rows, write_rows
from .transform import map_rows

__all__ = ["fit_graph", "apply_graph", "buffer", "release_buffers"]


# ---- per-thread buffers ------------------------------------------------------------------

_buffers: dict[int, dict] = {}  # thread id -> name -> flat array
_buffers_lock = threading.Lock()


def buffer(name: str, rows: int, dim: int, dtype) -> np.ndarray:
    """A (rows, dim) C-contiguous array of ``dtype`` owned by this thread, reused across the
    tasks it runs (fresh 32 MB arrays cost page faults and zeroing on every block: reads
    into reused buffers are ~1.5x faster). Contents are garbage; callers overwrite them.
    :func:`release_buffers` frees them when a run ends."""
    dtype = np.dtype(dtype)
    with _buffers_lock:
        pool = _buffers.setdefault(threading.get_ident(), {})
    flat = pool.get(name)
    if flat is None or flat.dtype != dtype or flat.size < rows * dim:
        flat = pool[name] = np.empty(rows * dim, dtype)
    return flat[: rows * dim].reshape(rows, dim)


def release_buffers() -> None:
    """Drop every thread's buffers in this process (after a run: no memory stays held)."""
    with _buffers_lock:
        _buffers.clear()
    gpu.release_lanes()


def _read(emb: EmbeddingArray, start: int, stop: int, name: str) -> np.ndarray:
    return read_rows(emb, start, stop, out=buffer(name, stop - start, emb.dim, emb.dtype))


# ---- task functions (module level: they are pickled to workers) ------------------------

def block_task(source: EmbeddingArray, target: EmbeddingArray, start: int, stop: int,
               normalize: bool, gram: bool, dtype: str, step: int, rows_per_read: int,
               device: str = "cpu") -> Moments:
    """Read paired rows [start, stop) once, ``rows_per_read`` (whole chunks) at a time, and
    reduce them to float64 statistics; memory is one read plus the running statistics.
    ``device="cuda"``: the same on the GPU (bigalign.gpu), statistics left on the device."""
    if device != "cpu":
        total = gpu.fit_block(source, target, start, stop, normalize, gram, dtype, step,
                              rows_per_read, device)
        faults.point("fit.block")
        return total
    total = None
    for r in plan_blocks(start, stop, step, rows_per_read):
        a = _read(source, r.start, r.stop, "source")
        b = _read(target, r.start, r.stop, "target")
        scratch = (buffer("centred-source", r.rows, source.dim, dtype),
                   buffer("centred-target", r.rows, target.dim, dtype))
        m = block_moments(a, b, gram=gram, normalize=normalize, dtype=dtype, start=r.start,
                          scratch=scratch)
        total = m if total is None else merge(total, m)
    faults.point("fit.block")
    return total


def save_unit_task(job: Job, index: int, start: int, stop: int, moments: Moments) -> Moments:
    """Store a finished unit's statistics for rows [start, stop) (its durable progress;
    fenced: a run that lost its lease raises instead of writing)."""
    job.save_unit(index, gpu.to_host(moments), start, stop)
    faults.point("fit.unit-saved")
    return moments


def merge_task(*parts: Moments) -> Moments:
    if any(isinstance(p, gpu.DeviceMoments) for p in parts):
        return gpu.merge_task(*parts)
    return merge_all(parts)


def region_task(source: EmbeddingArray, output, params: tuple, start: int, stop: int,
                index: int, job: Optional[Job], dtype: str, renormalize: bool,
                normalize: bool, bad_rows: str = "fail", offset: int = 0,
                device: str = "cpu") -> tuple[int, list[int]]:
    """Map source rows [offset + start, offset + stop) and write them as output rows
    [start, stop), whole output chunks; then record the
    region as done (the marker is written after the data, never before). Both writes are
    fenced: a run that lost its lease raises instead of writing.

    ``bad_rows``: "fail" raises NonFiniteError at a NaN/Inf row (or a zero-norm row when
    the transform normalises); "nan" / "zero" write NaN / zero rows for them instead.
    ``device="cuda"`` maps on the GPU (bigalign.gpu); a region holding bad rows to be
    tolerated is then mapped again on the CPU (they are rare).
    Returns (rows written, source row numbers of the bad rows)."""
    matrix, source_mean, target_mean, url = params
    y, bad = None, None
    if device != "cpu":
        try:
            y = gpu.map_region(source, offset + start, offset + stop, params, dtype,
                               renormalize, normalize, device)
        except NonFiniteError:
            if bad_rows == "fail":
                raise
    if y is None:
        x = _read(source, offset + start, offset + stop, "source")
        bad = _bad_rows(x, normalize) if bad_rows != "fail" else None
        if bad is not None:
            x[bad] = 1.0  # any finite, non-zero row: its output is replaced below
        y = map_rows(x, matrix, source_mean, target_mean, normalize=normalize,
                     renormalize=renormalize, dtype=dtype, start=offset + start, inplace=True,
                     out=buffer("mapped", stop - start, matrix.shape[1], matrix.dtype))
        if bad is not None:
            y[bad] = np.nan if bad_rows == "nan" else 0
    found = [] if bad is None else [offset + start + int(i) for i in bad]
    if job is not None:
        job.check_fence()
    write_rows(output, start, y, url=url)
    faults.point("apply.region-written")
    if job is not None:
        job.mark_done(index, start, stop, bad=found)
        faults.point("apply.region-done")
    return stop - start, found


def _bad_rows(x: np.ndarray, normalize: bool) -> Optional[np.ndarray]:
    """Indices of rows holding NaN/Inf (or of zero norm when rows are normalised), or None:
    one extra pass over the block, made only when bad rows are tolerated."""
    ok = np.isfinite(x).all(axis=1)
    if normalize:
        ok &= np.einsum("ij,ij->i", x, x, dtype=np.float64) > 0
    return None if ok.all() else np.flatnonzero(~ok)


def count_task(*results: tuple[int, list[int]]) -> tuple[int, list[int]]:
    """(rows written, bad rows) summed over regions."""
    return (int(sum(r[0] for r in results)),
            sorted(i for r in results for i in r[1]))


# ---- graph builders ----------------------------------------------------------------------

def _tree(graph: dict, name: str, keys: list, fan_in: int, func=merge_task):
    """Add a fixed merge tree over ``keys`` (in order) to ``graph``; return the root key."""
    if len(keys) == 1:
        return keys[0]
    for level, groups in enumerate(merge_tree(len(keys), fan_in)):
        keys_next = []
        for j, group in enumerate(groups):
            key = (name, level, j)
            graph[key] = (func, *[keys[i] for i in group])
            keys_next.append(key)
        keys = keys_next
    return keys[0]


def fit_graph(source: EmbeddingArray, target: EmbeddingArray, plan: FitPlan, *,
              done: set[int] = frozenset(), job: Optional[Job] = None,
              normalize: bool = False, gram: bool = False, dtype: str = "float32",
              fan_in: Optional[int] = None, device: str = "cpu"):
    """Graph whose key holds the merged Moments of the plan's rows.

    One task per block of the plan streams its rows ``plan.rows_per_read`` at a time.
    Units in ``done`` are loaded from ``job`` instead of computed; the others write their
    merged statistics there when they finish (when ``job`` is given). ``device="cuda"``:
    leaves run on the GPU and partials stay there through the merge trees; the key holds
    numpy Moments all the same. Returns (graph, key, number of leaf tasks).
    """
    blocks, units, unit_rows = plan.blocks(), plan.units(), plan.unit_rows()
    step, rows_per_read, fan_in = plan.step, plan.rows_per_read, fan_in or plan.fan_in
    token = uuid.uuid4().hex[:12]
    src, tgt = f"bigalign-source-{token}", f"bigalign-target-{token}"
    graph: dict = {src: source, tgt: target}
    unit_keys, leaves = [], 0
    for u, unit in enumerate(units):
        key = (f"bigalign-unit-{token}", u)
        if u in done:
            graph[key] = (job.load_unit, u, *unit_rows[u])
        else:
            block_keys = []
            for i in unit:
                b = blocks[i]
                bk = (f"bigalign-block-{token}", b.index)
                graph[bk] = (block_task, src, tgt, b.start, b.stop, normalize, gram, dtype,
                             step, rows_per_read, device)
                block_keys.append(bk)
            leaves += len(block_keys)
            root = _tree(graph, f"bigalign-merge-{token}-{u}", block_keys, fan_in)
            graph[key] = (save_unit_task, job, u, *unit_rows[u], root) if job is not None \
                else (merge_task, root)
        unit_keys.append(key)
    root = _tree(graph, f"bigalign-total-{token}", unit_keys, fan_in)
    if device != "cpu":
        graph[f"bigalign-host-{token}"] = (gpu.to_host_task, root)
        root = f"bigalign-host-{token}"
    return graph, root, leaves


def apply_graph(source: EmbeddingArray, output, params: tuple, blocks: list[Block], *,
                done: set[int] = frozenset(), job: Optional[Job] = None,
                dtype: str = "float32", renormalize: bool = False, normalize: bool = False,
                bad_rows: str = "fail", offset: int = 0, device: str = "cpu"):
    """Graph whose key holds (rows written, bad row numbers); one task per block (output
    rows; source rows ``offset`` later) not in ``done``. Returns (graph, key, number of
    region tasks)."""
    token = uuid.uuid4().hex[:12]
    src, out, par = (f"bigalign-source-{token}", f"bigalign-output-{token}",
                     f"bigalign-params-{token}")
    graph: dict = {src: source, out: output, par: params}
    keys = []
    for b in blocks:
        if b.index in done:
            continue
        key = (f"bigalign-region-{token}", b.index)
        graph[key] = (region_task, src, out, par, b.start, b.stop, b.index, job,
                      dtype, renormalize, normalize, bad_rows, offset, device)
        keys.append(key)
    total = f"bigalign-written-{token}"
    graph[total] = (count_task, *keys)
    return graph, total, len(keys)

