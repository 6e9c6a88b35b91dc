"""``bigalign export STORE --format parquet -o DIR``: an embedding store (or a bare (N, d)
Zarr array) out to Parquet files that a vector database's bulk loader reads, out of core, in
parallel on Dask, resumable.

    >>> from bigalign.commands.parquet_export import export_parquet
    >>> export_parquet("corpus.store", "corpus.parquet")      # DIR/part-00000.parquet, ...

What is written::

    DIR/part-00000.parquet     rows [start, start + rows_per_file) of the source, in order
    DIR/part-00001.parquet     ... one file per task
    DIR/_bigalign_export.json  the manifest: {"complete": true, "files": [{name, rows, bytes}],
                               "bad_rows": {policy, count, rows}, "job": {run_id,
                               fingerprint}, ...}; written first with "complete": false,
                               rewritten last

A row a vector database cannot index (NaN/Inf, as an apply with ``--bad-rows nan`` writes
its bad rows; all zeros in the output of an apply with ``--bad-rows zero``) stops the export
naming it, or with ``--bad-rows skip`` is left out of its file and listed in the manifest.

Each file has two columns: ``id`` (int64, or string: the store's ids; a bare array's or an
id-less store's row numbers, int64) and ``embedding`` (a fixed-size list of d float16/32/64,
polars ``pl.Array(dtype, d)``; Parquet itself has no fixed-size list type, so it is stored
as a LIST whose Arrow schema, in the ``ARROW:schema`` key, says fixed-size list of d: polars
and pyarrow read it back as such). Its key-value metadata holds ``bigalign``, a JSON object
with the format, the model, the source, the file's rows [start, stop) and the run id.
Row groups hold about 32 MiB. Names starting with ``_`` or ``.`` (the manifest, temporary
files) are skipped by Spark, pyarrow datasets and most loaders; ``DIR/*.parquet`` matches
only the parts.

How it works, in the house style (a plan + a job + a graph):

* **The plan** (:class:`bigalign.planning.plan.ExportPlan`, pure) cuts the rows into files of whole
  source chunks (shards when sharded) of about 256 MB (``--rows-per-file``: a multiple of
  the chunk rows), each read from the source ~32 MiB at a time and written in row groups of
  that many rows.
* **The job** is :func:`bigalign.storage.job.checkpointed`, exactly as for apply and import:
  the fingerprint holds the source (its content witness), the ids, the rows and the
  options; a file is written under a temporary name and renamed into place (on object
  stores: one upload, which appears whole), then marked done. A rerun after a crash writes
  the missing files; a rerun of a finished export is a no-op while every file its manifest
  lists is there with its size (:func:`export_damage`, one listing; else refused until
  ``--overwrite``); changed inputs are refused, naming what changed.
* **The graph** has one task per file: it streams the file's row groups from the source
  into the Parquet writer (polars' streaming sink over an IO source), so its memory is a
  few row groups, not a file.

bigalign deletes only what it wrote: DIR must be absent, empty, or an export bigalign wrote
(its manifest names the files); a folder holding anything else is refused, even with
``--overwrite``, which removes only the files the old manifest names. Fault points for the
crash tests: ``export.begun``, ``export.file-written`` (file in place, marker not yet),
``export.file-done``, ``export.before-complete``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from ..execution import faults
from ..execution.graph import task_count
from ..words import counted
from ..errors import InputError, NonFiniteError
from ..planning.plan import ExportPlan, export_row_bytes, make_export_plan

from ..storage.parquet_folder import (BAD_ROWS, COMPRESSIONS, FORMAT, MANIFEST, ExportTarget, _temp_name,  # noqa: F401
                                      check_folder, export_damage, export_manifest, part_name)

log = logging.getLogger("bigalign")

__all__ = ["export_parquet", "export_manifest", "check_folder", "part_name", "open_source",
           "file_task", "export_graph", "export_damage", "FORMAT", "MANIFEST", "COMPRESSIONS",
           "DTYPES", "BAD_ROWS"]

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
                         "Parquet: export it with --format npz, json or safetensors")
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


# ==== one file: rows -> frames -> Parquet =====================================================

@dataclass(frozen=True)
class FileSpec:
    """How every file of one export is written: where (``url``, ``storage_options``),
    the columns (``ids_column``, ``ids``: "int64"/"string"; ``vector_column``: ``dim``
    values of ``dtype``), ``compression`` (polars' name), ``metadata`` (what each file's
    ``bigalign`` key holds besides its own rows) and what to do with a bad row
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


