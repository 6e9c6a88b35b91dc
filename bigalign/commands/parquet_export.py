"""``bigalign export STORE --format parquet -o DIR``: an embedding store (or a bare (N, d)
Zarr array) out to Parquet files that a vector database's bulk loader reads, out of core, in
parallel on Dask, resumable.

    >>> from bigalign.commands.parquet_export import export_parquet
    >>> export_parquet("corpus.store", "corpus.parquet")      # DIR/part-00000.parquet, ...

What is written::

    DIR/part-00000.parquet     rows [start, start + rows_per_file) of the source, in order
    DIR/part-00001.parquet     ... one file per task, each written in DIR/_in_progress/ and
                               moved into DIR by the last step
    DIR/_SUCCESS               empty: every part is in DIR (Spark/Hadoop's marker)
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
files, ``_in_progress``) are skipped by Spark, pyarrow datasets and most loaders;
``DIR/*.parquet`` matches only the parts.

**An interrupted export never looks complete to a loader that globs** ``DIR/*.parquet`` or
reads DIR as a pyarrow/Spark dataset: the tasks write their parts under
``DIR/_in_progress/``, and only the last step, once every part is verified, moves them into
DIR, then writes ``_SUCCESS``, then the manifest with "complete": true (both halves of the
Spark/Hadoop convention: names a glob does not take until the run completes, and a marker
written last). A kill during the moves leaves some parts in DIR and no ``_SUCCESS``: a
loader that must be safe even then checks for ``_SUCCESS``; the rerun finishes the moves.

How it works, in the house style (a plan + a job + a graph):

* **The plan** (:class:`bigalign.planning.plan.ExportPlan`, pure) cuts the rows into files of whole
  source chunks (shards when sharded) of about 256 MB (``--rows-per-file``: a multiple of
  the chunk rows), each read from the source ~32 MiB at a time and written in row groups of
  that many rows.
* **The job** is :func:`bigalign.storage.job.checkpointed`, exactly as for apply and import:
  the fingerprint holds the source (its content witness), the ids, the rows and the
  options; a file is written under a temporary name in ``_in_progress`` and renamed (on object
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
import os
from typing import Optional

from ..errors import InputError
from .. import faults
from ..planning.plan import ExportPlan
from ..storage.parquet_folder import (COMPRESSIONS, FORMAT, IN_PROGRESS, MANIFEST, SUCCESS,  # noqa: F401
                                      ExportTarget, _temp_name, check_folder, export_damage,
                                      export_manifest, part_name)
from .vector_export import (BAD_ROWS, DTYPES, ExportFormat, FileSpec,  # noqa: F401
                            export_graph, ids_kind, open_source, read_group, run_export)

__all__ = ["export_parquet", "export_manifest", "check_folder", "part_name", "open_source",
           "file_task", "export_graph", "export_damage", "FORMAT", "MANIFEST", "COMPRESSIONS",
           "DTYPES", "BAD_ROWS", "PARQUET", "IN_PROGRESS", "SUCCESS", "ids_kind", "read_group", "FileSpec"]



# ==== one file: frames -> Parquet ==============================================================

def write_file(source, ids, groups: list, spec: FileSpec, name: str) -> int:
    """Write the rows of ``groups`` (blocks: source reads, in order) as the Parquet file
    ``name`` of the output folder, in row groups of the largest read's rows, streamed: a
    local file goes to a temporary name and is renamed into place; on other file systems
    the upload appears whole when closed. Returns (rows written, source numbers of the
    rows left out as bad)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(spec.url, **(spec.storage_options or {}))
    root = f"{root.rstrip('/')}/{IN_PROGRESS}"  # moved into the folder by the last step
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
            with _named_if_disk_full(spec.url.rstrip("/") + f"/{IN_PROGRESS}/{name}"):
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

    kw = dict(compression=COMPRESSIONS.get(spec.compression, spec.compression), row_group_size=rows_per_group, metadata=meta)
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



#: The Parquet format as :func:`bigalign.commands.vector_export.run_export` drives it.
PARQUET = ExportFormat("parquet", "parquet-export", "Parquet file", FORMAT, check_folder,
                       export_damage, ExportTarget, file_task)


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
    if compression not in COMPRESSIONS:
        raise InputError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got "
                         f"{compression!r}")
    return run_export(PARQUET, source, output, ids_column=ids_column,
                      vector_column=vector_column, dtype=dtype, rows=rows,
                      rows_per_file=rows_per_file, bad_rows=bad_rows,
                      compression=compression, job=job, execution=execution,
                      storage_options=storage_options, keywords=keywords,
                      caller="export_parquet")
