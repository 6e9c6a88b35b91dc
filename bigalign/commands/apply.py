"""``bigalign.apply``: a transform mapped over a whole corpus, region by region.

    >>> bigalign.apply("old2new.transform", "corpus_old.zarr", "corpus_in_new.zarr")

An output-owned region job (:mod:`bigalign.storage.output_job`): one task per whole-chunk
region reads, maps and writes its rows (and ids), then marks the region done; the output is
marked complete only after every region is verified. The same guarantees as
:func:`bigalign.fit` for inputs, outputs and reruns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError
from .. import faults
from ..execution.graph import task_count
from ..words import counted
from ..execution.cluster import session
from ..execution.devices import check_device
from ..execution.engine import apply_graph
from ..options import ApplyOptions, Execution, JobOptions, keywords_of, requests
from ..planning.plan import ApplyPlan, apply_task_bytes, make_apply_plan, output_layout
from ..storage.job import Job, default_checkpoint, finished_or_refuse
from ..storage.in_memory import InMemoryRows, adapt
from ..storage.embedding_store import (KIND as STORE_KIND, create_store, ids_kind_of, is_store,
                                       open_for_writing, store_parts)
from ..storage.locations import check_disjoint, options_for
from ..storage.output_job import ZarrTarget, classify, output_job
from ..storage.outputs import APPLY_KINDS, check_replaceable, chunks_damage
from ..storage.stores import content_witness, create_output, open_embeddings, parse_rows
from ..transform import Transform
from .runs import MAX_BAD_ROWS_LISTED, RunReport

log = logging.getLogger("bigalign")

__all__ = ["apply", "APPLY_KEYWORDS"]


#: apply()'s flat keywords (the command line's flags), by the options object each sets
APPLY_KEYWORDS = {"options": keywords_of(ApplyOptions),
                  "job": keywords_of(JobOptions),
                  "execution": keywords_of(Execution)}


# Over 80 lines by its docstring only, which documents every keyword (the code is ~63).
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
        silently), or a source that holds mapped vectors already (an apply's output, or a
        store imported from its export), refused by default when this transform mapped them
        already, when they are target-centred, or when the transform is not recorded as
        mapping their model's space (only warned for a deliberate chain: the inverse, or
        B -> C after A -> B). The output's ``bigalign.mapped`` attribute records what its vectors are
        (:mod:`bigalign.storage.provenance`: models, transform digest, family, centred,
        target-centred).
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
    source = adapt(source, "source")  # a numpy or Dask array: read here, in this process
    if isinstance(source, InMemoryRows) and (run.scheduler or run.workers):
        log.warning("an in-memory source (a numpy or Dask array) is read in this process: "
                    "the apply runs here, not on the cluster")
        run = replace(run, scheduler=None, workers=None, memory_limit=None)
    src_url, src_ids, src_model = store_parts(source, so)
    as_store = is_store(source, so)
    src = open_embeddings(src_url, side="source", storage_options=so,
                          check_chunks=job.check_chunks)
    dim_a, dim_b = transform.dims
    if src.dim != dim_a:
        raise InputError(f"source {src.url!r} has dimension {src.dim} but the transform maps "
                         f"dimension {dim_a}")
    mapped = _mapped_output(transform, source, opts, allow_model_mismatch, so)
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
                                job, run, so, t0, mapped))


def _mapped_output(transform: Transform, source, opts: ApplyOptions,
                   allow_model_mismatch: bool, so) -> dict:
    """The provenance record of the output (:mod:`bigalign.storage.provenance`). A source
    that holds mapped vectors already is refused unless ``allow_model_mismatch``
    (:func:`~bigalign.storage.provenance.already_mapped`: the same transform again,
    target-centred vectors, or a transform not recorded as mapping their model's space);
    a deliberate chain is warned. Either way its record is chained into the output's."""
    from ..storage.provenance import already_mapped, mapped_of, mapped_record

    before = mapped_of(source, so)
    if before is not None:
        message, refuse = already_mapped(before, f"source {str(source)!r}",
                                         transform.digest(),
                                         transform.metadata.get("source_model"))
        if refuse and not allow_model_mismatch:
            raise InputError(message)
        log.warning("%s", message.rsplit(" Pass --allow-model-mismatch", 1)[0])
    return mapped_record(transform, target_centred=opts.target_centred,
                         renormalized=opts.renormalize, chained_from=before)


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
    mapped: Optional[dict] = None


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
        "source_rows": [first, last], "target_centred": target_centred, "mapped": r.mapped})
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
        log.info("apply: %d rows of %d -> %d dims in %s (%s, ~%.0f MB per thread)",
                 plan.rows, dim_a, dim_b, counted(task_count(graph), "task"),
                 counted(tasks, "region"), mb)
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
