"""Execution: Dask task graphs for the streaming fit (a reduction of statistics) and the
parallel apply (one task per whole-chunk region), and the task functions they run.

The graphs are plain dicts, as in dask/array/reductions.py and rechunker: one leaf task per
block of rows, merged in a fixed tree per checkpoint unit whose root also writes the unit's
statistics to storage; a second fixed tree merges the units. Fixed trees make the float64
result independent of worker count and finishing order, and identical after a resume. An
apply has one task per region, which streams its rows write by write, and a fixed tree
(fan-in 32) that sums what the regions wrote: no task has more than 32 inputs, so a graph
of 10^5 regions stays cheap for the scheduler. The number of tasks of both graphs is
:func:`bigalign.planning.plan.fit_task_count` / :func:`bigalign.planning.plan.apply_task_count`.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Optional

import numpy as np

from . import devices
from .. import faults
from .graph import GraphSpec, Group, Leaf, Shared, build, token
from ..storage.job import Job
from ..planning.plan import COUNT_FAN_IN, Block, FitPlan, merge_tree, plan_blocks
from ..errors import NonFiniteError
from ..maths.stats import Accumulator, Moments, bad_norms, merge_all
from ..storage.stores import EmbeddingArray, read_rows, write_rows
from ..maths.mapping import map_rows

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
    devices.release_all()


def _read(emb: EmbeddingArray, start: int, stop: int, name: str) -> np.ndarray:
    return read_rows(emb, start, stop, out=buffer(name, stop - start, emb.dim, emb.dtype))


# ---- task functions (module level: they are pickled to workers) ------------------------

def block_task(source: EmbeddingArray, target: EmbeddingArray, start: int, stop: int,
               normalize: bool, gram: bool, dtype: str, step: int, rows_per_read: int,
               device: str = "cpu") -> Moments:
    """Read paired rows [start, stop) once, ``rows_per_read`` (whole chunks) at a time, and
    reduce them to float64 statistics; memory is one read plus the running statistics.
    Another ``device``: the same on its backend (:mod:`bigalign.execution.devices`),
    statistics left on the device."""
    if device != "cpu":
        total = devices.backend(device).fit_block(source, target, start, stop, normalize,
                                                  gram, dtype, step, rows_per_read, device)
        faults.point("fit.block")
        return total
    acc = Accumulator(source.dim, target.dim, gram=gram, normalize=normalize, dtype=dtype)
    for r in plan_blocks(start, stop, step, rows_per_read):
        a = _read(source, r.start, r.stop, "source")
        b = _read(target, r.start, r.stop, "target")
        scratch = (buffer("centred-source", r.rows, source.dim, dtype),
                   buffer("centred-target", r.rows, target.dim, dtype))
        acc.add(a, b, start=r.start, scratch=scratch)
    total = acc.moments()
    faults.point("fit.block")
    return total


def unit_task(job: Job, index: int, start: int, stop: int, *parts: Moments) -> Moments:
    """The root of a unit's merge tree: merge ``parts`` (in row order) and store the unit's
    statistics for rows [start, stop) (its durable progress; fenced: a run that lost its
    lease raises instead of writing)."""
    moments = parts[0] if len(parts) == 1 else merge_task(*parts)
    job.save_unit(index, devices.to_host(moments), start, stop)
    faults.point("fit.unit-saved")
    return moments


def resumed_unit_task(job: Job, index: int, start: int, stop: int,
                      source: EmbeddingArray, target: EmbeddingArray, blocks: list,
                      normalize: bool, gram: bool, dtype: str, step: int, rows_per_read: int,
                      device: str, fan_in: int) -> Moments:
    """A unit recorded as done (by the name of its file, from one listing): its stored
    statistics. When the file cannot be used after all (unreadable, or its contents do not
    match its name) it is recomputed here, warning, with the same blocks and the same
    fixed merge tree as the live graph, so the result is the same bits either way."""
    import warnings

    from ..errors import CheckpointError
    try:
        return job.load_unit(index, start, stop)
    except CheckpointError as e:
        warnings.warn(f"{e}; recomputing unit {index}")
    parts = [block_task(source, target, b.start, b.stop, normalize, gram, dtype, step,
                        rows_per_read, device) for b in blocks]
    for groups in merge_tree(len(parts), fan_in)[:-1]:
        parts = [merge_task(*[parts[i] for i in g]) for g in groups]
    return unit_task(job, index, start, stop, *parts)


def merge_task(*parts: Moments) -> Moments:
    module = devices.owner(parts)
    if module is not None:
        return module.merge_task(*parts)
    return merge_all(parts)


def region_task(source: EmbeddingArray, output, params: tuple, start: int, stop: int,
                index: int, job: Optional[Job], dtype: str, renormalize: bool,
                normalize: bool, bad_rows: str = "fail", offset: int = 0,
                device: str = "cpu", layout: Optional[tuple] = None,
                ids: Optional[tuple] = None) -> tuple[int, list[int]]:
    """Map source rows [offset + start, offset + stop) and write them as output rows
    [start, stop), whole output chunks (or shards); then record the region as done (the
    marker is written after the data, never before). Every write is fenced: a run that lost
    its lease raises instead of writing.

    ``ids``: (source ids or None, output ids) of an output embedding store: with each write
    the ids of its rows are copied too (the output's id chunks are its writes' rows, so a
    task writes only its own id chunks); a source without ids gives its row numbers. The
    ids are a host copy whatever the device.

    ``layout``: (write_step, rows_per_write, read_step, rows_per_read) of the plan
    (:meth:`bigalign.planning.plan.ApplyPlan.layout`): the region is written ``rows_per_write`` rows
    at a time (whole output shards or chunks), each write gathered from source reads of
    ``rows_per_read`` rows, so memory is one write whatever the region's size. None: one
    read and one write.

    ``bad_rows``: "fail" raises NonFiniteError at a NaN/Inf row (or a zero-norm row when
    the transform normalises); "nan" / "zero" write NaN / zero rows for them instead.
    ``device="cuda"`` maps on the GPU (bigalign.execution.gpu); a read holding bad rows to be
    tolerated is then mapped again on the CPU (they are rare).
    Returns (rows written, source row numbers of the bad rows)."""
    write_step, per_write, read_step, per_read = layout or (stop - start, stop - start, 1,
                                                            stop - start)
    url = params[3]
    found: list[int] = []
    for w in plan_blocks(start, stop, write_step, per_write):
        if w.rows <= per_read:
            y, bad = _map(source, params, offset + w.start, offset + w.stop, dtype,
                          renormalize, normalize, bad_rows, device, "mapped")
            found += bad
        else:  # a write of several reads (a whole output shard): gather them
            y = buffer("write", w.rows, params[0].shape[1], dtype)
            direct = device == "cpu" and np.dtype(dtype) == params[0].dtype
            for r in plan_blocks(offset + w.start, offset + w.stop, read_step, per_read):
                dest = y[r.start - offset - w.start:r.stop - offset - w.start]
                part, bad = _map(source, params, r.start, r.stop, dtype, renormalize,
                                 normalize, bad_rows, device, "mapped",
                                 out=dest if direct else None)
                if part is not dest:
                    dest[...] = part
                found += bad
        if job is not None:
            job.check_fence()
        write_rows(output, w.start, y, url=url)
        if ids is not None:
            _copy_ids(*ids, offset + w.start, offset + w.stop, w.start, url)
    faults.point("apply.region-written")
    if job is not None:
        job.mark_done(index, start, stop, bad=found)
        faults.point("apply.region-done")
    return stop - start, found


def _copy_ids(source_ids, output_ids, start: int, stop: int, out_start: int,
              url: str) -> None:
    """Source ids of rows [start, stop) (their row numbers when ``source_ids`` is None)
    written as output ids [out_start, out_start + stop - start): (n,) int64 or str."""
    from ..storage.embedding_store import as_ids, ids_kind_of
    from ..storage.stores import retrying

    if source_ids is None:
        values = np.arange(start, stop, dtype=np.int64)
    else:
        values = retrying(f"cannot read source ids {start}:{stop} of {url!r}",
                          lambda: np.asarray(source_ids[start:stop]))
    write_rows(output_ids, out_start, as_ids(values, ids_kind_of(output_ids.dtype)),
               url=f"{url}/ids")


def _map(source: EmbeddingArray, params: tuple, start: int, stop: int, dtype: str,
         renormalize: bool, normalize: bool, bad_rows: str, device: str,
         name: str, out: Optional[np.ndarray] = None) -> tuple[np.ndarray, list[int]]:
    """Source rows [start, stop) mapped (into ``out`` when given, a C-contiguous array of
    the compute dtype, else a buffer of this thread, valid until its next use) and the
    source numbers of the bad rows written as NaN / zero."""
    matrix, source_mean, target_mean, _ = params
    if device != "cpu":
        try:
            return devices.backend(device).map_region(source, start, stop, params, dtype,
                                                      renormalize, normalize, device), []
        except NonFiniteError:
            if bad_rows == "fail":
                raise
    x = _read(source, start, stop, "source")
    bad = _bad_rows(x, matrix.dtype if normalize else None) if bad_rows != "fail" else None
    if bad is not None:
        x[bad] = 1.0  # any finite, non-zero row: its output is replaced below
    y = map_rows(x, matrix, source_mean, target_mean, normalize=normalize,
                 renormalize=renormalize, dtype=dtype, start=start, inplace=True,
                 out=out if out is not None else buffer(name, stop - start, matrix.shape[1],
                                                        matrix.dtype))
    if bad is not None:
        y[bad] = np.nan if bad_rows == "nan" else 0
    return y, [] if bad is None else [start + int(i) for i in bad]


def _bad_rows(x: np.ndarray, normalize) -> Optional[np.ndarray]:
    """Indices of rows holding NaN/Inf (or, with ``normalize`` the dtype rows are normalised
    in, rows that normalisation refuses: the same test as the kernel's), or None: one extra
    pass over the block, made only when bad rows are tolerated."""
    ok = np.isfinite(x).all(axis=1) if normalize is None else ~bad_norms(x, normalize)
    return None if ok.all() else np.flatnonzero(~ok)


def count_task(*results: tuple[int, list[int]]) -> tuple[int, list[int]]:
    """(rows written, bad rows) summed over regions."""
    return (int(sum(r[0] for r in results)),
            sorted(i for r in results for i in r[1]))


# ---- graph specs (built by bigalign.execution.graph) ----------------------------------------

def fit_graph(source: EmbeddingArray, target: EmbeddingArray, plan: FitPlan, *,
              done: set[int] = frozenset(), job: Optional[Job] = None,
              normalize: bool = False, gram: bool = False, dtype: str = "float32",
              fan_in: Optional[int] = None, device: str = "cpu", run_id: str = ""):
    """Graph whose key holds the merged Moments of the plan's rows.

    One task per block of the plan streams its rows ``plan.rows_per_read`` at a time; the
    blocks of a unit are merged by a fixed tree whose root also stores the unit's
    statistics (when ``job`` is given), and the units by another. Units in ``done`` are
    loaded from ``job`` instead of computed. ``device="cuda"``: leaves run on the GPU and
    partials stay there through the merge trees; the key holds numpy Moments all the same.
    Keys are named after the plan and ``run_id`` (:func:`bigalign.execution.graph.token`).
    Returns (graph, key, number of block tasks: units loaded from ``job`` not counted).
    """
    blocks, units, unit_rows = plan.blocks(), plan.units(), plan.unit_rows()
    step, rows_per_read, fan_in = plan.reads_step(), plan.rows_per_read, fan_in or plan.fan_in
    src, tgt = Shared("source"), Shared("target")
    groups = []
    for u, unit in enumerate(units):
        if u in done:
            leaf = Leaf(u, resumed_unit_task, (job, u, *unit_rows[u], src, tgt,
                                               [blocks[i] for i in unit], normalize, gram,
                                               dtype, step, rows_per_read, device, fan_in),
                        label="unit")
            groups.append(Group(u, (leaf,)))
            continue
        leaves = tuple(Leaf(blocks[i].index, block_task,
                            (src, tgt, blocks[i].start, blocks[i].stop, normalize, gram,
                             dtype, step, rows_per_read, device), label="block")
                       for i in unit)
        groups.append(Group(u, leaves, None if job is None else
                            (unit_task, job, u, *unit_rows[u])))
    spec = GraphSpec("fit", token(asdict(plan), run_id, sorted(done), normalize, gram,
                                  dtype, fan_in, device),
                     {"source": source, "target": target}, tuple(groups), merge_task,
                     fan_in, finish=None if device == "cpu" else devices.to_host)
    graph, key, _ = build(spec)
    return graph, key, sum(len(g.leaves) for g in groups if g.root is not None or
                           g.leaves[0].label == "block")


def apply_graph(source: EmbeddingArray, output, params: tuple, blocks: list[Block], *,
                done: set[int] = frozenset(), job: Optional[Job] = None,
                dtype: str = "float32", renormalize: bool = False, normalize: bool = False,
                bad_rows: str = "fail", offset: int = 0, device: str = "cpu",
                layout: Optional[tuple] = None, ids: Optional[tuple] = None,
                run_id: str = ""):
    """Graph whose key holds (rows written, bad row numbers); one task per block (output
    rows; source rows ``offset`` later) not in ``done``, streamed as ``layout`` says
    (:meth:`bigalign.planning.plan.ApplyPlan.layout`), summed by a tree of fan-in
    COUNT_FAN_IN. ``ids``: (source ids or None, output ids) copied by the same tasks
    (output stores). Keys are named after the blocks, options and ``run_id``.
    Returns (graph, key, number of region tasks)."""
    shared = {"source": source, "output": output, "params": params}
    if ids is not None:  # data, not a task: the graph's task count is as without ids
        shared["ids"] = ids
    groups = tuple(
        Group(b.index, (Leaf(b.index, region_task,
                             (Shared("source"), Shared("output"), Shared("params"), b.start,
                              b.stop, b.index, job, dtype, renormalize, normalize, bad_rows,
                              offset, device, layout, None if ids is None else Shared("ids")),
                             label="region"),))
        for b in blocks if b.index not in done)
    plan = [(b.index, b.start, b.stop) for b in blocks]
    return build(GraphSpec("apply", token(plan, run_id, sorted(done), dtype, renormalize,
                                          normalize, bad_rows, offset, device, layout),
                           shared, groups, count_task, COUNT_FAN_IN, empty=count_task))
