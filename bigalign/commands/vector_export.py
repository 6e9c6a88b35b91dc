"""What every export of an embedding store's vectors shares, whatever the format (Parquet
files: :mod:`bigalign.commands.parquet_export`; a Lance dataset:
:mod:`bigalign.commands.lance_export`): the source (:func:`open_source`), rows read as frames
of an id column and a fixed-size-list vector column with bad rows refused or left out
(:func:`read_group`), the options and the plan, the graph (one task per file), and the
job (:func:`run_export`: the plan + the checkpointed region job + the graph, in the house
style). A format is an :class:`ExportFormat`: how its folder is recognised and checked, the
region job's target, and the task that writes one file.

The plan (:class:`bigalign.planning.plan.ExportPlan`, pure) cuts the rows into files of
whole source chunks (shards when sharded) of about 256 MB (``rows_per_file``: a multiple of
the chunk rows), each read from the source ~32 MiB at a time. A task writes one file and
marks it done (after its data, fenced); the target verifies every file before the
completion mark, written last. Fault points for the crash tests, in every format:
``export.begun``, ``export.file-written`` (file in place, marker not yet),
``export.file-done``, ``export.before-complete``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import numpy as np

from ..errors import InputError, NonFiniteError
from .. import faults
from ..planning.plan import ExportPlan, export_row_bytes, make_export_plan
from ..storage.parquet_folder import BAD_ROWS  # --bad-rows choices: the one list

log = logging.getLogger("bigalign")

__all__ = ["open_source", "ids_kind", "FileSpec", "read_group", "export_graph",
           "ExportFormat", "run_export", "DTYPES", "BAD_ROWS"]

DTYPES = ("float16", "float32", "float64")

# ==== the source =============================================================================

def open_source(source, storage_options: Optional[dict] = None, check_chunks: bool = True):
    """The corpus to export: ``(embeddings, ids, model)``: a validated
    :class:`~bigalign.storage.stores.EmbeddingArray` (N, d), the ids zarr.Array (N,) or None (row
    numbers are the ids), and the model name or None. Refuses a transform, an unfinished
    store or apply output, and ids of another length or type."""
    from ..storage.embedding_store import store_parts
    from ..storage.outputs import inspect
    from ..storage.stores import open_embeddings

    node = inspect(source, storage_options)
    if node.kind in ("transform", "partial-transform"):
        raise InputError(f"{str(source)!r} is a transform, which has no vectors to write as "
                         "vectors: export it with --format npz, json or safetensors")
    if node.kind == "apply-output" and not node.complete:
        raise InputError(f"{str(source)!r} is an unfinished apply output (interrupted or "
                         "still running): rerun that apply to finish it first")
    url, ids, model = store_parts(source, storage_options)
    emb = open_embeddings(url, side="source", storage_options=storage_options,
                          check_chunks=check_chunks)
    if model is None and node.kind == "apply-output":
        model = node.attrs.get("model")
    if ids is not None:
        if tuple(ids.shape) != (emb.rows,):
            raise InputError(f"{str(source)!r}: ids have shape {tuple(ids.shape)} for "
                             f"{emb.rows} rows")
        ids_kind(ids)  # refuses other types now, not in a task
    return emb, ids, model


def ids_kind(ids) -> str:
    """"int64" or "string": how the ids array ``ids`` (or None: row numbers) is written."""
    if ids is None:
        return "int64"
    kind = np.dtype(ids.dtype).kind
    if kind in "iu":
        return "int64"
    if kind in "TUO":
        return "string"
    raise InputError(f"ids of dtype {ids.dtype} cannot be exported: ids are integers or "
                     "strings")


def _fingerprint_of(arr) -> dict:
    """What identifies an ids array for resume checks: shape, chunks, dtype, content."""
    from ..storage.stores import content_witness

    return {"shape": list(arr.shape), "chunks": list(arr.chunks), "dtype": str(arr.dtype),
            "content": content_witness(arr)}


# ==== rows -> frames (polars) ========== =====================================================

@dataclass(frozen=True)
class FileSpec:
    """How every file of one export is written: where (``url``, ``storage_options``),
    the columns (``ids_column``, ``ids``: "int64"/"string"; ``vector_column``: ``dim``
    values of ``dtype``), ``compression`` (a Parquet export's, polars' name; None for other
    formats), ``metadata`` (what each file's ``bigalign`` key, or a Lance dataset's schema,
    holds besides a file's own rows) and what to do with a bad row
    (``bad_rows``: "fail" or "skip"; ``zero_rows_bad``: an all-zero row is bad too, as in
    the output of an apply with ``--bad-rows zero``)."""

    url: str
    ids_column: str
    vector_column: str
    ids: str
    dim: int
    dtype: str
    compression: str
    metadata: dict
    storage_options: Optional[dict] = None
    bad_rows: str = "fail"
    zero_rows_bad: bool = False

    def schema(self) -> dict:
        import polars as pl

        return {self.ids_column: pl.Int64 if self.ids == "int64" else pl.String,
                self.vector_column: pl.Array(_polars_float(self.dtype), self.dim)}


def _polars_float(dtype: str):
    import polars as pl

    if dtype == "float16" and not hasattr(pl, "Float16"):
        raise InputError(f"--dtype float16 needs polars with Float16 (this is polars "
                         f"{pl.__version__}); upgrade polars or export float32")
    return {"float16": getattr(pl, "Float16", None), "float32": pl.Float32,
            "float64": pl.Float64}[dtype]


def read_group(source, ids, start: int, stop: int, spec: FileSpec):
    """Rows [start, stop) as a polars frame of ``spec``'s two columns: ids (int64, or
    strings; ``ids`` None: the row numbers) and vectors (``(stop - start, dim)`` cast to
    ``spec.dtype``), and the source numbers of the rows left out. A bad row (NaN/Inf after
    the cast; all zeros with ``spec.zero_rows_bad``) raises NonFiniteError naming it (a
    vector database cannot index it), or with ``spec.bad_rows == "skip"`` is left out."""
    import polars as pl

    from .ingest import _first_nonfinite
    from ..storage.stores import read_rows, retrying

    x = read_rows(source, start, stop)
    with np.errstate(over="ignore"):  # an overflow becomes Inf, named below
        values = x if x.dtype == np.dtype(spec.dtype) else x.astype(spec.dtype)
    keep = None
    if spec.zero_rows_bad or _first_nonfinite(values) is not None:
        bad = ~np.isfinite(values).all(axis=1)
        if spec.zero_rows_bad:
            bad |= ~values.any(axis=1)
        if bad.any() and spec.bad_rows != "skip":
            i = int(np.flatnonzero(bad)[0])
            cast = "" if x.dtype == values.dtype else \
                f" (or a value too large for {spec.dtype})"
            what = f"holds NaN or Inf{cast}" if not np.isfinite(values[i]).all() else \
                "is all zeros (the apply that wrote it made its bad rows zeros)"
            raise NonFiniteError(f"source {source.url!r} row {start + i}: the vector {what}; "
                                 "a vector database needs real vectors (--bad-rows skip "
                                 "leaves such rows out and lists them in the manifest)")
        keep = ~bad if bad.any() else None
    skipped = [] if keep is None else [start + int(i) for i in np.flatnonzero(~keep)]
    if keep is not None:
        values = values[keep]
    if ids is None:
        found = pl.Series(spec.ids_column, np.arange(start, stop, dtype=np.int64))
    else:
        raw = retrying(f"cannot read ids {start}:{stop} of {source.url!r}",
                       lambda: np.asarray(ids[start:stop]))
        found = _ids_series(raw, spec, start)
    if keep is not None:
        found = found.filter(pl.Series(keep))
    vectors = pl.Series(spec.vector_column, np.ascontiguousarray(values),
                        dtype=spec.schema()[spec.vector_column])
    return pl.DataFrame([found, vectors]), skipped


def _ids_series(raw: np.ndarray, spec: FileSpec, start: int):
    import polars as pl

    if spec.ids == "string":
        return pl.Series(spec.ids_column, raw, dtype=pl.String)
    if raw.dtype.kind == "u" and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
        row = start + int(np.argmax(raw > np.iinfo(np.int64).max))
        raise InputError(f"id of row {row} does not fit in int64")
    return pl.Series(spec.ids_column, raw.astype(np.int64, copy=False))



# ==== execution: one task per file ==========================================================

def export_graph(source, ids, plan: ExportPlan, spec: FileSpec, file_task: Callable, *,
                 done=frozenset(), job=None, run_id: str = ""):
    """Dask graph (:func:`bigalign.execution.graph.build`): one ``file_task(source, ids,
    plan, index, start, stop, spec, files, job) -> (rows written, rows left out)`` per file
    not in ``done``, and a fixed tree (fan-in COUNT_FAN_IN) summing the rows written and
    gathering the rows left out. Returns (graph, key, tasks)."""
    from ..execution.engine import count_task
    from ..execution.graph import GraphSpec, Group, Leaf, Shared, build, token
    from ..planning.plan import COUNT_FAN_IN

    blocks = plan.blocks()
    groups = tuple(Group(b.index, (Leaf(b.index, file_task,
                                        (Shared("source"), Shared("ids"), plan, b.index,
                                         b.start, b.stop, spec, len(blocks), job),
                                        label="file"),))
                   for b in blocks if b.index not in done)
    return build(GraphSpec("export", token(asdict(plan), run_id, sorted(done), spec.url,
                                           spec.dtype, spec.bad_rows, file_task.__name__),
                           {"source": source, "ids": ids}, groups, count_task, COUNT_FAN_IN,
                           empty=count_task))


# ==== the job: a plan + the region job + the graph =========================================

@dataclass(frozen=True)
class ExportFormat:
    """One output format of an export of vectors, as :func:`run_export` drives it.

    ``name`` ("parquet", "lance": the fingerprint's ``options.format``); ``kind`` (what a
    finished one is called for :func:`bigalign.storage.job.finished_or_refuse`); ``noun``
    (a file, in log lines); ``manifest_format`` (the manifest's ``format``, also in every
    file's metadata); ``check_folder(url, so)`` -> the manifest of an earlier export there,
    None when nothing is there, InputError for a location bigalign may not write;
    ``damage(url, manifest, so)`` -> what a finished export lost, or None;
    ``target(output, so, head)`` -> the region job's target (with ``plan_files(expected)``);
    ``file_task``: writes one file (:func:`export_graph`)."""

    name: str
    kind: str
    noun: str
    manifest_format: str
    check_folder: Callable
    damage: Callable
    target: Callable
    file_task: Callable


@dataclass(frozen=True)
class _Export:
    """One export, prepared: the source (``emb``, ``ids``, ``model``), the rows, the
    plan, the output's dtype and ids kind, the checkpoint, the fingerprint and the
    manifest's head."""

    emb: Any
    ids: Any
    model: Optional[str]
    zero_rows_bad: bool
    first: int
    last: int
    out_dtype: np.dtype
    kind: str
    plan: ExportPlan
    checkpoint: Any
    fingerprint: dict
    head: dict


def run_export(fmt: ExportFormat, source, output, *, ids_column: str, vector_column: str,
               dtype: Optional[str], rows, rows_per_file: Optional[int], bad_rows: str,
               compression: Optional[str] = None, job=None, execution=None,
               storage_options: Optional[dict] = None, keywords: Optional[dict] = None,
               caller: str = "export"):
    """Export the vectors of ``source`` to ``output`` in format ``fmt`` (the parameters:
    :func:`bigalign.commands.parquet_export.export_parquet`; ``compression``: polars' name,
    Parquet only). Returns a :class:`bigalign.RunReport`."""
    from ..options import Execution, JobOptions, keywords_of, requests
    from .runs import RunReport

    t0 = time.perf_counter()
    given = requests(caller, {"job": job, "execution": execution}, keywords or {},
                     {"job": keywords_of(JobOptions), "execution": keywords_of(Execution)})
    job, run = given["job"], given["execution"]
    _check_options(ids_column, vector_column, dtype, bad_rows)
    e = _prepare(fmt, source, output, job, storage_options, ids_column=ids_column,
                 vector_column=vector_column, dtype=dtype, rows=rows,
                 rows_per_file=rows_per_file, compression=compression)
    existing = _existing(fmt, e, output, job, storage_options)
    if existing is not None:
        return RunReport(0, time.perf_counter() - t0, 0, len(existing.get("files", [])), 0,
                         e.plan.rows, True)
    return _run(fmt, e, output, job, run, storage_options, t0, compression, bad_rows)


def _provenance(source, so) -> dict:
    """What the source store records of how it was made (an apply's transform digest and
    source, an import's inputs): stamped into the export's metadata."""
    from ..storage.outputs import inspect

    attrs = inspect(source, so).attrs
    keep = {k: attrs[k] for k in ("made_by", "transform", "source", "completed")
            if isinstance(attrs.get(k), (str, int, float))}
    if attrs.get("run_id"):
        keep["run_id"] = attrs["run_id"]
    return keep


def _mapped(source, so) -> Optional[dict]:
    """The source's provenance record (:mod:`bigalign.storage.provenance`), stamped into
    the export's manifest and every file's (or the dataset's) metadata; target-centred
    vectors are exported with a warning (they do not mix with native ones as they are)."""
    from ..storage.provenance import centred_note, mapped_of, sentence

    record = mapped_of(source, so)
    if record is not None and record.get("target_centred"):
        log.warning("exporting vectors %s: %s", sentence(record), centred_note(record))
    return record


def _prepare(fmt: ExportFormat, source, output, job, so, *, ids_column, vector_column,
             dtype, rows, rows_per_file, compression) -> _Export:
    from ..storage.job import default_checkpoint
    from ..storage.locations import canonical_url, check_disjoint
    from ..storage.outputs import refuse_inside_zarr
    from ..storage.stores import parse_rows

    emb, ids, model = open_source(source, so, job.check_chunks)
    first, last = parse_rows(rows, emb.rows)
    out_dtype = np.dtype(dtype or emb.dtype.name)
    kind = ids_kind(ids)
    plan = _plan(emb, first, last, out_dtype, kind, rows_per_file)
    ckpt = default_checkpoint(output) if job.checkpoint is None else (job.checkpoint or None)
    check_disjoint({"source": source}, {"output": output, "checkpoint": ckpt}, so)
    options = {"format": fmt.name, "dtype": out_dtype.name, "ids_column": ids_column,
               "vector_column": vector_column, "compression": compression,
               "rows_per_file": plan.rows_per_file}
    fingerprint = {
        "source": emb.fingerprint(), "ids": None if ids is None else _fingerprint_of(ids),
        "model": model, "rows": [first, last], "options": options}
    refuse_inside_zarr(output, "output", so)
    head = {"format": fmt.manifest_format, "complete": False,
            "source": canonical_url(source, so), "model": model, "rows": [first, last],
            "dim": emb.dim, "dtype": out_dtype.name, "ids": kind, "ids_column": ids_column,
            "vector_column": vector_column, "compression": compression,
            "provenance": _provenance(source, so), "mapped": _mapped(source, so)}
    return _Export(emb, ids, model, _zero_rows_bad(source, so), first, last, out_dtype, kind,
                   plan, ckpt, fingerprint, head)


def _existing(fmt: ExportFormat, e: _Export, output, job, so) -> Optional[dict]:
    """The manifest of a finished export of this very job at ``output`` (nothing to do),
    or None when this run writes it; raises InputError when it may not."""
    from ..storage.job import Job, finished_or_refuse
    from ..storage.outputs import Node

    existing = fmt.check_folder(output, so)
    if existing is not None and existing.get("complete"):
        if finished_or_refuse(Node(fmt.kind, existing), e.fingerprint, output, job.overwrite,
                              job.restart, e.checkpoint, so,
                              damage=lambda: fmt.damage(output, existing, so)):
            log.warning("%s is already complete with the same inputs and options: nothing "
                        "to do", output)
            return existing
    elif existing is not None and not (job.overwrite or job.restart or
                                       (e.checkpoint and Job(e.checkpoint, so).exists())):
        raise InputError(f"output {output!r} holds an unfinished export with no recorded "
                         "progress; pass --overwrite to write it again")
    return None


def _run(fmt: ExportFormat, e: _Export, output, job, run, so, t0: float,
         compression: Optional[str], bad_rows: str):
    """The region job: create or resume the output, one task per file not done, verify,
    then complete (the target's last write)."""
    from ..execution.cluster import session
    from ..storage.output_job import output_job
    from .runs import MAX_BAD_ROWS_LISTED, RunReport

    target = fmt.target(output, so, e.head)
    with output_job(target, e.checkpoint, "export", e.fingerprint, asdict(e.plan),
                    storage_options=so, restart=job.restart, replace=job.overwrite) as region:
        plan = ExportPlan(**region.manifest["plan"])
        expected = plan.region_rows()
        target.plan_files(expected)
        faults.point("export.begun")
        handle, done = region.open(expected)
        spec = FileSpec(str(output).rstrip("/"), e.head["ids_column"],
                        e.head["vector_column"], e.kind, e.emb.dim, e.out_dtype.name,
                        compression, {"format": fmt.manifest_format, "run_id": region.run_id,
                                      "model": e.model, "source": e.head["source"],
                                      "mapped": e.head["mapped"]},
                        so, bad_rows, e.zero_rows_bad)
        graph, key, tasks = export_graph(e.emb, e.ids, plan, spec, fmt.file_task, done=done,
                                         job=region.job, run_id=region.run_id)
        per = min(plan.rows_per_file, plan.rows)
        log.info("export: %d rows x %d (%s, ids %s) to %d %s%s of up to %d rows (~%.3g MB "
                 "of vectors) in %d task%s", plan.rows, e.emb.dim, e.out_dtype.name, e.kind,
                 len(expected), fmt.noun, "s" * (len(expected) != 1), per,
                 per * e.emb.dim * e.out_dtype.itemsize / 2**20, tasks, "s" * (tasks != 1))
        with session(**run.session_args()) as s:
            written, skipped = s.get(graph, key)
        seconds = time.perf_counter() - t0
        faults.point("export.before-complete")
        markers = region.markers(expected)  # verify, then complete (RegionRun.finish)
        if region.job.progress:  # the files of earlier runs count too
            skipped = sorted(i for m in markers.values() for i in m.get("bad_rows", []))
        if skipped:
            log.warning("%d source rows left out (NaN/Inf%s; first: %s); their numbers are "
                        "in the manifest's bad_rows", len(skipped),
                        " or all zeros" if e.zero_rows_bad else "", skipped[:5])
        region.finish(handle, expected, dict(
            complete=True, seconds=seconds,
            bad_rows={"policy": "skip" if skipped else bad_rows, "count": len(skipped),
                      "rows": skipped[:MAX_BAD_ROWS_LISTED]},
            job={"run_id": region.run_id, "fingerprint": e.fingerprint},
            completed=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return RunReport(int(written), seconds, tasks, len(expected), len(done), plan.rows,
                     bad_rows=skipped)


def _zero_rows_bad(source, so) -> bool:
    """Is ``source`` the output of an apply that wrote bad rows as zeros (--bad-rows zero)?
    Its all-zero rows are then bad rows, not vectors."""
    from ..storage.outputs import inspect

    record = inspect(source, so).attrs.get("bad_rows")
    return isinstance(record, dict) and record.get("policy") == "zero" and \
        bool(record.get("count"))


def _check_options(ids_column: str, vector_column: str, dtype, bad_rows: str = "fail") -> None:
    if bad_rows not in BAD_ROWS:
        raise InputError(f"--bad-rows must be one of {', '.join(BAD_ROWS)}, got {bad_rows!r}")
    if not ids_column or not vector_column or ids_column == vector_column:
        raise InputError(f"the id and vector columns need two different names, got "
                         f"{ids_column!r} and {vector_column!r}")
    if dtype is not None and str(dtype) not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype is not None:
        _polars_float(str(dtype))


def _plan(emb, first: int, last: int, out_dtype: np.dtype, kind: str,
          rows_per_file: Optional[int]) -> ExportPlan:
    """The plan, with a wrong --rows-per-file explained (it must be whole chunks)."""
    row_bytes = export_row_bytes(emb.dim, out_dtype.itemsize, kind)
    try:
        return make_export_plan(first, last, emb.row_step, row_bytes,
                                read_step=emb.read_step, rows_per_file=rows_per_file)
    except ValueError:
        step = emb.row_step
        n = int(rows_per_file or 0)
        near = sorted({max(step, n // step * step), max(step, -(-n // step) * step)})
        raise InputError(f"--rows-per-file {n}: a file holds whole source chunks of {step} "
                         f"rows, so it must be a positive multiple of {step} (e.g. "
                         f"{' or '.join(map(str, near))})") from None