def write_file(source, ids, groups: list, spec: FileSpec, name: str) -> int:
    """Write the rows of ``groups`` (blocks: source reads, in order) as the Parquet file
    ``name`` of the output folder, in row groups of the largest read's rows, streamed: a
    local file goes to a temporary name and is renamed into place; on other file systems
    the upload appears whole when closed. Returns (rows written, source numbers of the
    rows left out as bad)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(spec.url, **(spec.storage_options or {}))
    block = (groups[0].start, groups[-1].stop)
    meta = {"bigalign": json.dumps(dict(spec.metadata, rows=list(block), file=name))}
    skipped: list[int] = []

    def frames():
        for g in groups:
            frame, left_out = read_group(source, ids, g.start, g.stop, spec)
            skipped.extend(left_out)
            yield frame
    rows_per_group = max(g.rows for g in groups)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
        tmp = f"{root}/{_temp_name(name)}"
        try:
            with _named_if_disk_full(f"{root}/{name}"):
                _sink(frames(), spec, tmp, rows_per_group, meta)
            os.replace(tmp, f"{root}/{name}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        path = f"{root}/{name}"
        f = fs.open(path, "wb")
        try:
            with _named_if_disk_full(spec.url.rstrip("/") + f"/{name}"):
                _sink(frames(), spec, f, rows_per_group, meta)
        except BaseException:
            _abandon(f, fs, path)
            raise
        f.close()
    return block[1] - block[0] - len(skipped), skipped


@contextlib.contextmanager
def _named_if_disk_full(path: str):
    """A write that failed because the disk or quota is full (polars says so only in a
    ComputeError's text; an OSError has ENOSPC/EDQUOT) becomes one clear error naming the
    file (ChunkReadError: exit 2, not retried); other errors pass unchanged."""
    from ..errors import ChunkReadError, is_disk_full

    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise ChunkReadError(f"cannot write {path}: no space left on the device (or over "
                             f"quota) ({type(e).__name__}: {e}); free space, or export to "
                             "another --output, then rerun: the export resumes") from e


def _abandon(f, fs, path: str) -> None:
    """Drop a remote file whose writing failed: abort the upload (s3fs: nothing appears),
    mark the file closed so that collecting it commits nothing, and remove whatever a
    backend that writes through left at ``path``."""
    with contextlib.suppress(Exception):
        f.discard()
    with contextlib.suppress(Exception):
        f.closed = True
    with contextlib.suppress(Exception):
        fs.rm_file(path)


def _sink(frames, spec: FileSpec, target, rows_per_group: int, meta: dict) -> None:
    """Write ``frames`` (an iterator of frames of ``spec.schema()``) to ``target`` (a path
    or a binary file) as one Parquet file, in row groups of ``rows_per_group`` rows.
    Streamed through polars' IO source and streaming sink, so a few frames are in memory at
    a time; polars without them (older versions) gets the frames concatenated and written
    at once."""
    import polars as pl

    kw = dict(compression=spec.compression, row_group_size=rows_per_group, metadata=meta)
    if not _CAN_STREAM:
        pl.concat(list(frames), rechunk=False).write_parquet(target, **kw)
        return
    from polars.io.plugins import register_io_source

    def source(with_columns, predicate, n_rows, batch_size):
        for df in frames:
            yield df if with_columns is None else df.select(with_columns)

    register_io_source(source, schema=spec.schema()).sink_parquet(target, **kw)


def _can_stream() -> bool:
    """Does this polars have IO sources and a streaming sink that writes key-value
    metadata?"""
    import inspect as _inspect

    import polars as pl

    try:
        import polars.io.plugins as plugins
    except ImportError:
        return False
    return hasattr(plugins, "register_io_source") and \
        "metadata" in _inspect.signature(pl.LazyFrame.sink_parquet).parameters


_CAN_STREAM = _can_stream()


# ==== execution: one task per file ==========================================================

def file_task(source, ids, plan: ExportPlan, index: int, start: int, stop: int,
              spec: FileSpec, files: int, job) -> int:
    """Write file ``index`` (source rows [start, stop)) and mark it done (after its data,
    fenced; the marker lists the rows left out as bad). Returns (rows written, source
    numbers of the rows left out)."""
    from ..planning.plan import Block

    if job is not None:
        job.check_fence()
    rows, skipped = write_file(source, ids, plan.groups(Block(index, start, stop)), spec,
                               part_name(index, files))
    faults.point("export.file-written")
    if job is not None:
        job.mark_done(index, start, stop, bad=skipped)
        faults.point("export.file-done")
    return rows, skipped


def export_graph(source, ids, plan: ExportPlan, spec: FileSpec, *, done=frozenset(),
                 job=None, run_id: str = ""):
    """Dask graph (:func:`bigalign.execution.graph.build`): one :func:`file_task` per file
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
                                           spec.dtype, spec.bad_rows),
                           {"source": source, "ids": ids}, groups, count_task, COUNT_FAN_IN,
                           empty=count_task))


