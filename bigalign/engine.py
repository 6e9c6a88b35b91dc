"""Execution: Dask task graphs for the streaming fit (a reduction of statistics) and the
parallel apply (one task per whole-chunk region), and the task functions they run.

The graphs are plain dicts, as in dask/array/reductions.py and rechunker: one leaf task per
block of rows, merged in a fixed tree per checkpoint unit; the unit roots write their
statistics to storage; a second fixed tree merges the units. Fixed trees make the float64
result independent of worker count and finishing order, and identical after a resume.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Optional

import numpy as np

from . import faults, gpu
from .checkpoint import Progress
from .plan import Block, merge_tree, plan_blocks
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


def save_unit_task(progress: Progress, index: int, moments: Moments) -> Moments:
    """Store a finished unit's statistics (the unit's durable progress)."""
    progress.save_unit(index, gpu.to_host(moments))
    faults.point("fit.unit-saved")
    return moments


def merge_task(*parts: Moments) -> Moments:
    if any(isinstance(p, gpu.DeviceMoments) for p in parts):
        return gpu.merge_task(*parts)
    return merge_all(parts)


def region_task(source: EmbeddingArray, output, params: tuple, start: int, stop: int,
                index: int, progress: Optional[Progress], dtype: str, renormalize: bool,
                normalize: bool, device: str = "cpu") -> int:
    """Map source rows [start, stop) and write them as whole output chunks; then record the
    region as done (the marker is written after the data, never before). ``device="cuda"``
    maps on the GPU (bigalign.gpu)."""
    matrix, source_mean, target_mean, url = params
    if device != "cpu":
        y = gpu.map_region(source, start, stop, params, dtype, renormalize, normalize, device)
    else:
        x = _read(source, start, stop, "source")
        y = map_rows(x, matrix, source_mean, target_mean, normalize=normalize,
                     renormalize=renormalize, dtype=dtype, start=start, inplace=True,
                     out=buffer("mapped", stop - start, matrix.shape[1], matrix.dtype))
    write_rows(output, start, y, url=url)
    faults.point("apply.region-written")
    if progress is not None:
        progress.mark_done(index, {"start": start, "stop": stop, "t": time.time()})
        faults.point("apply.region-done")
    return stop - start


def count_task(*rows: int) -> int:
    return int(sum(rows))


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


def fit_graph(source: EmbeddingArray, target: EmbeddingArray, blocks: list[Block],
              units: list[range], *, done: set[int] = frozenset(),
              progress: Optional[Progress] = None, normalize: bool = False,
              gram: bool = False, dtype: str = "float32", fan_in: int = 8,
              step: int, rows_per_read: int, device: str = "cpu"):
    """Graph whose key holds the merged Moments of all ``blocks``.

    Each block task streams its rows ``rows_per_read`` at a time (reads start on multiples
    of ``step``). Units in ``done`` are loaded from ``progress`` instead of computed; the
    others write their merged statistics there when they finish (when ``progress`` is given).
    ``device="cuda"``: leaves run on the GPU and partials stay there through the merge
    trees; the key holds numpy Moments all the same.
    Returns (graph, key, number of leaf tasks).
    """
    token = uuid.uuid4().hex[:12]
    src, tgt = f"bigalign-source-{token}", f"bigalign-target-{token}"
    graph: dict = {src: source, tgt: target}
    unit_keys, leaves = [], 0
    for u, unit in enumerate(units):
        key = (f"bigalign-unit-{token}", u)
        if u in done:
            graph[key] = (progress.load_unit, u)
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
            graph[key] = (save_unit_task, progress, u, root) if progress is not None else \
                (merge_task, root)
        unit_keys.append(key)
    root = _tree(graph, f"bigalign-total-{token}", unit_keys, fan_in)
    if device != "cpu":
        graph[f"bigalign-host-{token}"] = (gpu.to_host_task, root)
        root = f"bigalign-host-{token}"
    return graph, root, leaves


def apply_graph(source: EmbeddingArray, output, params: tuple, blocks: list[Block], *,
                done: set[int] = frozenset(), progress: Optional[Progress] = None,
                dtype: str = "float32", renormalize: bool = False, normalize: bool = False,
                device: str = "cpu"):
    """Graph whose key holds the number of rows written; one task per block not in ``done``.
    Returns (graph, key, number of region tasks)."""
    token = uuid.uuid4().hex[:12]
    src, out, par = (f"bigalign-source-{token}", f"bigalign-output-{token}",
                     f"bigalign-params-{token}")
    graph: dict = {src: source, out: output, par: params}
    keys = []
    for b in blocks:
        if b.index in done:
            continue
        key = (f"bigalign-region-{token}", b.index)
        graph[key] = (region_task, src, out, par, b.start, b.stop, b.index, progress,
                      dtype, renormalize, normalize, device)
        keys.append(key)
    total = f"bigalign-written-{token}"
    graph[total] = (count_task, *keys)
    return graph, total, len(keys)

