"""The public Python face: fit() and apply().

    >>> t = bigalign.fit("old.zarr", "new.zarr", center=True, output="old2new.transform")
    >>> bigalign.apply(t, "corpus_old.zarr", "corpus_in_new.zarr")
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Union

import numpy as np

from . import __version__, faults
from .checkpoint import Progress
from .cluster import session
from .engine import apply_graph, fit_graph
from .errors import InputError
from .gpu import check_device
from .plan import (DEFAULT_BLOCK_BYTES, MIN_BLOCKS, apply_task_bytes, choose_block_rows,
                   choose_fan_in, common_step, fit_block_rows, fit_task_bytes, group,
                   partial_bytes, plan_blocks, plan_units)
from .solve import discrepancy, paper_bound, procrustes
from .stores import create_output, open_embeddings, parse_rows, validate_pair
from .transform import Transform

log = logging.getLogger("bigalign")

__all__ = ["fit", "apply", "RunReport", "output_status", "run_status", "default_checkpoint"]


@dataclass
class RunReport:
    """What a streaming run did: rows, seconds, tasks run and units/regions skipped."""

    rows: int
    seconds: float
    tasks: int
    units_total: int
    units_resumed: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def default_checkpoint(output: str) -> str:
    """Progress of a run writing ``output`` is kept next to it."""
    return str(output).rstrip("/") + ".checkpoint"


def _run_options(scheduler, workers, memory_limit, threads, progress):
    return dict(scheduler=scheduler, workers=workers, memory_limit=memory_limit,
                threads=threads, progress=progress)


def _precision(precision: str, *dtypes) -> str:
    if precision == "auto":
        return "float64" if any(np.dtype(d) == np.float64 for d in dtypes) else "float32"
    if precision not in ("float32", "float64"):
        raise InputError(f"precision must be 'auto', 'float32' or 'float64', got {precision!r}")
    return precision


def _transform_exists(url: str, storage_options) -> Optional[bool]:
    """None: nothing there; True: a complete transform; False: something else / partial."""
    import zarr

    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options)
    except Exception:
        try:
            zarr.open_array(url, mode="r", storage_options=storage_options)
            return False
        except Exception:
            return None
    return bool(group.attrs.get("bigalign"))


def fit(source, target, *, rows=None, center: bool = False, normalize: bool = False,
        scale: bool = False, reflection: bool = True, diagnostics: bool = True,
        precision: str = "auto", output: Optional[str] = None, overwrite: bool = False,
        checkpoint: Optional[str] = None, restart: bool = False,
        keep_checkpoint: bool = False, scheduler: Optional[str] = None,
        workers: Optional[int] = None, memory_limit: Optional[str] = None,
        threads: Optional[int] = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
        progress: bool = False, storage_options: Optional[dict] = None,
        check_chunks: bool = True, fan_in: Optional[int] = None,
        device: str = "cpu") -> Transform:
    """Fit an orthogonal map from paired rows of ``source`` (N, dA) to ``target`` (N, dB).

    One streaming pass reads each chunk once and accumulates float64 statistics; one SVD of
    the dA x dB cross-covariance on this node gives the rotation.

    Parameters
    ----------
    source, target : Zarr arrays (path, fsspec URL or zarr.Array), float16/32/64, row i of
        ``source`` paired with row i of ``target``.
    rows : (start, stop) or "START:STOP": fit on this contiguous row range only.
    center : remove each side's mean first (recommended whenever a model's vectors share a
        common offset, which real models often do; see README).
    normalize : L2-normalise rows first (applied to the source at apply time too).
    scale : fit a similarity scale s as well.
    reflection : allow det(Q) = -1; False forces a proper rotation (dA == dB only).
    diagnostics : also accumulate the Gram matrices A^T A, B^T B (about 2x the fit's
        arithmetic) for the dot-product discrepancy and the paper's bound.
    precision : dtype of the block GEMMs: "auto" (float64 for float64 input, else float32:
        statistics accumulate in float64 either way), "float32" or "float64".
    output : save the Transform here (a Zarr group); progress is then checkpointed next to it
        (``checkpoint`` overrides where) so a rerun after a crash resumes.
    restart : discard recorded progress instead of resuming.
    keep_checkpoint : keep the per-unit statistics after success.
    scheduler / workers / memory_limit / threads : where to run (see bigalign.cluster).
    block_bytes : input bytes per task (default 64 MiB).
    device : "cpu" (default) or "cuda": run the block kernels on the GPU with CuPy (the same
        plan and graph; statistics equal to the CPU's within float32 GEMM round-off; see
        bigalign.gpu and the README's "GPU backend").

    Returns the fitted :class:`Transform` (also saved to ``output`` when given).
    """
    t0 = time.perf_counter()
    device = check_device(device)
    src = open_embeddings(source, side="source", storage_options=storage_options,
                          check_chunks=check_chunks)
    tgt = open_embeddings(target, side="target", storage_options=storage_options,
                          check_chunks=check_chunks)
    validate_pair(src, tgt)
    start, stop = parse_rows(rows, src.rows)
    dim_a, dim_b = src.dim, tgt.dim
    if not reflection and dim_a != dim_b:
        raise InputError(f"--no-reflection needs equal dimensions (a proper rotation), got "
                         f"source {dim_a} and target {dim_b}")
    dtype = _precision(precision, src.dtype, tgt.dtype)
    gram = bool(diagnostics or dim_a > dim_b)  # dA > dB: the residual needs A^T A
    if checkpoint is None and output is not None:
        checkpoint = default_checkpoint(output)
    if output is not None and not overwrite:
        state = _transform_exists(output, storage_options)
        leftover = Progress(checkpoint, storage_options)
        if state is True and not keep_checkpoint and leftover.exists():
            # killed after the save, before the clean-up: the fit is finished; tidy up
            with leftover.lease():
                leftover.clear(keep_lock=True)
            leftover.clear()
            log.warning("removed the leftover checkpoint %s of the finished fit", checkpoint)
        # a group without the final attribute is a save cut short: resumable, not "exists"
        if state is True or (state is False and not leftover.exists()):
            raise InputError(f"output {output!r} already exists (pass overwrite=True / "
                             "--overwrite to replace it)")

    fingerprint = {"source": src.fingerprint(), "target": tgt.fingerprint(),
                   "rows": [start, stop],
                   "options": {"normalize": normalize, "gram": gram, "precision": dtype}}
    plan = _fit_plan(src, tgt, start, stop, block_bytes, gram)
    prog = Progress(checkpoint, storage_options) if checkpoint else None
    done: set[int] = set()
    with prog.lease() if prog else contextlib.nullcontext():
        if prog:
            plan = prog.begin("fit", fingerprint, plan, restart=restart)
        blocks = plan_blocks(start, stop, plan["step"], plan["rows_per_block"])
        units = group(len(blocks), plan["blocks_per_unit"])
        if prog:
            done = prog.done_units() & set(range(len(units)))
            if done:
                log.warning("resuming: %d of %d units done", len(done), len(units))
        mb = fit_task_bytes(plan["rows_per_read"], dim_a, dim_b, src.dtype.itemsize,
                            tgt.dtype.itemsize, np.dtype(dtype).itemsize, gram,
                            plan["fan_in"]) / 2**20
        log.info("fit: %d pairs of %d -> %d dims in %d tasks (~%.0f MB per thread)%s",
                 stop - start, dim_a, dim_b, len(blocks), mb,
                 f", progress saved in {len(units)} units" if prog else "")
        graph, key, tasks = fit_graph(src, tgt, blocks, units, done=done, progress=prog,
                                      normalize=normalize, gram=gram, dtype=dtype,
                                      fan_in=fan_in or plan["fan_in"],
                                      rows_per_read=plan["rows_per_read"], step=plan["step"],
                                      device=device)
        with session(**_run_options(scheduler, workers, memory_limit, threads, progress)) as s:
            moments = s.get(graph, key)
        seconds = time.perf_counter() - t0
        transform = _solve(moments, src, tgt, start, stop, center=center, normalize=normalize,
                           scale=scale, reflection=reflection, dtype=dtype, gram=gram)
        transform.metadata["run"] = {
            "seconds": seconds, "rows_per_second": (stop - start) / seconds,
            "tasks": tasks, "units": len(units), "units_resumed": len(done), "device": device}
        faults.point("fit.solved")
        if output is not None:
            transform.save(output, overwrite=True, storage_options=storage_options)
            log.info("saved transform to %s", output)
            faults.point("fit.saved")
        if prog and not keep_checkpoint:
            prog.clear(keep_lock=True)
    if prog and not keep_checkpoint:
        prog.clear()
    return transform


def _fit_plan(src, tgt, start, stop, block_bytes, gram) -> dict:
    """Reads on chunk boundaries of both inputs, tasks of whole reads (at least twice their
    partial's size), tasks grouped in checkpoint units, merge fan-in for a 1 GiB budget."""
    row_bytes = src.row_bytes + tgt.row_bytes
    step, aligned = common_step([src.row_step, tgt.row_step], row_bytes, block_bytes)
    if not aligned:
        log.warning("source and target chunkings (%d and %d rows) share no small common "
                    "multiple: target chunks on task boundaries are read twice",
                    src.row_step, tgt.row_step)
    partial = partial_bytes(src.dim, tgt.dim, gram)
    per_read = choose_block_rows(stop - start, step, row_bytes, block_bytes, MIN_BLOCKS)
    per = fit_block_rows(per_read, row_bytes, partial)
    n_blocks = len(plan_blocks(start, stop, step, per))
    units = plan_units(n_blocks, per * row_bytes, partial)
    return {"step": step, "rows_per_block": per, "rows_per_read": per_read,
            "blocks_per_unit": len(units[0]), "fan_in": choose_fan_in(partial)}


def _solve(moments, src, tgt, start, stop, *, center, normalize, scale, reflection, dtype,
           gram) -> Transform:
    sol = procrustes(moments, center=center, scale=scale, reflection=reflection)
    dim_a, dim_b = src.dim, tgt.dim
    meta = {
        "n_pairs": int(moments.n), "dims": [dim_a, dim_b], "rows": [start, stop],
        "residual": sol.residual, "relative_residual": sol.relative_residual,
        "target_energy": sol.target_energy, "rank": sol.rank,
        "singular_values": {"max": float(np.abs(sol.singular_values).max()),
                            "min": float(np.abs(sol.singular_values).min()),
                            "sum": float(sol.singular_values.sum())},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bigalign_version": __version__,
        "inputs": {"source": src.fingerprint(), "target": tgt.fingerprint()},
    }
    if gram:
        eps = discrepancy(moments, center=center)
        meta["discrepancy"] = paper_bound(eps, dim_a, dim_b, moments.n)
        if sol.residual is not None:
            meta["discrepancy"]["achieved_residual"] = math.sqrt(sol.residual)
    options = {"center": center, "normalize": normalize, "scale": scale,
               "reflection": reflection, "rows": [start, stop], "precision": dtype,
               "diagnostics": gram}
    zeros = np.zeros
    return Transform(sol.rotation,
                     moments.mean_a.copy() if center else zeros(dim_a),
                     moments.mean_b.copy() if center else zeros(dim_b),
                     sol.scale, options, meta, sol.singular_values, moments)


def _transform_digest(t: Transform) -> str:
    h = hashlib.sha256()
    for a in (t.rotation, t.source_mean, t.target_mean):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update(repr((t.scale, t.normalize)).encode())
    return h.hexdigest()


def run_status(path, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Progress of a fit or apply in flight (or interrupted), from storage alone: ``path`` is
    the run's output (transform or apply output) or its checkpoint URL. Returns
    {kind, units_done, units_total, rows_done, rows_total, rows_per_second, eta_seconds,
    running, checkpoint} or None when no progress is recorded there."""
    for url in (str(path), default_checkpoint(path)):
        summary = Progress(url, storage_options).summary()
        if summary is not None:
            return dict(summary, checkpoint=url)
    return None


def output_status(output, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The ``bigalign`` attribute of an apply output: {"complete": bool, ...}, or None."""
    import zarr

    try:
        arr = zarr.open_array(output, mode="r", storage_options=storage_options)
    except Exception:
        return None
    return dict(arr.attrs.get("bigalign", {})) or None


def apply(transform: Union[Transform, str], source, output: str, *, dtype: str = "float32",
          renormalize: bool = False, target_centred: bool = False, overwrite: bool = False,
          compression: str = "none",
          chunk_rows: Optional[int] = None, checkpoint: Union[str, bool, None] = None,
          restart: bool = False, scheduler: Optional[str] = None,
          workers: Optional[int] = None, memory_limit: Optional[str] = None,
          threads: Optional[int] = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
          progress: bool = False, storage_options: Optional[dict] = None,
          check_chunks: bool = True, device: str = "cpu") -> RunReport:
    """Map every row of ``source`` (N, dA) with ``transform`` into a new Zarr array
    ``output`` (N, dB): ``y = (x - source_mean) * scale @ rotation + target_mean``.

    The output is created from a template (row chunks as the source's, or ``chunk_rows``;
    uncompressed unless ``compression`` is "lz4" or "zstd"), then one task per whole-chunk
    region reads, maps and writes its rows and records the region as done. The output's
    ``bigalign`` attribute says ``complete: true`` only after the last region. A rerun after
    a crash writes only the missing regions.

    dtype : output dtype, float16/float32/float64 (float64 computes in float64).
    renormalize : L2-normalise each output row.
    target_centred : leave out ``+ target_mean``: write vectors in the target's centred space
        (search them among native target vectors minus ``transform.target_mean``; with a
        large common offset in the target model this retrieves better, see README).
    checkpoint : where done-markers go (default OUTPUT.checkpoint); False records none (the
        output is still marked complete at the end, but a killed run starts over).
    device : "cpu" (default) or "cuda": map on the GPU with CuPy (same regions; rows equal
        to the CPU's within float32 round-off, so a resume on another device is not
        byte-identical).
    Returns a :class:`RunReport`.
    """
    t0 = time.perf_counter()
    device = check_device(device)
    if not isinstance(transform, Transform):
        transform = Transform.load(transform, storage_options=storage_options)
    if dtype not in ("float16", "float32", "float64"):
        raise InputError(f"--dtype must be float16, float32 or float64, got {dtype!r}")
    src = open_embeddings(source, side="source", storage_options=storage_options,
                          check_chunks=check_chunks)
    dim_a, dim_b = transform.dims
    if src.dim != dim_a:
        raise InputError(f"source {src.url!r} has dimension {src.dim} but the transform maps "
                         f"dimension {dim_a}")
    if src.url.rstrip("/") == str(output).rstrip("/"):
        raise InputError("output must differ from the source (inputs are never modified)")
    chunk = int(chunk_rows or src.row_step)
    if chunk <= 0:
        raise InputError(f"chunk_rows must be positive, got {chunk}")
    prog = None if checkpoint is False else \
        Progress(checkpoint or default_checkpoint(output), storage_options)
    fingerprint = {"source": src.fingerprint(), "transform": _transform_digest(transform),
                   "options": {"dtype": dtype, "renormalize": renormalize,
                               "target_centred": target_centred, "chunk_rows": chunk,
                               "compression": compression}}
    status = output_status(output, storage_options)
    resuming = False
    if status is not None and not overwrite:
        if status.get("complete"):
            raise InputError(f"output {output!r} is already complete (pass --overwrite to "
                             "write it again)")
        if prog is None or not (restart or prog.exists()):
            raise InputError(f"output {output!r} exists, is incomplete and has no recorded "
                             "progress; pass --overwrite to write it again")
        resuming = not restart
    elif status is None and not overwrite and _transform_exists(output, storage_options) is not None:
        raise InputError(f"output {output!r} already exists (pass --overwrite to replace it)")

    row_bytes = src.row_bytes + dim_b * np.dtype(dtype).itemsize
    step, aligned = common_step([chunk, src.row_step], row_bytes, block_bytes)
    if not aligned:
        log.warning("source chunks (%d rows) and output chunks (%d rows) share no small "
                    "common multiple: some source chunks are read twice", src.row_step, chunk)
    plan = {"step": step,
            "rows_per_block": choose_block_rows(src.rows, step, row_bytes, block_bytes, MIN_BLOCKS)}
    done: set[int] = set()
    with prog.lease() if prog else contextlib.nullcontext():
        if prog:
            if not resuming:
                prog.clear(keep_lock=True)
            plan = prog.begin("apply", fingerprint, plan)
        blocks = plan_blocks(0, src.rows, plan["step"], plan["rows_per_block"])
        if resuming:
            out = _open_output(output, storage_options)
            done = prog.done_regions() & {b.index for b in blocks}
            log.warning("resuming: %d of %d regions done", len(done), len(blocks))
        else:
            out = create_output(output, rows=src.rows, dim=dim_b, chunk_rows=chunk,
                                dtype=dtype, compression=compression,
                                overwrite=overwrite or status is not None,
                                storage_options=storage_options,
                                attributes={"bigalign": {"complete": False,
                                                         "transform": fingerprint["transform"],
                                                         "source": src.url,
                                                         "target_centred": target_centred}})
        params = (transform.matrix(dtype), transform.source_mean,
                  transform.output_mean(target_centred), str(output))
        graph, key, tasks = apply_graph(src, out, params, blocks, done=done, progress=prog,
                                        dtype=dtype, renormalize=renormalize,
                                        normalize=transform.normalize, device=device)
        mb = apply_task_bytes(plan["rows_per_block"], dim_a, dim_b, src.dtype.itemsize,
                              np.dtype(dtype).itemsize) / 2**20
        log.info("apply: %d rows of %d -> %d dims in %d tasks (~%.0f MB per thread)",
                 src.rows, dim_a, dim_b, tasks, mb)
        with session(**_run_options(scheduler, workers, memory_limit, threads, progress)) as s:
            s.get(graph, key)
        seconds = time.perf_counter() - t0
        faults.point("apply.before-complete")
        # the completion mark goes last: before it, readers see an incomplete output
        attrs = dict(out.attrs.get("bigalign", {}))
        attrs.update(complete=True, rows=src.rows, seconds=seconds,
                     completed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        out.attrs["bigalign"] = attrs
        if prog:
            prog.clear(keep_lock=True)
    if prog:
        prog.clear()
    return RunReport(src.rows, seconds, tasks, len(blocks), len(done))


def _open_output(output, storage_options):
    import zarr

    return zarr.open_array(output, mode="r+", storage_options=storage_options,
                           config={"write_empty_chunks": True})