# ==== the public face ========================================================================

def export_parquet(source, output: str, *, ids_column: str = "id",
                   vector_column: str = "embedding", dtype: Optional[str] = None,
                   rows=None, rows_per_file: Optional[int] = None,
                   compression: str = "snappy", bad_rows: str = "fail", job=None,
                   execution=None, storage_options: Optional[dict] = None, **keywords):
    """Export the vectors of ``source`` to Parquet files in the folder ``output``.

    Parameters
    ----------
    source : an embedding store (a Zarr group with ``embeddings`` (N, d), optionally ``ids``
        (N,) and a ``model`` attribute) or a bare (N, d) float Zarr array (its row numbers
        are the ids); a finished apply output is one.
    output : the folder (local path or fsspec URL): absent, empty, or an earlier export.
    ids_column, vector_column : column names (default ``id`` and ``embedding``).
    dtype : float16/float32/float64 of the vectors (default: the source's).
    rows : "START:STOP" or (start, stop): export only these source rows.
    rows_per_file : rows per file, a multiple of the source's chunk (shard) rows (default:
        whole chunks making about 256 MB of vectors).
    compression : "snappy" (default), "zstd" or "none".
    bad_rows : what to do with a row a vector database cannot index: one holding NaN/Inf
        (an apply with ``bad_rows="nan"`` writes its bad rows so) or, in the output of an
        apply with ``bad_rows="zero"``, an all-zero row. "fail" (default) stops at the
        first, naming it; "skip" leaves them out: the files hold the other rows, in order,
        and the manifest's ``bad_rows`` ({policy, count, rows}: the first
        ``MAX_BAD_ROWS_LISTED`` source row numbers) and ``RunReport.bad_rows`` list them.
        Like apply's, not part of the job's fingerprint: a run stopped by a bad row
        resumes with ``"skip"``.
    job, execution, storage_options : as for :func:`bigalign.apply`: the job protocol
        (:class:`bigalign.options.JobOptions`: overwrite, checkpoint, restart,
        check_chunks) and where it runs (:class:`bigalign.options.Execution`: scheduler,
        workers, memory_limit, threads, progress; a file is a task, so block_bytes does not
        apply), or their fields as flat keywords.

    Returns a :class:`bigalign.RunReport` (``units_total``: files; ``already_complete`` for
    a rerun of a finished export; ``rows``: the rows written, without those skipped).
    """
    from ..storage.job import default_checkpoint
    from .runs import MAX_BAD_ROWS_LISTED, RunReport
    from ..storage.job import Job, finished_or_refuse
    from ..storage.output_job import output_job
    from ..execution.cluster import session
    from ..storage.locations import canonical_url, check_disjoint
    from ..options import Execution, JobOptions, keywords_of, requests
    from ..storage.outputs import Node, refuse_inside_zarr
    from ..storage.stores import parse_rows

    t0 = time.perf_counter()
    so = storage_options
    given = requests("export_parquet", {"job": job, "execution": execution}, keywords,
                     {"job": keywords_of(JobOptions), "execution": keywords_of(Execution)})
    job, run = given["job"], given["execution"]
    overwrite, restart = job.overwrite, job.restart
    _check_options(ids_column, vector_column, dtype, compression, bad_rows)
    emb, ids, model = open_source(source, so, job.check_chunks)
    zero_rows_bad = _zero_rows_bad(source, so)
    first, last = parse_rows(rows, emb.rows)
    out_dtype = np.dtype(dtype or emb.dtype.name)
    kind = ids_kind(ids)
    plan = _plan(emb, first, last, out_dtype, kind, rows_per_file)
    ckpt = default_checkpoint(output) if job.checkpoint is None else (job.checkpoint or None)
    check_disjoint({"source": source}, {"output": output, "checkpoint": ckpt}, so)
    fingerprint = {
        "source": emb.fingerprint(), "ids": None if ids is None else _fingerprint_of(ids),
        "model": model, "rows": [first, last],
        "options": {"format": "parquet", "dtype": out_dtype.name, "ids_column": ids_column,
                    "vector_column": vector_column, "compression": compression,
                    "rows_per_file": plan.rows_per_file}}
    refuse_inside_zarr(output, "output", so)
    existing = check_folder(output, so)
    if existing is not None and existing.get("complete"):
        if finished_or_refuse(Node("parquet-export", existing), fingerprint, output,
                              overwrite, restart, ckpt, so,
                              damage=lambda: export_damage(output, existing, so)):
            log.warning("%s is already complete with the same inputs and options: nothing "
                        "to do", output)
            return RunReport(0, time.perf_counter() - t0, 0, len(existing["files"]), 0,
                             plan.rows, True)
    elif existing is not None and not (overwrite or restart or
                                       (ckpt and Job(ckpt, so).exists())):
        raise InputError(f"output {output!r} holds an unfinished export with no recorded "
                         "progress; pass --overwrite to write it again")
    head = {"format": FORMAT, "complete": False, "source": canonical_url(source, so),
            "model": model, "rows": [first, last], "dim": emb.dim, "dtype": out_dtype.name,
            "ids": kind, "ids_column": ids_column, "vector_column": vector_column,
            "compression": compression}
    target = ExportTarget(output, so, head)
    with output_job(target, ckpt, "export", fingerprint, asdict(plan), storage_options=so,
                    restart=restart, replace=overwrite) as region:
        plan = ExportPlan(**region.manifest["plan"])
        expected = plan.region_rows()
        target.plan_files(expected)
        faults.point("export.begun")
        handle, done = region.open(expected)
        spec = FileSpec(str(output).rstrip("/"), ids_column, vector_column, kind, emb.dim,
                        out_dtype.name, COMPRESSIONS[compression],
                        {"format": FORMAT, "run_id": region.run_id, "model": model,
                         "source": head["source"]}, so, bad_rows, zero_rows_bad)
        graph, key, tasks = export_graph(emb, ids, plan, spec, done=done, job=region.job,
                                         run_id=region.run_id)
        per = min(plan.rows_per_file, plan.rows)
        log.info("export: %d rows x %d (%s, ids %s) to %s of up to %d rows (~%.3g MB of "
                 "vectors) in %s", plan.rows, emb.dim, out_dtype.name, kind,
                 counted(len(expected), "Parquet file"), per,
                 per * emb.dim * out_dtype.itemsize / 2**20, counted(task_count(graph), "task"))
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
                        " or all zeros" if zero_rows_bad else "", skipped[:5])
        region.finish(handle, expected, dict(
            complete=True, seconds=seconds,
            bad_rows={"policy": "skip" if skipped else bad_rows, "count": len(skipped),
                      "rows": skipped[:MAX_BAD_ROWS_LISTED]},
            job={"run_id": region.run_id, "fingerprint": fingerprint},
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


def _check_options(ids_column: str, vector_column: str, dtype, compression: str,
                   bad_rows: str = "fail") -> None:
    if bad_rows not in BAD_ROWS:
        raise InputError(f"--bad-rows must be one of {', '.join(BAD_ROWS)}, got {bad_rows!r}")
    if not ids_column or not vector_column or ids_column == vector_column:
        raise InputError(f"the id and vector columns need two different names, got "
                         f"{ids_column!r} and {vector_column!r}")
    if dtype is not None and str(dtype) not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype is not None:
        _polars_float(str(dtype))
    if compression not in COMPRESSIONS:
        raise InputError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got "
                         f"{compression!r}")


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
