"""``bigalign.fit``: an orthogonal map from paired rows, in one streaming pass.

    >>> t = bigalign.fit("old.zarr", "new.zarr", center=True, output="old2new.transform")

A checkpointed job (:func:`bigalign.storage.job.checkpointed`) of per-unit float64
statistics, merged by fixed trees, then one small SVD on this node
(:func:`bigalign.maths.solve.procrustes`). Inputs are checked against outputs under every
spelling (:mod:`bigalign.storage.locations`), an output is replaced only when bigalign wrote
it (:mod:`bigalign.storage.outputs`), a finished job rerun with the same inputs and options
is a no-op, and a changed one is refused naming what changed.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..errors import CheckpointError, DamagedOutputError, InputError
from .. import faults
from ..execution.graph import task_count
from ..words import counted
from ..execution.cluster import session
from ..execution.devices import check_device
from ..execution.engine import fit_graph
from ..execution.pairing import fit_record, gathered, join, pair_by_ids, sample_pairs
from ..maths.metrics import fit_diagnostics
from ..maths.adapters import solve as solve_adapter
from ..maths.families import ORTHOGONAL
from ..maths.solve import NotUniqueWarning, procrustes
from ..options import Execution, FitOptions, JobOptions, Pairing, keywords_of, requests
from ..planning.plan import FitPlan, fit_task_bytes, make_fit_plan
from ..storage.job import (Job, checkpointed, default_checkpoint, finished_or_refuse,
                                  lease_home)
from ..storage.embedding_store import store_parts
from ..storage.in_memory import InMemoryRows, adapt
from ..storage.locations import canonical_url, check_disjoint
from ..storage.outputs import TRANSFORM_KINDS, check_replaceable
from ..storage.stores import open_embeddings, parse_rows
from ..transform import Transform
from ..planning.holdout import MIN_PAIRS as MIN_HOLDOUT_PAIRS
from .select import Selection, select

log = logging.getLogger("bigalign")

__all__ = ["fit", "FIT_KEYWORDS"]


#: fit()'s flat keywords (the command line's flags), by the options object each sets
FIT_KEYWORDS = {"options": keywords_of(FitOptions),
                "pairing": keywords_of(Pairing, pair_by="by"),
                "job": keywords_of(JobOptions),
                "execution": keywords_of(Execution)}


# Over 80 lines by its docstring only, which documents every keyword (the code is ~78).
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
    objects (:mod:`bigalign.options`), each validated when built: ``options``
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
    normalize, reflection, diagnostics = (fit_options.normalize, fit_options.reflection,
                                          fit_options.diagnostics)
    rows, pair_by, duplicates, sample, seed = (pairing.rows, pairing.by, pairing.duplicates,
                                               pairing.sample, pairing.seed)
    checkpoint = job.checkpoint
    source, target = adapt(source, "source"), adapt(target, "target")  # numpy / Dask arrays
    if isinstance(source, InMemoryRows) or isinstance(target, InMemoryRows):
        run = _in_this_process(run)
    src_url, src_ids, src_model = store_parts(source, so)
    tgt_url, tgt_ids, tgt_model = store_parts(target, so)
    src = open_embeddings(src_url, side="source", storage_options=so,
                          check_chunks=job.check_chunks)
    tgt = open_embeddings(tgt_url, side="target", storage_options=so,
                          check_chunks=job.check_chunks)
    models = {"source_model": source_model or src_model, "target_model": target_model or tgt_model}
    _warn_mapped(source, target, models, so)
    if checkpoint is None and output is not None:
        checkpoint = default_checkpoint(output)
    check_disjoint({"source": source, "target": target},  # before any work on the inputs
                   {"output": output, "checkpoint": checkpoint}, so)
    by_ids = pair_by_ids(pair_by, src_ids, tgt_ids)
    if by_ids:
        if rows is not None and sample is not None:
            raise InputError("--rows (a contiguous split of the matched pairs) and --sample "
                             "(a random one) both choose the training pairs: give one")
    else:
        if rows is None or src.rows == tgt.rows:
            _check_lengths(src, tgt)
        if sample is not None:
            raise InputError("--sample needs pairs by id (--pair-by ids)")
    fingerprints = {"source": src.fingerprint(), "target": tgt.fingerprint()}
    recorded = {side: dict(fp, canonical_url=canonical_url(fp["url"], so))
                for side, fp in fingerprints.items()}  # where the fit ran: for evaluate
    pairs = record = None
    if by_ids:
        pairs, record = _pairs_by_id(src_ids, tgt_ids, pairing)
        run = _in_this_process(run)
    start, stop = (0, pairs.matched) if pairs is not None else \
        parse_rows(rows, min(src.rows, tgt.rows))
    if fit_options.needs_holdout and stop - start < MIN_HOLDOUT_PAIRS:
        raise InputError(f"--method {fit_options.method}"
                         + (" without its parameter" if fit_options.method != "auto" else "")
                         + f" holds pairs out to choose, and {stop - start} pairs are too few "
                         f"(at least {MIN_HOLDOUT_PAIRS}): give more pairs, or the family and "
                         "its parameter (--method orthogonal, --ridge, --rank)")
    dim_a, dim_b = src.dim, tgt.dim
    opts = fit_options.resolve(src.dtype, tgt.dtype)
    if not reflection and dim_a != dim_b:
        raise InputError(f"--no-reflection needs equal dimensions (a proper rotation), got "
                         f"source {dim_a} and target {dim_b}")
    gram = bool(diagnostics or dim_a > dim_b)  # dA > dB: the residual needs A^T A
    fingerprint = dict(fingerprints, rows=[start, stop],
                       options={"normalize": normalize, "gram": gram,
                                "precision": opts.precision})
    if opts.needs_holdout:  # which pairs are held out to choose
        fingerprint["selection_seed"] = seed
    if pairs is not None:
        fingerprint["pairs"] = {"by": "ids", "duplicates": duplicates, "sample": sample,
                                "seed": seed, "matched": pairs.matched,
                                "sha256": pairs.digest()}
    _check_fit_memory(src, tgt, start, stop, opts, gram, run, fan_in)  # before any write
    if output is not None:
        finished = _finished(output, _transform_fingerprint(fingerprint, opts), job,
                             checkpoint, so)
        if finished is not None:
            return finished
    with gathered(pairs, src, tgt, pairing.scratch,
                  normalize=opts.precision if opts.normalize else None) as (src, tgt):
        return _fit_job(_FitJob(src, tgt, start, stop, opts, gram, fingerprint, recorded,
                                models, record, output, checkpoint, replace(job, checkpoint=
                                                                            checkpoint),
                                run, fan_in, so, t0, seed))


def _check_lengths(src, tgt) -> None:
    """Row-aligned inputs of different lengths need the rows to pair (``--rows``)."""
    if src.rows != tgt.rows:
        n = min(src.rows, tgt.rows)
        raise InputError(f"source has {src.rows:,} rows but target has {tgt.rows:,}: row i "
                         f"pairs with row i, so say which rows to fit on (--rows 0:{n} pairs "
                         "every row the two have in common), or pair stores by id")


def _warn_mapped(source, target, models: dict, so) -> None:
    """Warn when a side of the fit holds mapped vectors (an apply's output, or a store
    imported from its export: :mod:`bigalign.storage.provenance`), not native ones: a
    target of mapped vectors teaches the new map to imitate the old one."""
    from ..storage.provenance import mapped_of, not_native

    for side, data in (("source", source), ("target", target)):
        record = mapped_of(data, so)
        if record is None:
            continue
        model = models[f"{side}_model"] or record.get("to_model")
        expected = f"vectors embedded with {model}" if model else "native vectors"
        why = ("a map fitted to them learns to imitate that transform, not the model: fit "
               "to the model's own vectors") if side == "target" else \
            "the fitted map will apply to such mapped vectors, not to a model's own"
        log.warning("%s; %s", not_native(record, f"{side} {str(data)!r}", expected), why)


def _in_this_process(run: Execution) -> Execution:
    """``run`` without a cluster: in-memory rows (numpy, Dask, gathered pairs) live in this
    process, so the job runs here (a warning says so when a cluster was asked for)."""
    if run.scheduler or run.workers:
        log.warning("in-memory inputs (numpy or Dask arrays, or pairs gathered by id) are "
                    "read in this process: the job runs here, not on the cluster")
    return replace(run, scheduler=None, workers=None, memory_limit=None)


def _pairs_by_id(src_ids, tgt_ids, pairing: Pairing) -> tuple:
    """(the pairs to fit, their record for the transform's metadata): the id join of the
    two inputs (:func:`bigalign.execution.pairing.join`), sampled when ``pairing.sample``
    says so, with what was matched logged."""
    duplicates, sample, seed = pairing.duplicates, pairing.sample, pairing.seed
    joined = pairs = join(src_ids, tgt_ids, duplicates=duplicates)
    rows = None
    if pairing.rows is not None:  # positions in the matched pairs (sorted by source row)
        rows = parse_rows(pairing.rows, joined.matched)
        pairs = joined.take(np.arange(*rows, dtype=np.int64))
    elif sample is not None:
        pairs = sample_pairs(joined, int(sample), seed)
    log.info("paired by id: %d pairs; %d source and %d target ids unmatched%s",
             joined.matched, pairs.source_only, pairs.target_only,
             f"; sampled {pairs.matched} (seed {seed})" if sample else "")
    if sample is not None and int(sample) >= joined.matched:
        log.warning("--sample %d is not fewer than the %d pairs matched by id: the fit "
                    "uses all of them and holds none out ('bigalign evaluate' of these "
                    "stores will have no held-out pairs); pass --sample below %d to "
                    "hold some out", int(sample), joined.matched, joined.matched)
    return pairs, fit_record(joined, pairs, duplicates, sample, seed, rows)


def _finished(output, fingerprint: dict, job: JobOptions, checkpoint, so):
    """The finished, intact transform at ``output`` when it is this very job (the fit is
    then a no-op), else None; refuses another job's transform (unless --overwrite) and an
    unfinished one with no recorded progress (:func:`finished_or_refuse`)."""
    node = check_replaceable(output, "output", so, kinds=TRANSFORM_KINDS)
    finished: list = []  # the finished transform, once loaded (and found intact)
    if node.kind == "transform":
        if finished_or_refuse(node, fingerprint, output, job.overwrite, job.restart,
                              checkpoint, so,
                              damage=lambda: _transform_damage(output, so, finished)):
            log.warning("%s is already complete with the same inputs and options: "
                        "nothing to do", output)
            return finished[0]
    elif node.kind == "partial-transform" and not (job.overwrite or job.restart or
                                                   Job(checkpoint, so).exists()):
        raise InputError(f"output {output!r} is an unfinished transform with no recorded "
                         "progress; pass --overwrite to replace it")
    return None


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
    seed: int = 0  # of the held-out windows (method auto; ridge / rank to choose)


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
            log.warning("resuming: %d of %s done", len(done), counted(len(units), "unit"))
        mb = fit_task_bytes(plan.rows_per_read, dim_a, dim_b, src.dtype.itemsize,
                            tgt.dtype.itemsize, np.dtype(opts.precision).itemsize, gram,
                            fan_in or plan.fan_in) / 2**20
        graph, key, tasks = fit_graph(src, tgt, plan, done=done, job=job,
                                      normalize=opts.normalize, gram=gram,
                                      dtype=opts.precision, fan_in=fan_in, device=run.device,
                                      run_id=manifest["run_id"])
        log.info("fit: %d pairs of %d -> %d dims in %s (%s, ~%.0f MB per thread)%s",
                 stop - start, dim_a, dim_b, counted(task_count(graph), "task"),
                 counted(len(plan.blocks()), "reading block"), mb,
                 f", progress saved in {counted(len(units), 'unit')}" if job else "")
        with session(**run.session_args()) as s:
            moments = s.get(graph, key)
        if moments.n != stop - start:  # verify before anything is marked finished
            raise CheckpointError(f"the merged statistics hold {moments.n} pairs for "
                                  f"{stop - start} rows; rerun with --restart")
        seconds = time.perf_counter() - r.t0
        selection = select(moments, src, tgt, start, stop, opts, r.seed) \
            if opts.needs_holdout else None
        transform = _solve(moments, (dim_a, dim_b), r.fingerprints, start, stop, opts, gram,
                           selection)
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
    """A finished transform's identity: the job's fingerprint plus every fit option that
    changes the result (the solve-time ones too: a finished transform is the same job only
    if they match; how auto chooses only counts when the fit holds pairs out to choose)."""
    options = opts.as_dict()
    if not opts.needs_holdout:
        for key in ("holdout", "max_holdout", "select", "select_search"):
            options.pop(key)
    return dict(fingerprint, options=dict(fingerprint["options"], **options))


#: An uncentred fit warns when a side's mean carries more than this share of its energy.
MEAN_SHARE_WARN = 0.1


def mean_shares(m) -> tuple[float, float]:
    """The share of each side's energy that its mean carries: n ||mean||^2 / sum ||x_i||^2
    (source, target), from the statistics ``m``; 0 for an all-zero side."""
    qa, qb = m.raw_sq()
    na, nb = (m.n * float(v @ v) for v in (m.mean_a, m.mean_b))
    return (na / qa if qa > 0 else 0.0), (nb / qb if qb > 0 else 0.0)


def _warn_uncentred(moments) -> None:
    share_a, share_b = mean_shares(moments)
    if max(share_a, share_b) > MEAN_SHARE_WARN:
        log.warning("fitted without centring (--no-center), but the means carry %.0f%% of the "
                    "source's and %.0f%% of the target's energy: an orthogonal map cannot move "
                    "a common offset, so most of the fit aligns the means instead of the "
                    "vectors. Centring (the default) is right for nearly every real model",
                    100 * share_a, 100 * share_b)


def _solve(moments, dims, inputs: dict, start, stop, opts: FitOptions, gram: bool,
           selection: Optional[Selection] = None) -> Transform:
    """The Transform of the statistics ``moments``: the options' family (or the one
    ``selection`` chose, refitted on all pairs), with what a reader needs to trust it."""
    if not opts.center:
        _warn_uncentred(moments)
    family = opts.family if selection is None else selection.adapter.family
    if family in ORTHOGONAL:
        sol = procrustes(moments, center=opts.center, scale=family == "similarity",
                         reflection=opts.reflection)
        rotation, scale, singular, rank = sol.rotation, sol.scale, sol.singular_values, sol.rank
        residual, relative, energy = sol.residual, sol.relative_residual, sol.target_energy
    else:
        a = selection.adapter if selection is not None else solve_adapter(
            moments, family, center=opts.center, ridge=opts.ridge, rank=opts.rank)
        rotation, scale = a.matrix, 1.0
        singular = np.linalg.svd(a.matrix, compute_uv=False)
        rank = int(np.sum(singular > singular[0] * 1e-6)) if singular[0] > 0 else 0
        residual, relative, energy = a.residual, a.relative_residual, a.target_energy
        params = {k: v for k, v in a.params.items() if k in ("ridge", "rank")}
    dim_a, dim_b = dims
    meta = {
        "n_pairs": int(moments.n), "dims": [dim_a, dim_b], "rows": [start, stop],
        "family": family, "orthogonal": family in ORTHOGONAL,
        "residual": residual, "relative_residual": relative,
        "target_energy": energy, "rank": rank,
        "singular_values": {"max": float(np.abs(singular).max()),
                            "min": float(np.abs(singular).min()),
                            "sum": float(singular.sum())},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bigalign_version": __version__,
        "inputs": inputs,
    }
    if family in ORTHOGONAL:
        if sol.residual is not None:
            meta["residual_error"] = sol.residual_error  # round-off bound of the residual
        if gram:  # the paper's numbers, each with the interval its round-off allows
            same = family == "orthogonal" and opts.reflection  # sol is the diagnostics' one
            with warnings.catch_warnings():  # a rank warning: said once, by the solve above
                warnings.simplefilter("ignore", NotUniqueWarning)
                meta["discrepancy"] = fit_diagnostics(moments, center=opts.center,
                                                      solution=sol if same else None)
    else:
        meta["params"] = params
        meta["bound"] = (f"none: the paper's bound is of orthogonal maps, and this map's "
                         f"family is {family}")
    if selection is not None:
        meta["selection"] = selection.record
    options = {"center": opts.center, "normalize": opts.normalize, "scale": opts.scale,
               "reflection": opts.reflection, "rows": [start, stop],
               "precision": opts.precision, "diagnostics": gram, "method": opts.method,
               "family": family}
    if opts.method == "auto":
        options.update(select=opts.select, select_search=opts.select_search)
    zeros = np.zeros
    return Transform(rotation,
                     moments.mean_a.copy() if opts.center else zeros(dim_a),
                     moments.mean_b.copy() if opts.center else zeros(dim_b),
                     scale, options, meta, singular, moments)
