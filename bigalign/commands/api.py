"""The public Python face: fit() and apply().

    >>> t = bigalign.fit("old.zarr", "new.zarr", center=True, output="old2new.transform")
    >>> bigalign.apply(t, "corpus_old.zarr", "corpus_in_new.zarr")

Both run as checkpointed jobs (:func:`bigalign.storage.job.checkpointed`): inputs are checked
against outputs under every spelling (:mod:`bigalign.storage.locations`), an output is replaced only
when bigalign wrote it (:mod:`bigalign.storage.outputs`), a finished job rerun with the same inputs
and options is a no-op, and a changed one is refused naming what changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, astuple, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Optional, Union

import numpy as np

from .. import __version__

from ..execution import faults
from ..storage.job import (Job, checkpointed, default_checkpoint, finished_or_refuse,
                           lease_home)
from .runs import MAX_BAD_ROWS_LISTED, RunReport
from ..storage.output_job import ZarrTarget, classify, output_job
from ..execution.cluster import session
from ..execution.engine import apply_graph, fit_graph
from ..errors import CheckpointError, DamagedOutputError, InputError
from ..execution.devices import check_device
from ..storage.locations import canonical_url, check_disjoint, options_for
from ..planning.options import (ApplyOptions, Execution, FitOptions, JobOptions, Pairing,
                                keywords_of, requests)
from ..storage.outputs import APPLY_KINDS, TRANSFORM_KINDS, check_replaceable, chunks_damage
from ..storage.embedding_store import (KIND as STORE_KIND, create_store, ids_kind_of, is_store,
                              open_for_writing, store_parts)
from ..execution.pairing import fit_record, gathered, join, pair_by_ids, sample_pairs
from ..planning.plan import (ApplyPlan, FitPlan, apply_task_bytes, fit_task_bytes,
                   make_apply_plan, make_fit_plan, output_layout)
from ..maths.metrics import fit_diagnostics
from ..maths.solve import procrustes
from ..storage.stores import content_witness, create_output, open_embeddings, parse_rows, validate_pair
from ..transform import Transform

log = logging.getLogger("bigalign")

__all__ = ["fit", "apply", "RunReport", "output_status", "run_status", "default_checkpoint"]


#: fit()'s flat keywords (the command line's flags), by the options object each sets
FIT_KEYWORDS = {"options": keywords_of(FitOptions),
                "pairing": keywords_of(Pairing, pair_by="by"),
                "job": keywords_of(JobOptions),
                "execution": keywords_of(Execution)}


def fit(source, target, options: Optional[FitOptions] = None, *,
        pairing: Optional[Pairing] = None, job: Optional[JobOptions] = None,
        execution: Optional[Execution] = None, output: Optional[str] = None,
        storage_options: Optional[dict] = None, source_model: Optional[str] = None,
        target_model: Optional[str] = None, fan_in: Optional[int] = None,
        **keywords) -> Transform:
    """Fit an orthogonal map from paired rows of ``source`` (N, dA) to ``target`` (N, dB).

    One streaming pass reads each chunk once and accumulates float64 statistics; one SVD of
    the dA x dB cross-covariance on this node gives the rotation.

    What to compute, which rows pair, the job protocol and where it runs are four options
    objects (:mod:`bigalign.planning.options`), each validated when built: ``options``
    (:class:`FitOptions`: center, normalize, scale, reflection, diagnostics, precision),
    ``pairing`` (:class:`Pairing`: by, rows, duplicates, sample, seed, scratch), ``job``
    (:class:`JobOptions`: overwrite, checkpoint, restart, keep_checkpoint, check_chunks) and
    ``execution`` (:class:`Execution`: scheduler, workers, memory_limit, threads,
    block_bytes, progress, device, stall_timeout). Their fields may also be given as flat
    keywords (``fit(a, b, center=True, workers=4)``; ``pair_by`` sets ``Pairing.by``), as
    the command line does: each keyword mirrors the ``bigalign fit`` flag of the same name
    (``overwrite`` is ``--overwrite``; ``check_chunks=False`` is ``--allow-missing-chunks``,
    ``diagnostics=False`` ``--no-diagnostics``), and errors name the flags.
    :class:`bigalign.Procrustes` is the same fit as an estimator.

    Parameters
    ----------
    source, target : Zarr arrays (path, fsspec URL or zarr.Array), float16/32/64, or
        embedding stores (Zarr groups holding ``embeddings``, optionally ``ids`` and a
        ``model`` attribute).
    pair_by : "rows" (row i with row i), "ids" (rows with equal ids, an inner join; both
        inputs must be stores with ids) or "auto" (ids when both have them, else rows).
    duplicates : with ids, "error" (default) refuses ids that occur twice on a side;
        "first" / "last" keep the first / last row of each id.
    sample, seed : with ids, fit on a reproducible random subset of ``sample`` pairs.
        A fit by id records its pairing in ``metadata["pairs"]``
        (:func:`bigalign.execution.pairing.fit_record`: matched and unmatched counts, duplicates,
        sample, seed, the SHA-256 of the fitted pairs), from which ``bigalign evaluate``
        rebuilds which matched pairs were training pairs.
    source_model, target_model : model names stamped on the transform (default: the
        stores' ``model`` attributes); ``apply`` refuses sources of another model.
    scratch : folder for the gathered pairs of a fit by id (default: the system's temporary
        folder); it needs pairs x (dA + dB) x itemsize bytes, and is removed after.
    device : "cpu" (default) or "cuda": run the block kernels on the GPU with CuPy (the same
        plan and graph; statistics equal to the CPU's within float32 GEMM round-off; see
        bigalign.execution.gpu and the README's "GPU backend"). Not part of the fingerprint: a fit
        killed on one device may resume on the other.
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
        (``checkpoint`` overrides where) so a rerun after a crash resumes. A finished
        transform of the same inputs and options there makes the call a no-op (it is
        loaded and returned); one of other inputs or options is refused unless
        ``overwrite``. Anything there that bigalign did not write is always refused.
    restart : discard recorded progress (and a finished output of the same job) and run
        anew.
    keep_checkpoint : keep the per-unit statistics after success.
    scheduler / workers / memory_limit / threads : where to run (see bigalign.execution.cluster).
    block_bytes : input bytes per task (default 64 MiB).

    Returns the fitted :class:`Transform` (also saved to ``output`` when given).
    """
    t0 = time.perf_counter()
    so = storage_options
    given = requests("fit", {"options": options, "pairing": pairing, "job": job,
                             "execution": execution}, keywords, FIT_KEYWORDS)
    fit_options, pairing, job = given["options"], given["pairing"], given["job"]
    run = replace(given["execution"], device=check_device(given["execution"].device))
    center, normalize, scale, reflection, diagnostics, precision = astuple(fit_options)
    rows, pair_by, duplicates, sample, seed = (pairing.rows, pairing.by, pairing.duplicates,
                                               pairing.sample, pairing.seed)
    overwrite, checkpoint, restart = job.overwrite, job.checkpoint, job.restart
    src_url, src_ids, src_model = store_parts(source, so)
    tgt_url, tgt_ids, tgt_model = store_parts(target, so)
    src = open_embeddings(src_url, side="source", storage_options=so,
                          check_chunks=job.check_chunks)
    tgt = open_embeddings(tgt_url, side="target", storage_options=so,
                          check_chunks=job.check_chunks)
    models = {"source_model": source_model or src_model, "target_model": target_model or tgt_model}
    if checkpoint is None and output is not None:
        checkpoint = default_checkpoint(output)
    check_disjoint({"source": source, "target": target},  # before any work on the inputs
                   {"output": output, "checkpoint": checkpoint}, so)
    by_ids = pair_by_ids(pair_by, src_ids, tgt_ids)
    if by_ids:
        if rows is not None:
            raise InputError("--rows selects row-aligned pairs; with ids use --sample")
    else:
        validate_pair(src, tgt)
        if sample is not None:
            raise InputError("--sample needs pairs by id (--pair-by ids)")
    fingerprints = {"source": src.fingerprint(), "target": tgt.fingerprint()}
    recorded = {side: dict(fp, canonical_url=canonical_url(fp["url"], so))
                for side, fp in fingerprints.items()}  # where the fit ran: for evaluate
    pairs = record = None
    if by_ids:
        joined = pairs = join(src_ids, tgt_ids, duplicates=duplicates)
        if sample is not None:
            pairs = sample_pairs(joined, int(sample), seed)
        record = fit_record(joined, pairs, duplicates, sample, seed)
        log.info("paired by id: %d pairs; %d source and %d target ids unmatched%s",
                 joined.matched, pairs.source_only, pairs.target_only,
                 f"; sampled {pairs.matched} (seed {seed})" if sample else "")
        if sample is not None and int(sample) >= joined.matched:
            log.warning("--sample %d is not fewer than the %d pairs matched by id: the fit "
                        "uses all of them and holds none out ('bigalign evaluate' of these "
                        "stores will have no held-out pairs); pass --sample below %d to "
                        "hold some out", int(sample), joined.matched, joined.matched)
        if run.scheduler or run.workers:
            log.warning("a fit by id reads its gathered pairs from local scratch: it runs "
                        "in this process, not on the cluster")
            run = replace(run, scheduler=None, workers=None, memory_limit=None)
    start, stop = (0, pairs.matched) if pairs is not None else parse_rows(rows, src.rows)
    dim_a, dim_b = src.dim, tgt.dim
    opts = FitOptions(center, normalize, scale, reflection, diagnostics,
                      precision).resolve(src.dtype, tgt.dtype)
    if not reflection and dim_a != dim_b:
        raise InputError(f"--no-reflection needs equal dimensions (a proper rotation), got "
                         f"source {dim_a} and target {dim_b}")
    gram = bool(diagnostics or dim_a > dim_b)  # dA > dB: the residual needs A^T A
    fingerprint = dict(fingerprints, rows=[start, stop],
                       options={"normalize": normalize, "gram": gram,
                                "precision": opts.precision})
    if pairs is not None:
        fingerprint["pairs"] = {"by": "ids", "duplicates": duplicates, "sample": sample,
                                "seed": seed, "matched": pairs.matched,
                                "sha256": pairs.digest()}
    _check_fit_memory(src, tgt, start, stop, opts, gram, run, fan_in)  # before any write
    if output is not None:
        node = check_replaceable(output, "output", so, kinds=TRANSFORM_KINDS)
        finished: list = []  # the finished transform, once loaded (and found intact)
        if node.kind == "transform":
            if finished_or_refuse(node, _transform_fingerprint(fingerprint, opts), output,
                                  overwrite, restart, checkpoint, so,
                                  damage=lambda: _transform_damage(output, so, finished)):
                log.warning("%s is already complete with the same inputs and options: "
                            "nothing to do", output)
                return finished[0]
        elif node.kind == "partial-transform" and not (overwrite or restart or
                                                       Job(checkpoint, so).exists()):
            raise InputError(f"output {output!r} is an unfinished transform with no recorded "
                             "progress; pass --overwrite to replace it")
    with gathered(pairs, src, tgt, pairing.scratch,
                  normalize=opts.precision if opts.normalize else None) as (src, tgt):
        return _fit_job(_FitJob(src, tgt, start, stop, opts, gram, fingerprint, recorded,
                                models, record, output, checkpoint, replace(job, checkpoint=
                                                                            checkpoint),
                                run, fan_in, so, t0))


def _check_fit_memory(src, tgt, start, stop, opts, gram, run, fan_in) -> None:
    """Refuse a fit whose planned memory per task (:func:`fit_task_bytes` of its plan: a
    read, and ``fan_in`` + 3 float64 d x d partials) exceeds what a task has where it runs
    (:meth:`Execution.check_memory`), or whose last merge and solve in this process
    (``estimate_fit``'s "client" figure) exceed this machine's: at d = 100,000 a task
    needs ~1.1 TiB, and such a fit failed partway with a MemoryError."""
    from ..planning.plan import partial_bytes

    dims, items = (src.dim, tgt.dim), (src.dtype.itemsize, tgt.dtype.itemsize)
    plan = make_fit_plan(start, stop, (src.row_step, tgt.row_step), dims, items, gram,
                         run.block_bytes, read_steps=(getattr(src, "read_step", src.row_step),
                                                      getattr(tgt, "read_step", tgt.row_step)))
    need = fit_task_bytes(plan.rows_per_read, *dims, *items, np.dtype(opts.precision).itemsize,
                          gram, fan_in or plan.fan_in)
    client = ((fan_in or plan.fan_in) + 3) * partial_bytes(*dims, gram) + \
        24 * dims[0] * dims[1]
    run.check_memory(
        f"a fit of {dims[0]:,} -> {dims[1]:,} dims", need,
        "its float64 d x d partial sums dominate (" + (
            "--no-diagnostics leaves out the Gram matrices, " if gram and dims[0] <= dims[1]
            else "") + "fewer dimensions need quadratically less); run it on workers with "
        "more memory (--scheduler, or --workers N --memory-limit SIZE); 'bigalign plan fit' "
        "shows the sizes", client=client)


def _transform_damage(output, so, loaded: list) -> Optional[str]:
    """What the finished transform at ``output`` lost (:meth:`Transform.load` checks its
    digest), or None, appending it to ``loaded`` when intact."""
    try:
        loaded.append(Transform.load(output, storage_options=so))
    except DamagedOutputError as e:
        return e.lost
    return None


@dataclass(frozen=True)
class _FitJob:
    """What the checkpointed fit of rows [start, stop) of two row-aligned inputs needs:
    the inputs (:class:`EmbeddingArray`, or gathered pairs), the resolved ``opts``, whether
    the Gram matrices are kept, the job's ``fingerprint``, the inputs as recorded in the
    transform (``fingerprints``), the model stamps, the pairing record of a fit by id (its
    ``metadata["pairs"]``), where it goes (``output``, ``checkpoint``), the job protocol,
    where it runs, the merge trees' ``fan_in``, the storage options and the start time."""

    src: Any
    tgt: Any
    start: int
    stop: int
    opts: FitOptions
    gram: bool
    fingerprint: dict
    fingerprints: dict
    models: dict
    pairing: Optional[dict]
    output: Optional[str]
    checkpoint: Optional[str]
    job: JobOptions
    run: Execution
    fan_in: Optional[int]
    so: Optional[dict]
    t0: float


def _fit_job(r: _FitJob) -> Transform:
    """The checkpointed fit described by ``r`` (:class:`_FitJob`)."""
    src, tgt, start, stop, opts, gram = r.src, r.tgt, r.start, r.stop, r.opts, r.gram
    fingerprint, output, checkpoint, run, fan_in, so = (r.fingerprint, r.output, r.checkpoint,
                                                         r.run, r.fan_in, r.so)
    dim_a, dim_b = src.dim, tgt.dim
    plan = make_fit_plan(start, stop, (src.row_step, tgt.row_step), (dim_a, dim_b),
                         (src.dtype.itemsize, tgt.dtype.itemsize), gram, run.block_bytes,
                         read_steps=(getattr(src, "read_step", src.row_step),
                                     getattr(tgt, "read_step", tgt.row_step)))
    if not plan.aligned:
        log.warning("source and target chunkings (%d and %d rows) share no small common "
                    "multiple: target chunks on task boundaries are read twice",
                    src.row_step, tgt.row_step)
    with checkpointed(checkpoint, "fit", fingerprint, asdict(plan), storage_options=so,
                      restart=r.job.restart, replace=r.job.overwrite,
                      keep=r.job.keep_checkpoint,
                      lease_url=None if output is None else lease_home(output),
                      output=None if output is None else canonical_url(output, so)) \
            as (job, manifest):
        plan = FitPlan(**manifest["plan"])
        units = plan.units()
        done = job.done_units(plan.unit_rows()) if job else set()
        if done:
            log.warning("resuming: %d of %d units done", len(done), len(units))
        mb = fit_task_bytes(plan.rows_per_read, dim_a, dim_b, src.dtype.itemsize,
                            tgt.dtype.itemsize, np.dtype(opts.precision).itemsize, gram,
                            fan_in or plan.fan_in) / 2**20
        log.info("fit: %d pairs of %d -> %d dims in %d tasks (~%.0f MB per thread)%s",
                 stop - start, dim_a, dim_b, len(plan.blocks()), mb,
                 f", progress saved in {len(units)} units" if job else "")
        graph, key, tasks = fit_graph(src, tgt, plan, done=done, job=job,
                                      normalize=opts.normalize, gram=gram,
                                      dtype=opts.precision, fan_in=fan_in, device=run.device,
                                      run_id=manifest["run_id"])
        with session(**run.session_args()) as s:
            moments = s.get(graph, key)
        if moments.n != stop - start:  # verify before anything is marked finished
            raise CheckpointError(f"the merged statistics hold {moments.n} pairs for "
                                  f"{stop - start} rows; rerun with --restart")
        seconds = time.perf_counter() - r.t0
        transform = _solve(moments, (dim_a, dim_b), r.fingerprints, start, stop, opts, gram)
        solve_seconds = time.perf_counter() - r.t0 - seconds
        transform.metadata.update({k: v for k, v in r.models.items() if v})
        if r.pairing is not None:
            transform.metadata["pairs"] = r.pairing
        computed = sum(b - a for u, (a, b) in plan.unit_rows().items() if u not in done)
        transform.metadata["run"] = {  # the rate counts rows read by this run only
            "seconds": seconds, "rows": computed,
            "rows_per_second": computed / seconds if computed else None,
            "solve_seconds": solve_seconds,  # the SVD (and diagnostics), on this node
            "tasks": tasks, "units": len(units), "units_resumed": len(done),
            "device": run.device}
        transform.metadata["job"] = {"run_id": manifest["run_id"],
                                     "fingerprint": _transform_fingerprint(fingerprint, opts)}
        faults.point("fit.solved")
        if output is not None:
            if job is not None:
                job.check_fence()
            transform.save(output, overwrite=True, storage_options=so)
            log.info("saved transform to %s", output)
            faults.point("fit.saved")
    return transform


def _transform_fingerprint(fingerprint: dict, opts: FitOptions) -> dict:
    """A finished transform's identity: the job's fingerprint plus every fit option (the
    solve-time ones too: a finished transform is the same job only if they match)."""
    return dict(fingerprint, options=dict(fingerprint["options"], **opts.as_dict()))


def _solve(moments, dims, inputs: dict, start, stop, opts: FitOptions, gram: bool) -> Transform:
    sol = procrustes(moments, center=opts.center, scale=opts.scale,
                     reflection=opts.reflection)
    dim_a, dim_b = dims
    meta = {
        "n_pairs": int(moments.n), "dims": [dim_a, dim_b], "rows": [start, stop],
        "residual": sol.residual, "relative_residual": sol.relative_residual,
        "target_energy": sol.target_energy, "rank": sol.rank,
        "singular_values": {"max": float(np.abs(sol.singular_values).max()),
                            "min": float(np.abs(sol.singular_values).min()),
                            "sum": float(sol.singular_values.sum())},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bigalign_version": __version__,
        "inputs": inputs,
    }
    if sol.residual is not None:
        meta["residual_error"] = sol.residual_error  # round-off bound of the residual
    if gram:  # the paper's numbers, each with the interval its round-off allows
        same = not opts.scale and opts.reflection  # then sol is the diagnostics' solution
        meta["discrepancy"] = fit_diagnostics(moments, center=opts.center,
                                              solution=sol if same else None)
    options = {"center": opts.center, "normalize": opts.normalize, "scale": opts.scale,
               "reflection": opts.reflection, "rows": [start, stop],
               "precision": opts.precision, "diagnostics": gram}
    zeros = np.zeros
    return Transform(sol.rotation,
                     moments.mean_a.copy() if opts.center else zeros(dim_a),
                     moments.mean_b.copy() if opts.center else zeros(dim_b),
                     sol.scale, options, meta, sol.singular_values, moments)


def run_status(path, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Progress of a fit or apply in flight (or interrupted), from storage alone: ``path`` is
    the run's output (transform or apply output) or its checkpoint URL. Returns
    {kind, units_done, units_total, rows_done, rows_total, rows_per_second, eta_seconds,
    running, checkpoint} or None when no progress is recorded there."""
    for url in (str(path), default_checkpoint(path)):
        summary = Job(url, storage_options).summary()
        if summary is not None:
            return dict(summary, checkpoint=url)
    return None


def output_status(output, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The ``bigalign`` attribute of an apply output (a bare array, or an embedding store
    written by apply): {"complete": bool, ...}, or None when there is no such output at
    ``output``. Storage that does not answer raises (a transient error: "nothing there"
    would be a lie)."""
    import zarr

    from ..errors import is_transient

    try:
        node = zarr.open(output, mode="r", storage_options=options_for(output, storage_options))
    except Exception as e:
        if is_transient(e):
            raise
        return None
    attrs = node.attrs.get("bigalign")
    if not isinstance(attrs, dict) or not attrs:
        return None
    if isinstance(node, zarr.Group) and attrs.get("made_by") != "apply":
        return None
    if isinstance(node, zarr.Array) and "complete" not in attrs:  # demo data (outputs.inspect)
        return None
    return dict(attrs)


def output_damage(path, storage_options: Optional[dict] = None) -> Optional[str]:
    """What a finished bigalign output at ``path`` has lost since it was marked complete,
    in words (``"1 of 5 files listed in its manifest are missing or changed (first:
    part-00003.parquet, missing)"``), or None: intact, unfinished, or not an output. A rerun
    of the job that wrote it refuses it (DamagedOutputError, exit 2) unless --overwrite;
    ``info`` and ``status`` report it (exit 3). Cost: a Parquet export, one listing of its
    folder; an apply output or embedding store, one listing of its arrays' chunk (shard)
    objects; a transform, reading it (its SHA-256 is checked)."""
    from .parquet_export import export_damage, export_manifest
    from ..storage.outputs import inspect

    so = storage_options
    export = export_manifest(path, so)
    if export is not None:
        return export_damage(path, export, so) if export.get("complete") else None
    node = inspect(path, so)
    if node.kind == "transform":
        return _transform_damage(path, so, [])
    if node.complete:  # an apply output or embedding store marked complete
        return chunks_damage(path, so)
    return None


#: apply()'s flat keywords (the command line's flags), by the options object each sets
APPLY_KEYWORDS = {"options": keywords_of(ApplyOptions),
                  "job": keywords_of(JobOptions),
                  "execution": keywords_of(Execution)}


def apply(transform: Union[Transform, str], source, output: str,
          options: Optional[ApplyOptions] = None, *, job: Optional[JobOptions] = None,
          execution: Optional[Execution] = None, storage_options: Optional[dict] = None,
          rows=None, allow_model_mismatch: bool = False, **keywords) -> RunReport:
    """Map every row of ``source`` (N, dA) with ``transform`` into ``output`` (N, dB):
    ``y = (x - source_mean) * scale @ rotation + target_mean``.

    As for :func:`fit`, what to write, the job protocol and where it runs are options
    objects: ``options`` (:class:`ApplyOptions`: dtype, renormalize, target_centred,
    compression, chunk_rows, bad_rows), ``job`` (:class:`JobOptions`) and ``execution``
    (:class:`Execution`), or their fields as flat keywords, each mirroring the ``bigalign
    apply`` flag of the same name; errors name the flags.

    What ``output`` is depends on the source:

    - a source *embedding store* (a Zarr group holding ``embeddings``, imported by
      bigalign or made by a user) gives an embedding store (``made_by: "apply"``):
      ``OUTPUT/embeddings`` (N, dB) the mapped vectors, ``OUTPUT/ids`` (N,) int64 or
      string, the source's ids of the mapped rows (a source without ids: its row
      numbers, stored only when ``rows`` starts past row 0, where they stop being the
      output's row numbers), and the ``model`` attribute, the transform's target model
      (when it records one). Commands that take stores (fit, sample, realign) read it
      like an imported store, once complete; those that take arrays take
      ``OUTPUT/embeddings``;
    - a bare (N, dA) array (or ``STORE/embeddings``) gives a bare (N, dB) array, as
      before, with the target model in its ``bigalign.model`` attribute.

    The output is created from a template (row chunks as the source's, or ``chunk_rows``;
    uncompressed unless ``compression`` is "lz4" or "zstd"; ids in chunks of the same
    rows), then one task per whole-chunk region reads, maps and writes its rows (and
    ids) and records the region as done. The output's ``bigalign`` attribute says
    ``complete: true`` only after every region is verified done. A rerun after a crash
    writes only the missing regions; a rerun of a finished apply with the same inputs and
    options does nothing; other inputs or options are refused unless ``overwrite``
    (anything at ``output`` that bigalign did not write, and an imported embedding store,
    are always refused).

    dtype : output dtype, float16/float32/float64 (float64 computes in float64).
    renormalize : L2-normalise each output row.
    target_centred : leave out ``+ target_mean``: write vectors in the target's centred space
        (search them among native target vectors minus ``transform.target_mean``; with a
        large common offset in the target model this retrieves better, see README).
    checkpoint : where done-markers go (default OUTPUT.checkpoint); False records none (the
        output is still marked complete at the end, but a killed run starts over).
    restart : discard recorded progress (and a finished output of the same job) and run anew.
    bad_rows : "fail" (default) stops at the first source row holding NaN/Inf (or of zero
        norm when the transform normalises), naming it; "nan" / "zero" write NaN / zero
        rows for them and go on. Their row numbers are recorded in the output's
        ``bigalign.bad_rows`` attribute (and ``RunReport.bad_rows``). Not part of the
        fingerprint: a run stopped by a bad row resumes with ``--bad-rows nan``.
    rows : "START:STOP" or (start, stop): map only these source rows; the output then holds
        STOP - START rows (output row r is source row START + r).
    allow_model_mismatch : map a source store stamped with another model than the one the
        transform was fitted from (refused by default: same-dimension models would be mixed
        silently).
    device : "cpu" (default) or "cuda": map on the GPU with CuPy (same regions; rows equal
        to the CPU's within float32 round-off, so a resume on another device is not
        byte-identical).
    Returns a :class:`RunReport`.
    """
    t0 = time.perf_counter()
    so = storage_options
    given = requests("apply", {"options": options, "job": job, "execution": execution},
                     keywords, APPLY_KEYWORDS)
    opts, job = given["options"], given["job"]
    run = replace(given["execution"], device=check_device(given["execution"].device))
    transform_url = None if isinstance(transform, Transform) else transform
    if transform_url is not None:
        transform = Transform.load(transform_url, storage_options=so)
    src_url, src_ids, src_model = store_parts(source, so)
    as_store = is_store(source, so)
    src = open_embeddings(src_url, side="source", storage_options=so,
                          check_chunks=job.check_chunks)
    dim_a, dim_b = transform.dims
    if src.dim != dim_a:
        raise InputError(f"source {src.url!r} has dimension {src.dim} but the transform maps "
                         f"dimension {dim_a}")
    fitted_from = transform.metadata.get("source_model")
    if src_model and fitted_from and src_model != fitted_from and not allow_model_mismatch:
        raise InputError(f"source {str(source)!r} was embedded with {src_model!r}, but the "
                         f"transform maps vectors of {fitted_from!r}; mapping them would mix "
                         "two models' vectors. Pass --allow-model-mismatch if that is "
                         "really intended.")
    first, last = parse_rows(rows, src.rows)
    out_chunk, out_shard = output_layout(src.read_step, src.shard_rows, dim_b,
                                         np.dtype(opts.dtype).itemsize, opts.chunk_rows)
    opts = replace(opts, chunk_rows=out_chunk)
    ckpt = default_checkpoint(output) if job.checkpoint is None else (job.checkpoint or None)
    check_disjoint({"source": source, "transform": transform_url},
                   {"output": output, "checkpoint": ckpt}, so)
    target_model = transform.metadata.get("target_model")
    ids_kind = _output_ids_kind(src_ids, first) if as_store else None
    fingerprint = {"source": src.fingerprint(), "transform": transform.digest(),
                   "rows": [first, last],
                   "options": {k: v for k, v in opts.as_dict().items() if k != "bad_rows"}}
    if as_store:  # absent for bare outputs: their fingerprints stay as they were
        fingerprint["output"] = {"kind": STORE_KIND, "model": target_model,
                                 "ids": _ids_fingerprint(src_ids, ids_kind)}
    if _finished(output, fingerprint, job, ckpt, so):
        return RunReport(0, time.perf_counter() - t0, 0, 0, 0, last - first, True)
    row_bytes = src.row_bytes + dim_b * np.dtype(opts.dtype).itemsize
    plan = make_apply_plan(last - first, opts.chunk_rows, src.row_step, row_bytes,
                           run.block_bytes, offset=first, shard_rows=out_shard,
                           source_read_step=src.read_step)
    if not plan.aligned:
        why = (f"--rows starts at row {first}, inside a source chunk of {src.row_step} rows"
               if first % src.row_step else
               f"source chunks ({src.row_step} rows) and output chunks ({opts.chunk_rows} "
               "rows) share no small common multiple")
        log.warning("%s: some source chunks are read twice", why)
    return _apply_job(_ApplyJob(transform, src, src_ids, source, output, opts, plan,
                                out_shard, as_store, ids_kind, target_model, fingerprint, ckpt,
                                job, run, so, t0))


def _finished(output, fingerprint: dict, job: JobOptions, ckpt, so) -> bool:
    """Whether an apply output at ``output`` is this very job, finished and intact (the run
    is then a no-op); refuses another job's finished output (unless --overwrite) and an
    unfinished one with no recorded progress (:func:`finished_or_refuse`)."""
    node = check_replaceable(output, "output", so, kinds=APPLY_KINDS)
    if node.kind in APPLY_KINDS and node.complete:
        if finished_or_refuse(node, fingerprint, output, job.overwrite, job.restart, ckpt, so,
                              damage=lambda: chunks_damage(output, so)):
            log.warning("%s is already complete with the same inputs and options: nothing "
                        "to do", output)
            return True
    elif node.kind in APPLY_KINDS and not (job.overwrite or job.restart or
                                           (ckpt and Job(ckpt, so).exists())):
        raise InputError(f"output {output!r} exists, is incomplete and has no recorded "
                         "progress; pass --overwrite to write it again")
    return False


@dataclass(frozen=True)
class _ApplyJob:
    """What the region job of an apply needs: the transform, the source (its ids, and as
    given), the output, the resolved options and plan, the output's shard rows, whether it
    is a store (with ids of ``ids_kind``, stamped with ``target_model``), the job's
    fingerprint and checkpoint, the job protocol, where it runs, storage options, start."""

    transform: Transform
    src: Any
    src_ids: Any
    source: Any
    output: str
    opts: ApplyOptions
    plan: ApplyPlan
    out_shard: Optional[int]
    as_store: bool
    ids_kind: Optional[str]
    target_model: Optional[str]
    fingerprint: dict
    ckpt: Optional[str]
    job: JobOptions
    run: Execution
    so: Optional[dict]
    t0: float


def _apply_job(r: _ApplyJob) -> RunReport:
    """The output-owned region job of an apply (:mod:`bigalign.storage.output_job`)."""
    transform, src, src_ids, source, output = r.transform, r.src, r.src_ids, r.source, r.output
    opts, plan, run, so, t0 = r.opts, r.plan, r.run, r.so, r.t0
    fingerprint, ckpt, as_store, ids_kind = r.fingerprint, r.ckpt, r.as_store, r.ids_kind
    out_shard, target_model = r.out_shard, r.target_model
    dim_a, dim_b = transform.dims
    first, last = fingerprint["rows"]
    renormalize, bad_rows, target_centred = opts.renormalize, opts.bad_rows, opts.target_centred
    overwrite, restart = r.job.overwrite, r.job.restart
    layout = _OutputLayout(plan.rows, dim_b, opts, out_shard, as_store, ids_kind)
    target = _ApplyTarget(output, layout, target_model, so, {
        "transform": fingerprint["transform"], "source": str(source) if as_store else src.url,
        "source_rows": [first, last], "target_centred": target_centred})
    with output_job(target, ckpt, "apply", fingerprint, asdict(plan), storage_options=so,
                    restart=restart, replace=overwrite) as run_:
        plan = ApplyPlan(**run_.manifest["plan"])
        blocks, expected = plan.blocks(), plan.region_rows()
        faults.point("apply.begun")
        handle, done = run_.open(expected)
        out_node, out, out_ids = handle
        params = (transform.matrix(opts.dtype), transform.source_mean,
                  transform.output_mean(target_centred), str(output))
        graph, key, tasks = apply_graph(src, out, params, blocks, done=done, job=run_.job,
                                        dtype=opts.dtype, renormalize=renormalize,
                                        normalize=transform.normalize, bad_rows=bad_rows,
                                        offset=plan.offset, device=run.device,
                                        layout=plan.layout(), run_id=run_.run_id,
                                        ids=None if out_ids is None else (src_ids, out_ids))
        _, per_write, _, per_read = plan.layout()
        mb = apply_task_bytes(per_read, dim_a, dim_b, src.dtype.itemsize,
                              np.dtype(opts.dtype).itemsize, per_write,
                              out_shard is not None) / 2**20
        log.info("apply: %d rows of %d -> %d dims in %d tasks (~%.0f MB per thread)",
                 plan.rows, dim_a, dim_b, tasks, mb)
        with session(**run.session_args()) as s:
            written, bad = s.get(graph, key)
        seconds = time.perf_counter() - t0
        faults.point("apply.before-complete")
        markers = run_.markers(expected)  # verify, then complete (RegionRun.finish)
        if run_.job.progress:  # the bad rows of earlier runs count too
            bad = sorted(i for m in markers.values() for i in m.get("bad_rows", []))
        if bad:
            log.warning("%d source rows held NaN/Inf%s: written as %s rows (first: %s); "
                        "their numbers are in the output's bigalign.bad_rows attribute",
                        len(bad), " or zero norms" if transform.normalize else "",
                        "NaN" if bad_rows == "nan" else "zero", bad[:5])
        run_.finish(handle, expected, dict(
            complete=True, rows=plan.rows, seconds=seconds,
            bad_rows={"policy": bad_rows, "count": len(bad), "rows": bad[:MAX_BAD_ROWS_LISTED]},
            job={"run_id": run_.run_id, "fingerprint": fingerprint},
            completed=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return RunReport(int(written), seconds, tasks, len(blocks), len(done), plan.rows,
                     bad_rows=bad)



def _output_ids_kind(source_ids, first: int) -> Optional[str]:
    """Ids kind of an output store: the source's ("int64" or "string"); for a source
    without ids, int64 row numbers when the output starts past source row 0 (they are
    then no longer the output's row numbers), else none (row numbers are the ids)."""
    if source_ids is not None:
        return ids_kind_of(source_ids.dtype)
    return "int64" if first else None


def _ids_fingerprint(source_ids, ids_kind: Optional[str]):
    """What identifies the ids an output store copies: the source ids' dtype, shape,
    chunks and content witness; "row numbers" or None for a source without ids."""
    if source_ids is None:
        return "row numbers" if ids_kind else None
    return {"dtype": str(source_ids.dtype), "shape": list(source_ids.shape),
            "chunks": list(source_ids.chunks), "content": content_witness(source_ids)}


@dataclass(frozen=True)
class _OutputLayout:
    """What an apply's output must look like: (rows, dim) of ``opts.dtype`` in chunks of
    ``opts.chunk_rows`` rows (shards of ``shard_rows``), and, when ``store``, an
    embedding store with ids of ``ids_kind`` (or none) in chunks of the shard (or chunk)
    rows."""

    rows: int
    dim: int
    opts: ApplyOptions
    shard_rows: Optional[int]
    store: bool
    ids_kind: Optional[str]

    def fits(self, embeddings, ids) -> bool:
        """Whether existing output arrays have exactly this layout."""
        shards = getattr(embeddings, "shards", None)
        if tuple(embeddings.shape) != (self.rows, self.dim) or \
                tuple(embeddings.chunks) != (self.opts.chunk_rows, self.dim) or \
                (tuple(shards) if shards else None) != \
                ((self.shard_rows, self.dim) if self.shard_rows else None) or \
                np.dtype(embeddings.dtype) != np.dtype(self.opts.dtype):
            return False
        if (ids is None) != (self.ids_kind is None):
            return False
        return ids is None or (tuple(ids.chunks) == (self.shard_rows or self.opts.chunk_rows,)
                               and ids_kind_of(ids.dtype) == self.ids_kind)


class _ApplyTarget(ZarrTarget):
    """An apply output as the region job writes it (:mod:`bigalign.storage.output_job`):
    a bare array or an embedding store of ``layout``, stamped with the run id and
    ``attributes`` (its ``bigalign`` attribute) and the target ``model``."""

    def __init__(self, output, layout: _OutputLayout, model: Optional[str], so,
                 attributes: dict):
        super().__init__(output, so)
        self.layout, self.model, self.attributes = layout, model, attributes

    def of_run(self, run_id: str) -> Optional[tuple]:
        return classify(f"output {self.url!r}",
                        lambda: _output_of_run(self.url, run_id, self.layout,
                                               self.storage_options))

    def create(self, run_id: str) -> tuple:
        return _create_output(self.url, self.layout, self.model, self.storage_options,
                              dict(self.attributes, run_id=run_id))


def _create_output(output, layout: _OutputLayout, model: Optional[str], so,
                   attributes: dict) -> tuple:
    """Create the empty output (replacing what is there: the caller checked it may), with
    ``attributes`` in its ``bigalign`` attribute (``complete`` false). Returns (node
    holding the attribute, embeddings, ids or None): a store's group and arrays, or a
    bare array (twice) and None."""
    opts = layout.opts
    if layout.store:
        create_store(output, rows=layout.rows, dim=layout.dim, dtype=opts.dtype,
                     chunk_rows=opts.chunk_rows, ids_kind=layout.ids_kind, model=model,
                     attributes=dict(attributes, made_by="apply"),
                     compression=opts.compression, storage_options=so,
                     shard_rows=layout.shard_rows)
        return open_for_writing(output, storage_options=so)
    arr = create_output(output, rows=layout.rows, dim=layout.dim, chunk_rows=opts.chunk_rows,
                        dtype=opts.dtype, compression=opts.compression, overwrite=True,
                        storage_options=so, shard_rows=layout.shard_rows,
                        attributes={"bigalign": dict(attributes, complete=False,
                                                     model=model)})
    return arr, arr, None


def _output_of_run(output, run_id: str, layout: _OutputLayout, so) -> Optional[tuple]:
    """(node, embeddings, ids or None) of the existing output when it was created by run
    ``run_id`` with the expected layout (a resume may write into it); None otherwise.
    Raises when it cannot be opened (:func:`bigalign.storage.output_job.classify` tells
    "absent" from "storage did not answer")."""
    import zarr

    if layout.store:
        node, emb, ids = open_for_writing(output, storage_options=so)
    else:
        node = emb = zarr.open_array(output, mode="r+", storage_options=options_for(output, so),
                                     config={"write_empty_chunks": True})
        ids = None
    attrs = node.attrs.get("bigalign") or {}
    if attrs.get("run_id") != run_id or attrs.get("complete") or \
            (layout.store and attrs.get("made_by") != "apply"):
        return None
    if not layout.fits(emb, ids):
        log.warning("the output %s does not have the shape, chunks or dtype this run "
                    "planned: re-creating it", output)
        return None
    return node, emb, ids
